"""The backend-independent loader options and augmentation constants (no fastkd.data imports).

`LoaderSpec` holds what `build_loader` validated; the constants fix the augmentation every
backend implements (transforms.py, the backends' pipelines). This module imports nothing from
fastkd.data, so transforms.py and contract.py can both import it at the top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastkd.errors import FastKDError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALE = (0.08, 1.0)  # RandomResizedCrop area fraction
TRAIN_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (w / h)
VAL_CROP_RATIO = 0.875  # val: centre square of side 0.875 * shorter side, resized to r
FLIP_PROB = 0.5

BACKENDS = ("ffcv", "dali", "torch", "folder", "nvimgcodec")
AUTO = "auto"  # not a backend: build_loader picks one of BACKENDS by fastkd.data.auto's rule
# packed format each backend reads (folder reads the original source tree)
BACKEND_FORMAT = {"ffcv": "ffcv", "dali": "dali", "torch": "dali", "folder": None, "nvimgcodec": "dali"}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FastKDError(f"loader dtype must be float32, float16 or bfloat16, not {dtype}")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise FastKDError(f"unknown loader dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def parse_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastKDError(
            f"device {device} requested but CUDA is not available here (torch.cuda.is_available() "
            "is False); use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise FastKDError(f"loader device must be cpu or cuda, not {device}")
    return device


@dataclass(frozen=True, kw_only=True)
class LoaderSpec:
    """The backend-independent arguments of `build_loader`, validated."""

    data_dir: str  # packed directory (holds manifest.json)
    split: str  # "train" (random crop + flip, shuffled) or any other split (val transform, in order)
    batch_size: int  # per rank
    resolution: int  # output side r (changeable later with set_resolution)
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 1  # decode threads/processes
    drop_last: bool = True  # drop partial batches (and the N % world_size remainder, see sharding.py)
    return_indices: bool = False  # also yield each sample's pack index (tests, debugging)

    @property
    def train(self) -> bool:
        return self.split == "train"

    @classmethod
    def make(cls, data_dir, split, batch_size, resolution, device, dtype, rank=0, world_size=1,
             seed=0, num_workers=None, drop_last=None, return_indices=False) -> "LoaderSpec":
        if int(batch_size) < 1:
            raise FastKDError(f"batch_size must be >= 1, got {batch_size}")
        if int(resolution) < 8:
            raise FastKDError(f"resolution must be >= 8 pixels, got {resolution}")
        if not (0 <= int(rank) < int(world_size)):
            raise FastKDError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if num_workers is None:
            num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return cls(data_dir=str(data_dir), split=str(split), batch_size=int(batch_size),
                   resolution=int(resolution), device=parse_device(device), dtype=parse_dtype(dtype),
                   rank=int(rank), world_size=int(world_size), seed=int(seed),
                   num_workers=max(1, int(num_workers)),
                   drop_last=(split == "train") if drop_last is None else bool(drop_last),
                   return_indices=bool(return_indices))
