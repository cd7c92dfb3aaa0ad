"""`torch` backend: the WebDataset shards read without DALI; JPEGs decoded by torchvision.

Reading: the shards' index files give each sample's byte range, so sample i is one slice of a
memory-mapped tar (no tar parsing while training). Order and sharding: sharding.py (the same
as ffcv and folder).

Decoding, `decode=` ("auto": "device" on a CUDA device, "host" on CPU):
- "device" (cuda only): DataLoader workers (`num_workers` processes) only read bytes; a
  background thread decodes each batch with one `torchvision.io.decode_jpeg(list, device="cuda")`
  call (nvJPEG, batched), then crops/resizes/flips the whole batch on the GPU
  (`transforms.crop_resize_batch`: a fixed number of kernels per chunk of similar-size crops,
  whatever the batch size; its parameters and the labels reach the GPU as one asynchronous copy
  each, from pinned memory) and normalises, on a side CUDA stream, one batch ahead of the training step.
- "host": the workers decode (libjpeg-turbo), crop and resize (uint8 antialiased bilinear, image
  by image: faster on CPU than the batched matmuls) and return a uint8 batch. On CPU it is
  normalised in the main process. On CUDA (the GPU computes while the host cores decode) the
  DataLoader's pin thread copies it into pinned memory and a background thread queues, on a side
  stream, the asynchronous copy to the GPU and the normalisation there (`upload`), two batches
  ahead, handed over like the device path's (fastkd.data.prefetch: no host sync). Workers
  default to every core but one (the training process's) when num_workers is not given
  (`default_workers`, applied by build_loader).
`batched_resize=` (TorchLoader option; default: True for device decode, False for host decode)
picks `crop_resize_batch` or the per-image `crop_resize`; both give the same boxes and flips and
pixel values within 1 level.

Crops: transforms.py (torchvision's RandomResizedCrop algorithm, drawn for the whole batch with
numpy array ops; val centre square of 0.875 * shorter side). Every random number is a hash of
(seed, epoch, pack index, draw), so the same
seed gives the same order, crops and flips on any number of workers, CPU or GPU, host or device
decode (pixel values then agree up to the decoder: nvJPEG vs libjpeg-turbo differ by a few
levels), and a pass started at batch k (`set_epoch(e, start_batch=k)`) yields the same batches,
pixels included, as the tail of the full pass, reading nothing before batch k.

Given crops (`set_crop_fn(fn)`, or `crop_fn=` at construction; a teacher cache's views, see
fastkd.teacher_cache): train crops are `fn(epoch, index, height, width) -> (box, flip)` instead
of sampled ones; decoding, resizing and normalisation are unchanged, so an image shows exactly
the pixels the cache's teacher saw for that view (up to the decoder, as above).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fastkd.data.contract import Loader, LoaderSpec, PassSampler
from fastkd.data.packed import ShardStore
from fastkd.data.prefetch import prefetched
from fastkd.data.transforms import crop_params, crop_resize, crop_resize_batch, to_device
from fastkd.errors import FastKDError

DECODES = ("auto", "device", "host")


def decode_where(device: torch.device, decode: str = "auto") -> str:
    """"device" or "host": where the torch backend decodes for the `decode` option on `device`."""
    if decode not in DECODES:
        raise FastKDError(f"torch backend option decode must be one of {', '.join(DECODES)}, not {decode!r}")
    if decode == "auto":
        return "device" if device.type == "cuda" else "host"
    if decode == "device" and device.type != "cuda":
        raise FastKDError(f"torch backend option decode='device' decodes with nvJPEG on a CUDA device, but the "
                          f"loader's device is {device}; use decode='host' (or 'auto') there")
    return decode


def default_workers(device: torch.device, decode: str = "auto") -> int | None:
    """Decode workers when num_workers is not given: host decode on CUDA leaves one core to the
    training process (it launches the GPU's work), so every core but one, at least 1; None:
    LoaderSpec's default (every core)."""
    if device.type != "cuda" or decode_where(device, decode) != "host":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def upload(images: torch.Tensor, labels: torch.Tensor, device: torch.device, normalize) -> tuple:
    """A host-decoded batch -> (normalised images, int64 labels) on `device`.

    images uint8 [B,3,r,r] (channels_last from the workers), labels [B]: pinned on CUDA, so both
    copies are asynchronous on the current stream; `normalize` (Loader.normalize) then gives the
    loader's dtype, channels_last, on the device (float32 arithmetic on CUDA).
    """
    images = images.to(device, non_blocking=True)
    labels = labels.to(device=device, dtype=torch.int64, non_blocking=True)
    return normalize(images), labels


def augment(images: list, indices, seed: int, epoch: int, train: bool, resolution: int,
            batched: bool, crop_fn=None) -> torch.Tensor:
    """Decoded uint8 [3,H,W] images (one device) -> uint8 [B,3,r,r] channels_last: each sample's
    crop and flip from (seed, epoch, pack index), or from crop_fn(epoch, index, H, W) when given
    (train only), resized batched or image by image."""
    boxes, flips = crop_params([im.shape[1:] for im in images], indices, seed, epoch, train, crop_fn)
    return crop_batch(images, boxes, flips, resolution, batched)


def crop_batch(images: list, boxes, flips, resolution: int, batched: bool) -> torch.Tensor:
    """uint8 [3,H,W] images, int [B,4] boxes, bool [B] flips -> uint8 [B,3,r,r] channels_last:
    crop_resize_batch (one call for the batch) or crop_resize image by image (faster on CPU)."""
    if batched:
        return crop_resize_batch(images, boxes, flips, resolution)
    return torch.cat([crop_resize(im, tuple(box), resolution, flip)
                      for im, box, flip in zip(images, np.asarray(boxes).tolist(), np.asarray(flips).tolist())])


def jpeg_batch(store: ShardStore, indices) -> tuple[torch.Tensor, list[int]]:
    """A batch's JPEG bytes as (one uint8 tensor, each file's size): one shared-memory segment
    per batch from a worker, not B; decode_jpegs undoes it."""
    chunks = [store.jpeg_bytes(i) for i in indices]
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8), [len(c) for c in chunks]


