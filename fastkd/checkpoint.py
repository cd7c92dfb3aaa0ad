"""The checkpoint file format: written here, read here, validated here.

Files are written to a temporary name, fsynced, then renamed (fastkd.atomic), so a crash never
leaves half a file. Everything is read with `torch.load(weights_only=True)`: tensors and plain
data only, never pickled code. The one object type allowed besides is argparse.Namespace (timm
train checkpoints keep their command line under "args"); `.safetensors` files are read with
safetensors. Weights files of other tools (wrappers, prefixes) are fastkd.weights' job.

`last.pt` (full state, for `--resume`; keys marked * are required, the others are checked
when present):

    {"format": "fastkd-checkpoint"*, "format_version": 1*, "fastkd_version": "0.1.0",
     "run_id": "20250101-120000-ab12",     # str, the run this state belongs to
     "epoch": 2*,              # int, epochs completed (the epoch to run next)
     "step_in_epoch": 0*,      # int, > 0 only for a Ctrl-C checkpoint taken inside an epoch
     "global_step": 56*,       # int, schedule position (iterations done)
     "samples_seen": 7168,     # int, global samples trained (world-size-independent schedule)
     "world_size": 2,          # int >= 1, ranks that wrote this state
     "batch_size": 64,         # int >= 1, per-rank batch size
     "archs"*: {"resnet18": "resnet18", ...},     # network name -> architecture (fastkd.models names)
     "models"*: {name: state_dict},               # same names as archs
     "optimizer"*: ..., "scaler"*: ..., "best_top1"*: {name: float},
     "rng"*: [per-rank RNG states], "loader": {"seed": 0, "epoch": 2},
     "num_classes": 10*,       # int
     "classes": [{"label": 0, "wnid": "n01440764", ...}, ...],   # the pack manifest's classes
     "teacher": {"arch": ..., "weights": ...} or None,
     "config"*: {...resolved config...}}

`best-<net>.pt`: the plain state_dict of that network (contiguous, CPU), so
`fastkd.models.build_model(arch, K).load_state_dict(torch.load(path))` works (for a torchvision
arch, `torchvision.models.get_model(arch, num_classes=K)` too). Its classes are those of
`last.pt` in the same folder.

A run folder stands for a weights file by one rule, `resolve_weights_path`: RUN/checkpoints/
best-<net>.pt when a network name is asked for and that file exists, else RUN/checkpoints/last.pt.
"""

from __future__ import annotations

import argparse
import pickle
import random
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fastkd
from fastkd.atomic import atomic_write
from fastkd.errors import FastKDError
from fastkd.run_layout import BEST_PREFIX, CHECKPOINTS_DIR, LAST, best_name
from fastkd.weights import strip_prefixes, unwrap_state_dict

CHECKPOINT_FORMAT = "fastkd-checkpoint"
FORMAT_VERSION = 1

# key -> accepted types, for the keys a resume needs (bool is excluded from int below)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "step_in_epoch": (int,),
    "global_step": (int,),
    "archs": (dict,),
    "models": (dict,),
    "optimizer": (dict,),
    "scaler": (dict,),
    "best_top1": (dict,),
    "rng": (list,),
    "num_classes": (int,),
    "config": (dict,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "world_size": (int,),
    "batch_size": (int,),
    "samples_seen": (int,),
    "classes": (list,),
    "run_id": (str,),
    "loader": (dict,),
    "teacher": (dict, type(None)),
}
# torch.save's legacy (non-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"
# objects a weights file may hold besides tensors and plain data: timm's pickled argparse args
SAFE_GLOBALS = [argparse.Namespace]


# ---------------------------------------------------------------------------------- writing


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
    """A last.pt dict: the format header plus `fields` (see the schema above)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "fastkd_version": fastkd.__version__,
        **fields,
    }


# ---------------------------------------------------------------------------------- reading


def resolve_weights_path(path: str | Path, arch: str | None = None) -> Path:
    """The weights file a user's path stands for: a file as it is; a run folder (or its
    checkpoints/ folder) as checkpoints/best-<arch>.pt when `arch` (a network name: the
    architecture, without a zoo prefix) is given and that file exists, else checkpoints/last.pt.
    The one rule for `--teacher-weights`, `--student-weights` and `fastkd eval`."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path if path.name == CHECKPOINTS_DIR or (path / LAST).is_file() else path / CHECKPOINTS_DIR
    if arch is not None and (folder / best_name(arch)).is_file():
        return folder / best_name(arch)
    if (folder / LAST).is_file():
        return folder / LAST
    wanted = f"{CHECKPOINTS_DIR}/best-{arch}.pt or {CHECKPOINTS_DIR}/{LAST}" if arch else f"{CHECKPOINTS_DIR}/{LAST}"
    raise FastKDError(f"{path} is a folder without {wanted}: pass a run folder or a weights file")


