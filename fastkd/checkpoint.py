"""Checkpoint files: written to a temporary name, then renamed, so a crash never leaves half a file.

`last.pt` (full state, for `--resume`):

    {"format": "fastkd-checkpoint", "format_version": 1, "fastkd_version": "0.1.0",
     "epoch": 2,               # epochs completed (the epoch to run next)
     "step_in_epoch": 0,       # > 0 only for a Ctrl-C checkpoint taken inside an epoch
     "global_step": 56,        # schedule position (iterations done)
     "archs": {"resnet18": "resnet18", ...}, "models": {name: state_dict},
     "optimizer": ..., "scaler": ..., "best_top1": {name: float},
     "rng": [per-rank RNG states], "loader": {"seed": 0, "epoch": 2},
     "num_classes": 10, "classes": [...manifest classes...], "config": {...resolved config...}}

`best-<net>.pt`: the plain torchvision state_dict of that network (contiguous, CPU), so
`torchvision.models.get_model(arch, num_classes=K).load_state_dict(torch.load(path))` works.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fastkd
from fastkd.atomic import atomic_write
from fastkd.models import CHECKPOINT_FORMAT, load_file

FORMAT_VERSION = 1


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary name beside `path`, fsync, then rename onto `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def plain_state_dict(model: nn.Module) -> dict:
    """A torchvision-loadable state_dict: no DDP/compile prefixes, contiguous CPU tensors."""
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA) as tensors-only data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_last(**fields) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "fastkd_version": fastkd.__version__,
        **fields,
    }


def load_last(path: str | Path) -> dict:
    """A `last.pt` full-state checkpoint (FastKDError if the file is not one)."""
    from fastkd.errors import FastKDError

    obj = load_file(path)
    if obj.get("format") != CHECKPOINT_FORMAT or "optimizer" not in obj:
        raise FastKDError(f"{path} is not a fastkd full-state checkpoint (last.pt)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise FastKDError(f"{path}: checkpoint format {obj.get('format_version')}, expected {FORMAT_VERSION}")
    return obj
