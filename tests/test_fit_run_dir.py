"""Every entry point keeps a run dir's rules: fastkd.fit refuses a dir holding a run or held by a
live `fastkd train`, a failed check leaves no empty run dir, eval --arch and timm messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import fastkd
from fastkd import cli
from fastkd.errors import FastKDError
from test_train_support import one_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]
CONFIG = {"loss.method": "ce", "schedule.epochs": 1, "run.device": "cpu", "run.log": "none", "precision.amp": "fp32",
          "run.summary": "false"}


def _data():
    torch.manual_seed(0)
    return [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(2)]


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def test_fit_twice_into_one_dir_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    config = {**CONFIG, "run.out": str(out)}
    fastkd.fit([_net()], _data(), _data(), num_classes=3, config=config)
    metrics = (out / "metrics.jsonl").read_bytes()
    best = (out / "checkpoints" / "best-Sequential.pt").read_bytes()
    with pytest.raises(FastKDError, match=r"already holds a finished run .*run\.overwrite"):
        fastkd.fit([_net()], _data(), _data(), num_classes=3, config=config)
    assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing appended, nothing replaced
    assert (out / "checkpoints" / "best-Sequential.pt").read_bytes() == best
    fastkd.fit([_net()], _data(), _data(), num_classes=3, config={**config, "run.overwrite": True})
    assert (out / "metrics.jsonl").read_bytes() != metrics


def test_fit_into_a_dir_locked_by_a_live_training_is_refused(tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fastkd.run_dir import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.readline()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FastKDError, match=f"run dir {out} is in use by PID {holder.pid}"):
            fastkd.fit([_net()], _data(), _data(), num_classes=3, config={**CONFIG, "run.out": str(out)})
        assert not (out / "config.yaml").exists()
    finally:
        holder.communicate("\n")


def test_failed_check_leaves_no_run_dir(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code = cli.main(["train", "--data", str(tmp_path), "--method", "ce", "--students", "resnet18",
                     "--compile", "cudagraphs", "--run.device", "cpu", "--out", str(out)])  # fmt: skip
    assert code == 2 and "cudagraphs" in capsys.readouterr().err
    assert not out.exists()


def test_eval_arch_picks_the_named_network_or_refuses(tmp_path, capsys):
    from fastkd.eval_cmd import pick_network

    nets = {"resnet18": _net(), "mobilenet_v2": _net()}
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(FastKDError, match="--arch resnet50: .* holds the networks resnet18, mobilenet_v2"):
        pick_network(nets, "resnet50", last)
    assert list(pick_network(nets, "mobilenet_v2", last)) == ["mobilenet_v2"]
    assert f"evaluating network mobilenet_v2 of {last}" in capsys.readouterr().err


def test_timm_weights_errors_name_timm(monkeypatch):
    from fastkd import models

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1000)

    monkeypatch.setattr(models, "pretrained_model", lambda arch, spec: (Head(), "cached.safetensors"))
    manifest = {"classes": [{"label": 0, "wnid": "digit0", "name": "digit0", "imagenet_index": None}]}
    with pytest.raises(FastKDError) as info:
        models.fit_weights(Head(), "timm:resnet10t.a1_in1k", "timm:resnet10t", manifest)
    assert "timm:resnet10t.a1_in1k" in str(info.value) and "`imagenet`" not in str(info.value)
