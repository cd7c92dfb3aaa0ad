"""What every loader backend promises, in one place: the `Loader` base class.

Options and augmentation constants live in spec.py (re-exported here for older imports).

A loader is built once per run and iterated once per epoch. Each pass yields `(images, labels)`
(or `(images, labels, indices)` with `return_indices=True`, a test/debug hook):

    images   [B, 3, r, r]  normalised with ImageNet mean/std, `dtype`, torch.channels_last, on device
    labels   [B]           int64, on device
    indices  [B]           int64 on CPU: each sample's pack index (0-based position in the split)

Epochs: `set_epoch(e)` makes the next pass epoch `e`; a pass without a `set_epoch` call before it
is the previous epoch + 1 (so a plain `for epoch: for batch in loader` also reshuffles).
Mid-epoch start (resume): `set_epoch(e, start_batch=k)` makes the next pass yield exactly batches
k..len-1 of the full pass of epoch e on this rank (same samples in the same batches; for the
backends whose crops are keyed by (seed, epoch, sample), the same pixels too), without reading or
decoding batches 0..k-1. `len(loader)` stays the full pass length; `loader.start_batch` is the
batch the running pass started at, or between passes the one the next pass starts at; the pass
after that starts at 0 again. Backends that cannot start mid-pass say so with
`supports_start_batch = False` and refuse k > 0 (FastKDError) in `set_epoch`.
Resolution: `set_resolution(r)` applies from the next pass, without rebuilding the loader.
Given crops (a teacher cache's views, fastkd.teacher_cache): `set_crop_fn(fn)` makes train passes
crop `fn(epoch, index, height, width) -> ((top, left, h, w), flip)` (box in the decoded image's
pixels) instead of sampling a RandomResizedCrop; resize and normalisation are unchanged.
Backends that can (torch, folder) say `supports_crop_fn = True`; the others refuse with a
FastKDError naming themselves (ffcv and dali crop inside their compiled pipelines).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from fastkd.data.sharding import epoch_indices, num_batches, split_batches
from fastkd.data.spec import (BACKENDS, FLIP_PROB, IMAGENET_MEAN, IMAGENET_STD, TRAIN_RATIO,
                              TRAIN_SCALE, VAL_CROP_RATIO, LoaderSpec, parse_device, parse_dtype)
from fastkd.data.transforms import mean_std_255, normalize_uint8
from fastkd.errors import FastKDError

__all__ = ["Loader", "PassSampler",  # defined here; the rest re-exported from spec.py
           "LoaderSpec", "parse_dtype", "parse_device", "BACKENDS", "IMAGENET_MEAN",
           "IMAGENET_STD", "TRAIN_SCALE", "TRAIN_RATIO", "VAL_CROP_RATIO", "FLIP_PROB"]


class Loader:
    """Base of every backend: epoch/resolution bookkeeping and the public attributes."""

    backend = "base"
    # a backend that cannot begin a pass at batch k > 0 without reading batches 0..k-1 says False
    supports_start_batch = True
    why_no_start_batch = ""  # and why (in the FastKDError of set_epoch)
    # a backend that can crop given boxes (set_crop_fn) instead of sampling them says True
    supports_crop_fn = False

    def __init__(self, spec: LoaderSpec, manifest: dict):
        self.spec = spec
        self.manifest = manifest
        self.num_classes = len(manifest["classes"])
        self.num_samples = int(manifest["splits"][spec.split]["count"])
        self.batch_size = spec.batch_size
        self.resolution = spec.resolution
        self.epoch = 0  # epoch of the next pass
        self._next_start = 0  # batch the next pass starts at (set_epoch)
        self._running_start: int | None = None  # batch the running pass started at; None between passes
        self._mean_std: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def start_batch(self) -> int:
        """Index (in the full pass) of the first batch of the running pass, or, between passes,
        of the next one: the trainer's step counter for the first batch it receives."""
        return self._next_start if self._running_start is None else self._running_start

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next pass is epoch `epoch` and yields batches `start_batch`..len-1 of that epoch's
        full pass on this rank (start_batch == len: an empty pass). The pass after it starts at 0."""
        start = int(start_batch)
        if not 0 <= start <= len(self):
            raise ValueError(f"start_batch={start_batch} is outside 0..{len(self)} (batches per pass on "
                             f"rank {self.spec.rank} of {self.spec.world_size})")
        if start and not self.supports_start_batch:
            raise FastKDError(f"the {self.backend} loader cannot start a pass at batch {start}: "
                              f"{self.why_no_start_batch}")
        self.epoch = int(epoch)
        self._next_start = start

    def set_crop_fn(self, crop_fn) -> None:
        """Train passes from the next one crop `crop_fn(epoch, index, height, width) -> (box,
        flip)` (box = (top, left, h, w) in the decoded image, flip: horizontal) for pack index
        `index` of an image of `height` x `width` pixels, instead of sampling a crop. `crop_fn`
        must pickle (DataLoader workers call it). Refused (FastKDError) by backends that cannot
        crop a given box; a programming error (ValueError) on a split that does not augment."""
        if not self.supports_crop_fn:
            raise FastKDError(
                f"the {self.backend} loader cannot crop given boxes (a teacher cache's views: "
                f"--teacher-cache): its crops are sampled inside its own pipeline; use --backend torch "
                f"(or folder) with a teacher cache, or train with the live teacher")
        if not self.spec.train:
            raise ValueError(f"set_crop_fn: split {self.spec.split!r} is not augmented (train only)")
        self._use_crop_fn(crop_fn)

    def _use_crop_fn(self, crop_fn) -> None:
        """The backend's part of set_crop_fn (only called when supports_crop_fn)."""
        raise NotImplementedError

    def set_resolution(self, resolution: int) -> None:
        if int(resolution) < 8:
            raise FastKDError(f"resolution must be >= 8 pixels, got {resolution}")
        self.resolution = int(resolution)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,r,r] (any layout, on the device) -> normalised `dtype`, channels_last
        (transforms.normalize_uint8), with the mean/std tensors made once per device."""
        mean_std = None
        if images.device.type != "cpu":  # the CPU path looks values up in a table instead
            if images.device not in self._mean_std:
                self._mean_std[images.device] = mean_std_255(images.device)
            mean_std = self._mean_std[images.device]
        return normalize_uint8(images, self.spec.dtype, mean_std)

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
        """This rank's sample indices for one full pass: the (seed, epoch) permutation when training."""
        s = self.spec
        return epoch_indices(self.num_samples, s.train, s.seed, epoch, s.rank, s.world_size, s.drop_last)

    def _pass_batches(self, epoch: int, start: int) -> list[np.ndarray]:
        """Pack indices of batches start..len-1 of the full pass (the first `start` never built)."""
        s = self.spec
        return split_batches(self._pass_order(epoch), s.batch_size, s.drop_last)[start:]

    def __iter__(self) -> Iterator[Any]:
        """One pass: epoch and start batch are taken when the first batch is asked for; the next
        pass defaults to the following epoch, from batch 0."""
        epoch, start = self.epoch, self._next_start
        self.epoch, self._next_start = epoch + 1, 0
        self._running_start = start
        try:
            if start < len(self):  # start == len: nothing left of this pass (and no pipeline to build)
                yield from self._pass(epoch, start)
        finally:
            self._running_start = None

    def _pass(self, epoch: int, start: int) -> Iterator[Any]:
        """The backend's batches start..len-1 of epoch `epoch`, each through `_output`."""
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


def start_pass(loader, epoch: int, start: int) -> int:
    """Make the loader's next pass epoch `epoch`, beginning at batch `start` when the loader can
    (fastkd loaders: `set_epoch(epoch, start_batch=k)` reads nothing before batch k); returns the
    index of the first batch it will yield (0 for a loader that can only start at the top)."""
    if start and getattr(loader, "supports_start_batch", False):
        loader.set_epoch(epoch, start_batch=start)
        return start
    loader.set_epoch(epoch)  # a user's loader, or a mode that cannot seek: the caller skips
    return 0
