"""fastkd.checkpoint: reading files with messages that name the file (torch files with timm's
argparse args allow-listed, safetensors), last.pt validation, class-list comparison, and the
run-folder rule shared by teacher loading and `fastkd eval`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastkd.checkpoint import (
    build_last,
    check_same_classes,
    load_file,
    load_last,
    resolve_weights_path,
    save_atomic,
    state_from_file,
    validate_last,
)
from fastkd.errors import FastKDError


def classes_of(wnids: list[str]) -> list[dict]:
    return [{"label": i, "wnid": w, "name": w} for i, w in enumerate(wnids)]


def tiny_last(models: dict[str, nn.Module], classes: list[dict], **extra) -> dict:
    """A complete last.pt dict (every required key) for networks `models` (name == arch)."""
    fields = dict(
        epoch=1, step_in_epoch=0, global_step=4, samples_seen=256, world_size=1, batch_size=64, run_id="r1",
        archs={name: name for name in models}, models={name: m.state_dict() for name, m in models.items()},
        optimizer={"state": {}, "param_groups": []}, scaler={}, best_top1={name: 0.0 for name in models},
        rng=[], loader={"seed": 0, "epoch": 1}, num_classes=len(classes), classes=classes, teacher=None,
        config={"data": {"batch_size": 64}},
    )
    fields.update(extra)
    return build_last(**fields)


def test_random_bytes_are_not_a_pytorch_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(FastKDError) as info:
        load_file(path)
    message = str(info.value)
    assert "noise.pt" in message and "1024 bytes" in message and "not a PyTorch checkpoint" in message
    assert "weights_only" not in message  # never suggest unpickling code from a file


def test_empty_file_is_called_empty(tmp_path):
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(FastKDError, match=r"zero\.pt is empty \(0 bytes\)"):
        load_file(tmp_path / "zero.pt")


def test_pickled_module_and_truncated_file(tmp_path):
    torch.save(nn.Linear(2, 3), tmp_path / "module.pt")  # a whole module, not a state_dict
    with pytest.raises(FastKDError) as info:
        load_file(tmp_path / "module.pt")
    assert "module.pt" in str(info.value) and "state_dict()" in str(info.value)
    assert "weights_only" not in str(info.value)
    torch.save(nn.Linear(2, 3).state_dict(), tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FastKDError, match=r"cut\.pt .*truncated or damaged") as info:
        load_file(tmp_path / "cut.pt")
    assert "weights_only" not in str(info.value)


def test_load_last_round_trip_and_missing_keys(tmp_path):
    net = nn.Linear(2, 3)
    ckpt = tiny_last({"resnet18": net}, classes_of(["a", "b", "c"]))
    save_atomic(ckpt, tmp_path / "last.pt")
    loaded = load_last(tmp_path / "last.pt")
    assert loaded["samples_seen"] == 256 and loaded["classes"][2]["wnid"] == "c"
    for key in ("epoch", "optimizer", "models"):
        broken = {k: v for k, v in ckpt.items() if k != key}
        with pytest.raises(FastKDError, match=rf"bad\.pt: last\.pt has no '{key}'"):
            validate_last(broken, tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("world_size", "2", "'world_size' must be int, got str"),
        ("world_size", 0, "'world_size' must be >= 1"),
        ("batch_size", 64.0, "'batch_size' must be int, got float"),
        ("samples_seen", -1, "'samples_seen' must be >= 0"),
        ("run_id", 7, "'run_id' must be str"),
        ("epoch", True, "'epoch' must be int, got bool"),
        ("classes", [{"label": 0}], "'classes' must be a list of"),
        ("archs", {"other": "resnet18"}, "networks .* differ from its models"),
    ],
)
def test_validate_last_checks_types_of_present_keys(tmp_path, key, value, words):
    ckpt = tiny_last({"resnet18": nn.Linear(2, 3)}, classes_of(["a", "b"]))
    ckpt[key] = value
    with pytest.raises(FastKDError, match=rf"last\.pt.*{words}"):
        validate_last(ckpt, tmp_path / "last.pt")


def test_optional_keys_may_be_absent(tmp_path):
    ckpt = tiny_last({"resnet18": nn.Linear(2, 3)}, classes_of(["a"]))
    for key in ("world_size", "batch_size", "samples_seen", "classes", "run_id"):
        del ckpt[key]
    assert validate_last(ckpt, tmp_path / "last.pt") is ckpt


def test_check_same_classes_names_first_difference():
    data = classes_of(["n01440764", "n01443537", "n01484850", "n01443537"])
    check_same_classes(list(reversed(data)), data, "x.pt")  # list order does not matter, labels do
    ckpt = classes_of(["n01440764", "n01443537", "n01484850", "n01440764"])
    with pytest.raises(FastKDError) as info:
        check_same_classes(ckpt, data, "resume: runs/a/checkpoints/last.pt")
    assert str(info.value).startswith("resume: runs/a/checkpoints/last.pt")
    assert str(info.value).endswith("first differing class at label 3: checkpoint n01440764, data n01443537")
    with pytest.raises(FastKDError, match=r"2 classes, the data 3\).*label 2: checkpoint \(none\), data c"):
        check_same_classes(classes_of(["a", "b"]), classes_of(["a", "b", "c"]), "y.pt")


def test_run_folder_rule(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    with pytest.raises(FastKDError, match=r"run is a folder without checkpoints/best-resnet18\.pt or checkpoints/last"):
        resolve_weights_path(run, "resnet18")
    (ckpts / "last.pt").write_bytes(b"x")
    assert resolve_weights_path(run, "resnet18") == ckpts / "last.pt"
    (ckpts / "best-resnet18.pt").write_bytes(b"x")
    assert resolve_weights_path(run, "resnet18") == ckpts / "best-resnet18.pt"
    assert resolve_weights_path(run, "resnet50") == ckpts / "last.pt"
    assert resolve_weights_path(run) == ckpts / "last.pt"  # no architecture asked: every network
    assert resolve_weights_path(ckpts, "resnet18") == ckpts / "best-resnet18.pt"
    assert resolve_weights_path(tmp_path / "w.pt", "resnet18") == tmp_path / "w.pt"  # a file as given


def test_checkpoint_does_not_import_models():
    """One direction only: models imports checkpoint, never the other way round."""
    code = "import sys, fastkd.checkpoint; assert 'fastkd.models' not in sys.modules, 'models imported'"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


class _Config:  # a class a training script might pickle into its checkpoint
    def __init__(self):
        self.lr = 0.1


def test_argparse_args_are_the_only_objects_allowed(tmp_path, monkeypatch):
    """timm keeps its argparse.Namespace under "args": read with weights_only=True and an
    allow-list of exactly that class; any other object is still refused."""
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    state = nn.Linear(2, 3).state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(model="resnet18", lr=0.1), "epoch": 3},
               tmp_path / "timm.pth.tar")  # fmt: skip
    obj = load_file(tmp_path / "timm.pth.tar")
    assert obj["args"].model == "resnet18" and obj["epoch"] == 3 and torch.equal(obj["state_dict"]["weight"],
                                                                                 state["weight"])  # fmt: skip
    torch.save({"state_dict": state, "config": _Config()}, tmp_path / "custom.pt")
    with pytest.raises(FastKDError, match=r"custom\.pt holds pickled Python objects \(.*_Config\)") as info:
        load_file(tmp_path / "custom.pt")
    assert "weights_only" not in str(info.value)
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_safetensors_files_read_and_damage_named(tmp_path):
    state = {"weight": torch.randn(3, 2), "bias": torch.zeros(3)}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded.keys() == state.keys() and torch.equal(loaded["weight"], state["weight"])
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(FastKDError, match=r"cut\.safetensors \(\d+ bytes\) is a damaged safetensors file"):
        load_file(tmp_path / "cut.safetensors")


def test_state_from_file_reads_wrappers_and_picks_networks_by_name(tmp_path):
    state = nn.Linear(2, 3).state_dict()
    wrapped = {"epoch": 1, "model": {f"module.{k}": v for k, v in state.items()}}
    assert state_from_file(wrapped, tmp_path / "w.pt", "x").keys() == state.keys()
    a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    ckpt = tiny_last({"resnet18": a, "resnet18-2": b}, classes_of(["a", "b", "c"]))
    ckpt["archs"]["resnet18-2"] = "resnet18"
    got = state_from_file(ckpt, tmp_path / "last.pt", "resnet18", network="resnet18-2")
    assert torch.equal(got["weight"], b.weight)
    with pytest.raises(FastKDError, match=r"last\.pt holds resnet18 \(resnet18\), resnet18-2 \(resnet18\): need "
                                          r"exactly one resnet18 network"):  # fmt: skip
        state_from_file(ckpt, tmp_path / "last.pt", "resnet18")
