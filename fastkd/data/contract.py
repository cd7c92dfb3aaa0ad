"""What every loader backend promises, in one place: the `Loader` base class.

Options and augmentation constants live in spec.py (re-exported here for older imports).

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

from typing import Any, Iterator

import numpy as np
import torch

from fastkd.data.sharding import epoch_indices, num_batches
from fastkd.data.spec import (BACKEND_FORMAT, BACKENDS, FLIP_PROB, IMAGENET_MEAN, IMAGENET_STD, TRAIN_RATIO,
                              TRAIN_SCALE, VAL_CROP_RATIO, LoaderSpec, parse_device, parse_dtype)
from fastkd.data.transforms import normalize_uint8_cpu
from fastkd.errors import FastKDError

__all__ = ["Loader", "PassSampler",  # defined here; the rest re-exported from spec.py
           "LoaderSpec", "parse_dtype", "parse_device", "BACKENDS", "BACKEND_FORMAT", "IMAGENET_MEAN",
           "IMAGENET_STD", "TRAIN_SCALE", "TRAIN_RATIO", "VAL_CROP_RATIO", "FLIP_PROB"]


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