def load_file(path: str | Path) -> dict:
    """The dict in a fastkd checkpoint, a state_dict file (torch.load, tensors and plain data
    only, plus argparse.Namespace) or a `.safetensors` file.

    FastKDError naming the file when it is missing, a folder, empty, not a PyTorch or
    safetensors file, damaged, holds pickled Python objects, or is not a dict."""
    path = Path(path)
    if path.is_dir():
        raise FastKDError(f"checkpoint {path} is a folder, not a weights file")
    if not path.is_file():
        raise FastKDError(f"checkpoint {path} not found")
    size = path.stat().st_size
    if size == 0:
        raise FastKDError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or download?")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        return _load_safetensors(path, size)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file; its text may advise unsafe loading
        raise FastKDError(_unreadable(path, size, error)) from None
    if not isinstance(obj, dict):
        raise FastKDError(f"checkpoint {path}: expected a dict (state_dict or fastkd checkpoint), got "
                          f"{type(obj).__name__}")
    return obj


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) then `{"`."""
    with path.open("rb") as f:
        head = f.read(10)
    return len(head) == 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_safetensors(path: Path, size: int) -> dict:
    from safetensors import SafetensorError  # optional: only .safetensors files need it
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise FastKDError(f"{path} ({size} bytes) is a damaged safetensors file ({error})") from None


def _unreadable(path: Path, size: int, error: Exception) -> str:
    """Why torch.load failed, in our words (torch's own text suggests weights_only=False,
    which would run code from the file: never repeated here)."""
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    is_torch = head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC
    if not is_torch:
        return (f"{path} ({size} bytes) is not a PyTorch checkpoint (it starts with {head[:8]!r}); "
                "give a file written by torch.save (a fastkd checkpoint or a state_dict)")
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if isinstance(error, pickle.UnpicklingError) or found:
        what = f" ({found.group(1)})" if found else ""
        return (f"{path} holds pickled Python objects{what}, not only tensors; fastkd loads tensors and plain "
                "data only (no code from files): save model.state_dict() instead of the model")
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        return f"{path} ({size} bytes) is a truncated or damaged PyTorch checkpoint"
    return f"{path} ({size} bytes) is a damaged PyTorch checkpoint ({type(error).__name__})"


def is_checkpoint(obj: dict) -> bool:
    """A fastkd checkpoint (last.pt) rather than a plain state_dict."""
    return obj.get("format") == CHECKPOINT_FORMAT


def state_from_file(obj: dict, path: str | Path, arch: str, network: str | None = None,
                    same_arch: Callable[[str], bool] | None = None) -> dict:
    """The state_dict of network `arch` in a loaded file: from a fastkd checkpoint, network
    `network` when it holds that name with the same architecture, else its one network of
    architecture `arch` (`same_arch(stored_arch)` decides, default: equal strings); from any
    other file, the state_dict fastkd.weights.unwrap_state_dict finds (wrappers, prefixes)."""
    if is_checkpoint(obj):
        archs = obj.get("archs")
        if not isinstance(archs, dict) or not isinstance(obj.get("models"), dict):
            raise FastKDError(f"checkpoint {path} has no 'archs'/'models': not a complete fastkd checkpoint")
        same = same_arch or (lambda a: a == arch)
        if network in archs and network in obj["models"] and same(archs[network]):
            return strip_prefixes(obj["models"][network])
        matches = [name for name, a in archs.items() if same(a)]
        if len(matches) != 1:
            held = ", ".join(f"{n} ({a})" for n, a in archs.items()) or "no networks"
            raise FastKDError(f"checkpoint {path} holds {held}: need exactly one {arch} network")
        return strip_prefixes(obj["models"][matches[0]])
    return unwrap_state_dict(obj, path)[0]


def network_state(obj: dict, path: str | Path, name: str) -> dict:
    """The state_dict of network `name` (a key of "archs") in a loaded fastkd checkpoint."""
    models = obj.get("models")
    if not isinstance(models, dict) or name not in models:
        raise FastKDError(f"checkpoint {path} has no network {name!r} (it holds {sorted(models or {})})")
    return strip_prefixes(models[name])


def validate_last(obj: dict, path: str | Path) -> dict:
    """`obj` if it is a full-state last.pt of this format version (schema above), else
    FastKDError naming `path` and the first missing or mistyped key."""
    if not isinstance(obj, dict) or not is_checkpoint(obj):
        raise FastKDError(f"{path} is not a fastkd full-state checkpoint (last.pt)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise FastKDError(f"{path}: checkpoint format {obj.get('format_version')}, this fastkd reads {FORMAT_VERSION}")
    for key in _REQUIRED:
        if key not in obj:
            raise FastKDError(f"{path}: last.pt has no '{key}' (incomplete or from another tool)")
    for key, types in {**_REQUIRED, **_OPTIONAL}.items():
        if key in obj and (not isinstance(obj[key], types) or isinstance(obj[key], bool)):
            names = " or ".join(t.__name__ for t in types)
            raise FastKDError(f"{path}: last.pt key '{key}' must be {names}, got {type(obj[key]).__name__}")
    for key in ("world_size", "batch_size"):
        if key in obj and obj[key] < 1:
            raise FastKDError(f"{path}: last.pt key '{key}' must be >= 1, got {obj[key]}")
    for key in ("epoch", "step_in_epoch", "global_step", "samples_seen"):
        if key in obj and obj[key] < 0:
            raise FastKDError(f"{path}: last.pt key '{key}' must be >= 0, got {obj[key]}")
    if set(obj["archs"]) != set(obj["models"]):
        raise FastKDError(
            f"{path}: last.pt networks {sorted(obj['archs'])} differ from its models {sorted(obj['models'])}"
        )
    if "classes" in obj:
        _check_class_list(obj["classes"], f"{path}: last.pt key 'classes'")
    return obj


def load_last(path: str | Path) -> dict:
    """A `last.pt` full-state checkpoint, validated (FastKDError if the file is not one)."""
    return validate_last(load_file(path), path)


# ---------------------------------------------------------------------------------- classes


def _check_class_list(classes, where: str) -> None:
    if not isinstance(classes, list) or not all(
        isinstance(c, dict) and isinstance(c.get("wnid"), str) and isinstance(c.get("label"), int) for c in classes
    ):
        raise FastKDError(f"{where} must be a list of {{'wnid': str, 'label': int, ...}}")


def check_same_classes(ckpt_classes: list[dict], manifest_classes: list[dict], where: str) -> None:
    """FastKDError unless both class lists have the same WNIDs at the same labels.

    where: names the checkpoint in the message, e.g. "resume: runs/x/checkpoints/last.pt"."""
    _check_class_list(ckpt_classes, f"{where}: classes")
    theirs = [c["wnid"] for c in sorted(ckpt_classes, key=lambda c: c["label"])]
    ours = [c["wnid"] for c in sorted(manifest_classes, key=lambda c: c["label"])]
    if theirs == ours:
        return
    label = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    mine = theirs[label] if label < len(theirs) else "(none)"
    data = ours[label] if label < len(ours) else "(none)"
    count = f" ({len(theirs)} classes, the data {len(ours)})" if len(theirs) != len(ours) else ""
    raise FastKDError(f"{where} was trained on other classes than the data{count}: first differing class at "
                      f"label {label}: checkpoint {mine}, data {data}")


def stored_classes(obj: dict, path: str | Path) -> tuple[list[dict] | None, str]:
    """(classes, where) a weights file was trained on: a fastkd checkpoint's own list, or for
    RUN/checkpoints/best-<net>.pt the list in last.pt beside it; (None, ...) when unknown."""
    path = Path(path)
    if is_checkpoint(obj):
        return obj.get("classes"), str(path)
    sibling = path.parent / LAST
    if path.parent.name == CHECKPOINTS_DIR and path.name.startswith(BEST_PREFIX) and sibling.is_file():
        other = load_file(sibling)
        if is_checkpoint(other) and "classes" in other:
            return other["classes"], f"{path} (classes from {sibling})"
    return None, str(path)


def _check_classes(obj: dict, path: str | Path, manifest: dict) -> None:
    """The classes `obj` (loaded from `path`) was trained on, when known, must be the manifest's."""
    classes, where = stored_classes(obj, path)
    if classes is not None:
        check_same_classes(classes, manifest["classes"], where)
