"""What every loader backend promises, in one place: options, augmentation constants, base class.

A loader is built once per run and iterated once per epoch. Each pass yields `(images, labels)`
(or `(images, labels, indices)` with `return_indices=True`, a test/debug hook):

    images   [B, 3, r, r]  normalised with ImageNet mean/std, `dtype`, torch.channels_last, on device
    labels   [B]           int64, on device
    indices  [B]           int64 on CPU: each sample's pack index (0-based position in the split)

Epochs: `set_epoch(e)` makes the next pass epoch `e`; a pass without a `set_epoch` call before it
is the previous epoch + 1 (so a plain `for epoch: for batch in loader` also reshuffles).
Resolution: `set_resolution(r)` applies from the next pass, without rebuilding the loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from fastkd.data.sharding import epoch_indices, num_batches
from fastkd.errors import FastKDError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALE = (0.08, 1.0)  # RandomResizedCrop area fraction
TRAIN_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (w / h)
VAL_CROP_RATIO = 0.875  # val: centre square of side 0.875 * shorter side, resized to r
FLIP_PROB = 0.5

BACKENDS = ("ffcv", "dali", "torch", "folder")
# packed format each backend reads (folder reads the original source tree)
BACKEND_FORMAT = {"ffcv": "ffcv", "dali": "dali", "torch": "dali", "folder": None}

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


class Loader:
    """Base of every backend: epoch/resolution bookkeeping and the public attributes."""

    backend = "base"

    def __init__(self, spec: LoaderSpec, manifest: dict):
        self.spec = spec
        self.manifest = manifest
        self.num_classes = len(manifest["classes"])
        self.num_samples = int(manifest["splits"][spec.split]["count"])
        self.batch_size = spec.batch_size
        self.resolution = spec.resolution
        self.epoch = 0  # epoch of the next pass
        self._mean_std: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_resolution(self, resolution: int) -> None:
        if int(resolution) < 8:
            raise FastKDError(f"resolution must be >= 8 pixels, got {resolution}")
        self.resolution = int(resolution)

    def _start_pass(self) -> int:
        """The epoch this pass runs; the next pass defaults to the one after."""
        epoch = self.epoch
        self.epoch += 1
        return epoch

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,r,r] (any layout, on the device) -> normalised `dtype`, channels_last.

        Values are the float32 results rounded once to `dtype`. CPU: one table-lookup pass
        (transforms.normalize_uint8_cpu); CUDA: float32 arithmetic, then the cast.
        """
        if images.device.type == "cpu":
            from fastkd.data.transforms import normalize_uint8_cpu

            return normalize_uint8_cpu(images, self.spec.dtype)
        key = (images.device, self.spec.dtype)
        if key not in self._mean_std:
            mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
            std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
            self._mean_std[key] = (mean, std)
        mean, std = self._mean_std[key]
        out = images.to(dtype=torch.float32, memory_format=torch.channels_last)
        return out.sub_(mean).div_(std).to(self.spec.dtype)

    def _output(self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray | None):
        labels = labels.reshape(-1).to(device=self.spec.device, dtype=torch.int64, non_blocking=True)
        if self.spec.return_indices:
            return images, labels, torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return images, labels

    def __len__(self) -> int:
        """Batches per pass on this rank, under the shared sharding rule (fastkd.data.sharding)."""
        s = self.spec
        return num_batches(self.num_samples, s.batch_size, s.rank, s.world_size, s.drop_last)

    def _pass_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for one pass: the (seed, epoch) permutation when training."""
        s = self.spec
        return epoch_indices(self.num_samples, s.train, s.seed, epoch, s.rank, s.world_size, s.drop_last)

    def __iter__(self) -> Iterator[Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        s = self.spec
        return (f"<{type(self).__name__} {s.data_dir} split={s.split} batches={len(self)} "
                f"batch_size={s.batch_size} r={self.resolution} rank={s.rank}/{s.world_size} "
                f"device={s.device} dtype={s.dtype}>")


class PassSampler:
    """A batch sampler holding the batches of the current pass; `Loader`s that use a torch
    DataLoader refill `items` each pass, and persistent workers re-read it every pass."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)
