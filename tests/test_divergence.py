"""Defaults that cannot diverge: each optimizer's own default lr, and a run whose loss explodes stops."""

from __future__ import annotations

import pytest
import torch

from fastkd.checkpoint import load_last
from fastkd.schedule import peak_lr
from fastkd.train import NonFiniteLoss, Trainer
from test_train_support import ensure_losses, loaders, one_thread, tiny_config  # noqa: F401 (fixture)

ensure_losses()
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize(("name", "per_256"), [("sgd", 0.5), ("adamw", 2.5e-4)])
def test_each_optimizer_has_its_own_default_lr(tmp_path, name, per_256):
    cfg = tiny_config(tmp_path, **{"optim.name": name, "optim.lr_per_256": None})  # batch 32, one rank
    lr, how = peak_lr(cfg, world_size=1)
    assert lr == pytest.approx(per_256 * 32 / 256)
    assert f"{name}'s default lr_per_256" in how


def test_exploding_loss_stops_before_saving_and_names_lr_and_optimizer(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"schedule.epochs": 3, "model.students": ["resnet18"]})
    train, val = loaders()
    trainer = Trainer(cfg, train_loader=train, val_loader=val)
    fc = trainer.student_modules()["resnet18"].fc

    def blow_up(batch):  # logits x 1e6: a finite loss of ~1e6, far over 1000 x the first window's ~1.4
        if train.epoch == 1 and batch == 2:
            with torch.no_grad():
                fc.weight.mul_(1e6)

    train.hook = blow_up
    with pytest.raises(NonFiniteLoss, match=r"exploded at epoch 2.*first window.*last\.pt.*optimizer sgd, lr "):
        trainer.fit()
    ckpt = load_last(tmp_path / "run/checkpoints/last.pt")
    assert ckpt["epoch"] == 1  # the good epoch; the exploded weights were never saved
    assert ckpt["models"]["resnet18"]["fc.weight"].abs().max() < 1e3
