"""The Python API: your own modules and plain iterables of batches, no pack (fastkd.fit, Trainer)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import fastkd
from fastkd.errors import FastKDError
from test_train_support import SyntheticLoader, one_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def batches(train: bool, n: int):
    """Plain lists of (images, labels) CPU tensors: a learnable 4-class problem."""
    loader = SyntheticLoader(n=n, train=train, resolution=16)
    return [(x.contiguous(), y) for x, y in loader]


def test_fit_trains_the_users_modules_on_in_memory_batches(tmp_path):
    torch.manual_seed(0)
    common = {"schedule.epochs": 5, "optim.lr": 0.1, "precision.amp": "fp32", "run.device": "cpu",
              "run.log": "none", "run.log_every": 4, "schedule.warmup_epochs": 0.5, "loss.label_smoothing": 0.0}
    teacher = torchvision.models.resnet18(num_classes=4)
    fastkd.fit([teacher], batches(True, 256), batches(False, 128), num_classes=4,
               config={**common, "loss.method": "ce", "run.out": str(tmp_path / "teacher")})  # fmt: skip
    a = torchvision.models.resnet18(num_classes=4)
    b = torchvision.models.resnet18(num_classes=4)
    before = a.fc.weight.detach().clone()
    summary = fastkd.fit({"a": a, "b": b}, batches(True, 256), batches(False, 128), teacher=teacher, num_classes=4,
                         config={**common, "loss.method": "uadkd", "run.out": str(tmp_path / "run"),
                                 # the 4-class teacher's logits are large (KD terms start in the
                                 # hundreds): unclipped, a student's first steps diverged on some
                                 # CPUs' numerics and not on others
                                 "optim.clip_grad_norm": 2.0})  # fmt: skip
    assert not torch.equal(before, a.fc.weight)  # the user's own module was trained in place
    assert set(summary["networks"]) == {"a", "b"} and summary["networks"]["a"]["arch"] == "ResNet"
    assert min(n["best_top1"] for n in summary["networks"].values()) > 60.0  # chance: 25 %
    assert summary["teacher"]["arch"] == "ResNet" and summary["teacher"]["top1"] > 60.0
    report = json.loads((tmp_path / "run/report.json").read_text())
    assert report["finished"] and report["config"]["optim"]["lr"] == 0.1
    assert (tmp_path / "run/checkpoints/best-a.pt").exists()


def test_plain_iterables_are_checked(tmp_path):
    from fastkd.data.iterable import IterableLoader

    with pytest.raises(FastKDError, match="num_classes"):
        IterableLoader([], classes=None)
    with pytest.raises(FastKDError, match="no len"):
        IterableLoader(iter([]), num_classes=4)
    bad = IterableLoader([(torch.zeros(2, 3, 8, 8), torch.tensor([0, 7]))], num_classes=4)
    with pytest.raises(FastKDError, match="labels outside 0..3"):
        next(iter(bad))
    ints = IterableLoader([(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]))], num_classes=4)
    with pytest.raises(FastKDError, match="float tensor"):
        next(iter(ints))


def test_peer_method_needs_two_modules(tmp_path):
    with pytest.raises(FastKDError, match="2 networks"):
        fastkd.fit([torchvision.models.resnet18(num_classes=4)], batches(True, 64), batches(False, 32),
                   num_classes=4, config={"loss.method": "dml", "run.device": "cpu", "run.out": str(tmp_path)})


def test_fit_names_the_argument_of_a_bad_first_batch(tmp_path):
    """Checked on the first batch, before training: each message names fit's argument."""
    config = {"run.device": "cpu", "run.out": str(tmp_path / "run"), "loss.method": "ce", "run.log": "none"}
    net = torchvision.models.resnet18(num_classes=10)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    good = [(images, labels)]

    def fit(students=(net,), train=good, val=good, **kw):
        return fastkd.fit(list(students), train, val, num_classes=10, config=config, **kw)

    with pytest.raises(FastKDError, match=r"fit\(train=\.\.\.\): batch 0 images must be \[B, 3, H, W\], "
                                          r"got \[B, H, W, 3\] = \[4, 16, 16, 3\]"):  # fmt: skip
        fit(train=[(images.permute(0, 2, 3, 1), labels)])
    seven = torchvision.models.resnet18(num_classes=7)
    with pytest.raises(FastKDError, match=r"student '#0' \(ResNet\) outputs \[2, 7\].*10 classes"):
        fit(students=(seven,))
    with pytest.raises(FastKDError, match=r"fit\(teacher=\.\.\.\).*outputs \[2, 7\]"):
        fit(teacher=seven)
    with pytest.raises(FastKDError, match=r"fit\(val=\.\.\.\): the iterable yields no batches"):
        fit(val=[])
    with pytest.raises(FastKDError, match=r"fit\(train=\.\.\.\): generator is an iterator.*every epoch") as err:
        fit(train=(b for b in good))
    assert "steps_per_epoch" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written