def decode_jpegs(data: tuple[torch.Tensor, list[int]], device: torch.device) -> list[torch.Tensor]:
    """jpeg_batch's bytes -> uint8 [3,H,W] RGB images on `device` (nvJPEG, batched, on CUDA)."""
    buffer, sizes = data
    return decode_jpeg(list(torch.split(buffer, sizes)), mode=ImageReadMode.RGB, device=device)


def decode_host(store: ShardStore, indices) -> list[torch.Tensor]:
    """A batch decoded on the host (libjpeg-turbo): uint8 [3,H,W] RGB images."""
    return decode_jpeg([store.jpeg(i) for i in indices], mode=ImageReadMode.RGB)


class _BatchReader(torch.utils.data.Dataset):
    """Item (epoch, resolution, indices) -> (uint8 [B,3,r,r] channels_last, or (JPEG bytes of the
    batch in one tensor, their sizes) when decoding happens on the GPU, labels, indices)."""

    def __init__(self, store: ShardStore, seed: int, train: bool, decode: bool, batched: bool = False,
                 crop_fn=None):
        self.store, self.seed, self.train, self.decode = store, seed, train, decode
        self.batched, self.crop_fn = batched, crop_fn

    def __getitem__(self, item):
        epoch, resolution, indices = item
        labels = torch.from_numpy(self.store.labels[indices])
        if not self.decode:
            return jpeg_batch(self.store, indices), labels, indices
        images = decode_host(self.store, indices)
        out = augment(images, indices, self.seed, epoch, self.train, resolution, self.batched, self.crop_fn)
        return out, labels, indices  # uint8 [B,3,r,r] channels_last


