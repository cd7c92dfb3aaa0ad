"""Loaders: a packed directory -> normalised channels_last batches on the device, five backends.

    from fastkd.data import build_loader
    loader = build_loader("packed/", "train", "ffcv", batch_size=256, resolution=176,
                          device="cuda", dtype="bf16", rank=rank, world_size=world_size, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch); loader.set_resolution(res(epoch))
        for images, labels in loader: ...

Backends (contract: docs/CONTRACTS.md "Loaders"; details in each module's docstring):
  ffcv    .beton via FFCV (JIT CPU decode+crop)        options: os_cache, order, batches_ahead
  dali    shards via DALI (GPU "mixed" decode or CPU)  options: shuffle, initial_fill, hw_decoder_load,
                                                                device_memory_padding, host_memory_padding,
                                                                prefetch_queue_depth
  torch   shards via torchvision decode_jpeg (nvJPEG on cuda)   options: prefetch_factor, batched_resize,
                                                                decode ("auto" | "device": nvJPEG |
                                                                "host": workers, also on cuda)
  folder  source JPEG folder via ImageFolder + PIL     options: source
  nvimgcodec  shards via nvImageCodec, crop windows only (GPU JPEG engines, CUDA or CPU decoders)
                                                       options: decoders, hw_decoder_load, batches_ahead,
                                                                batched_resize
  auto    not a backend: picks one by fastkd.data.auto's rule and prints the choice once
nvimgcodec falls back to torch (one line on stderr says why) where the package, the GPU's JPEG
engines (decoders="hw", the default) or CUDA (decoders="gpu") are missing; decoders="cpu" falls
back to torch's decode="host" (the host cores still decode).
Common options: verify (sha256 of the backend's files before the first batch; sizes are always
checked), expected_classes (class count, WNIDs in label order, or a manifest's `classes`),
return_indices (also yield the samples' pack indices).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastkd.data.auto import choose_backend
from fastkd.data.contract import Loader, LoaderSpec, parse_device
from fastkd.data.packed import open_packed, shard_paths
from fastkd.data.spec import AUTO, BACKEND_CHOICES, BACKENDS, LOADERS
from fastkd.errors import FastKDError
from fastkd.notes import say
from fastkd.packformat import load_manifest, split_files

__all__ = ["build_loader", "available_backends", "Loader", "BACKENDS"]


def available_backends() -> list[str]:
    return [name for name, b in LOADERS.items() if b.why_unavailable() is None]


def build_loader(data_dir, split: str, backend: str, batch_size: int, resolution: int,
                 device: torch.device | str, dtype: torch.dtype | str, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int | None = None, drop_last: bool | None = None, *,
                 verify: bool = False, expected_classes: Sequence | int | None = None,
                 return_indices: bool = False, **backend_opts) -> Loader:
    """A loader for `split` of the packed directory `data_dir` (see the module docstring)."""
    chosen = ""
    if backend == AUTO:
        formats = load_manifest(data_dir).get("params", {}).get("formats") or ["ffcv", "dali"]
        backend, why = choose_backend(parse_device(device), formats)
        chosen = " (chosen by --backend auto)"
        say(f"fastkd: loader backend auto -> {backend} ({why})", once=True, rank=int(rank))
    if backend not in LOADERS:
        raise FastKDError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    unknown = sorted(set(backend_opts) - LOADERS[backend].options)
    if unknown:
        raise FastKDError(f"backend {backend!r}{chosen} does not take option(s) {unknown}; "
                          f"it takes {sorted(LOADERS[backend].options)}")
    if backend == "nvimgcodec":
        backend, backend_opts = _nvimgcodec_or_torch(parse_device(device), int(rank), backend_opts)
    why = LOADERS[backend].why_unavailable()
    if why is not None:
        others = [b for b in available_backends() if b != backend]
        raise FastKDError(f"backend {backend!r} cannot run here: {why}. Install {LOADERS[backend].install}; "
                          f"backends that work on this machine: {', '.join(others)}")
    if backend == "torch" and num_workers is None:  # host decode on CUDA: every core but one
        from fastkd.data.torch_loader import default_workers
        num_workers = default_workers(parse_device(device), backend_opts.get("decode", "auto"))
    spec = LoaderSpec.make(data_dir, split, batch_size, resolution, device, dtype, rank, world_size, seed,
                           num_workers, drop_last, return_indices)
    fmt = LOADERS[backend].format
    manifest = open_packed(data_dir, split, fmt, verify=verify, expected_classes=expected_classes)
    return LOADERS[backend].loader_class()(spec, manifest, *_inputs(data_dir, manifest, split, fmt), **backend_opts)


def _inputs(data_dir, manifest: dict, split: str, fmt: str | None) -> tuple:
    """The files a loader reading packed format `fmt` takes after (spec, manifest): the .beton
    path, the WebDataset shard paths, or none (folder reads the manifest's source tree)."""
    if fmt == "ffcv":
        return (str(split_files(data_dir, manifest, split, "ffcv")[0]),)
    return (shard_paths(data_dir, manifest, split),) if fmt == "dali" else ()


def _nvimgcodec_or_torch(device, rank: int, opts: dict) -> tuple[str, dict]:
    """("nvimgcodec", opts), or where it cannot run here ("torch", the options torch shares)
    after one line on stderr saying why (once per process, rank 0)."""
    from fastkd.data.nvimgcodec_loader import why_not

    why = why_not(device, opts.get("decoders", "hw"))
    if why is None:
        return "nvimgcodec", opts
    torch_opts = {k: v for k, v in opts.items() if k in LOADERS["torch"].options}
    if opts.get("decoders") == "cpu":  # host cores were asked for: torch decodes there too
        torch_opts["decode"] = "host"
    host = device.type != "cuda" or torch_opts.get("decode") == "host"
    decoder = "libjpeg-turbo on the host cores" if host else "nvJPEG on the GPU"
    say(f"fastkd: loader backend nvimgcodec falls back to torch: {why}; the torch backend reads the same "
        f"shards with the same crops, decoded by {decoder}", once=True, rank=rank)
    return "torch", torch_opts