def _identity(batch):
    return batch


class TorchLoader(Loader):
    backend = "torch"
    supports_crop_fn = True

    def __init__(self, spec: LoaderSpec, manifest: dict, shards: list, prefetch_factor: int = 2,
                 batched_resize: bool | None = None, crop_fn=None, decode: str = "auto"):
        super().__init__(spec, manifest)
        self.decode = decode_where(spec.device, decode)  # "device" (nvJPEG) or "host" (the workers)
        self.store = ShardStore(shards, self.num_samples)
        self._gpu = spec.device.type == "cuda"
        self.batched_resize = self.decode == "device" if batched_resize is None else bool(batched_resize)
        self._workers = 0 if spec.num_workers <= 1 and not self._gpu else spec.num_workers
        self._prefetch = prefetch_factor
        self._sampler = PassSampler()
        self.crop_fn = None
        self._make_loader()
        if crop_fn is not None:
            self.set_crop_fn(crop_fn)

    def _make_loader(self) -> None:
        """The reader and its DataLoader (persistent workers copy the reader when they start, so
        a new crop_fn means a new DataLoader)."""
        s, workers, host = self.spec, self._workers, self.decode == "host"
        self._reader = _BatchReader(self.store, s.seed, s.train, decode=host,
                                    batched=self.batched_resize, crop_fn=self.crop_fn)
        self._loader = torch.utils.data.DataLoader(
            self._reader, batch_size=None, sampler=self._sampler, num_workers=workers,
            persistent_workers=workers > 0, prefetch_factor=self._prefetch if workers else None,
            collate_fn=_identity, pin_memory=host and self._gpu)  # the pin thread: host -> pinned

    def _use_crop_fn(self, crop_fn) -> None:
        self.crop_fn = crop_fn
        self._make_loader()

    def _pass(self, epoch: int, start: int):
        # batches before `start` are never handed to the workers: not read, not decoded
        self._sampler.items = [(epoch, self.resolution, b) for b in self._pass_batches(epoch, start)]
        if not self._gpu:
            for images, labels, indices in self._loader:
                yield self._output(self.normalize(images), labels, indices)
            return
        if self.decode == "host":
            prepare, name = self._upload, "fastkd-h2d"
        else:
            prepare, name = self._device_decoder(epoch, self.resolution), "fastkd-nvjpeg"
        yield from self._side_stream(iter(self._loader), prepare, name)

    def _upload(self, images, labels, indices):
        """Host decode: the pinned uint8 batch -> normalised on the GPU (queued, not waited for)."""
        return (*upload(images, labels, self.spec.device, self.normalize), indices)

    def _device_decoder(self, epoch: int, resolution: int):
        """Device decode: a batch's JPEG bytes -> nvJPEG (batched), crop/resize/flip and
        normalisation on the GPU (nvJPEG holds the GIL little)."""
        s, device = self.spec, self.spec.device

        def decode_batch(data, labels, indices):
            images = decode_jpegs(data, device)
            batch = augment(images, indices, s.seed, epoch, s.train, resolution, self.batched_resize, self.crop_fn)
            return self.normalize(batch), to_device(labels, device), indices  # labels: pinned, then async

        return decode_batch

    def _side_stream(self, raw, prepare, name: str):
        """`prepare(*item) -> (images, labels, indices)` for each worker item, queued on a side
        CUDA stream in a thread, two batches ahead of the step; `fastkd.data.prefetch` hands each
        batch over without a host sync."""
        device = self.spec.device
        stream = torch.cuda.Stream(device)

        def make():  # runs in the prefetch thread only
            with torch.cuda.device(device), torch.cuda.stream(stream):
                for item in raw:
                    images, labels, indices = prepare(*item)
                    done = torch.cuda.Event()
                    done.record(stream)
                    yield images, labels, indices, done

        for images, labels, indices in prefetched(make(), depth=2, name=name):
            yield self._output(images, labels, indices)
