"""The backend-independent loader options and augmentation constants (no fastkd.data imports).

`LoaderSpec` holds what `build_loader` validated; the constants fix the augmentation every
backend implements (transforms.py, the backends' pipelines). This module imports nothing from
fastkd.data, so transforms.py and contract.py can both import it at the top.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Literal

import torch

from fastkd.errors import FastKDError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALE = (0.08, 1.0)  # RandomResizedCrop area fraction
TRAIN_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (w / h)
VAL_CROP_RATIO = 0.875  # val: centre square of side 0.875 * shorter side, resized to r
FLIP_PROB = 0.5


@dataclass(frozen=True)
class Backend:
    """One loader backend: all that build_loader, the config and the benchmarks know of it."""

    format: str | None  # packed format it reads: "ffcv" (.beton), "dali" (WebDataset shards); None: source folder
    options: frozenset[str]  # the keyword options (backend_opts) its loader takes
    loader: str  # "module:Class"; imported only when built, as ffcv, DALI and nvImageCodec are optional
    install: str | None  # what to install where the module's available() says no; None: torch suffices
    val: str  # what its val batches are, printed by `fastkd eval` (backends resize differently)

    @property
    def module(self) -> str:
        return self.loader.partition(":")[0]

    def loader_class(self) -> type:
        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)

    def why_unavailable(self) -> str | None:
        """None where it can run here, else why not (imports the optional package)."""
        return None if self.install is None else importlib.import_module(self.module).available()


# Every backend crops the same centre box (transforms.center_crop_box) for val, but FFCV's decoder
# resizes with OpenCV INTER_AREA and has no antialiased bilinear, so its top-1 can differ from
# the others' by up to about 1 point.
_SAME_BOX = f"centre square int({VAL_CROP_RATIO} x shorter side) of the packed JPEG"
_BILINEAR = f"{_SAME_BOX}, antialiased bilinear resize"
# The one list of loader backends: build_loader, DataConfig.backend, the CLIs' --backend choices
# and the benchmarks' --backends all derive from it. Order = the order of error messages and help.
LOADERS: dict[str, Backend] = {
    "ffcv": Backend(
        format="ffcv", options=frozenset({"os_cache", "order", "batches_ahead"}),
        loader="fastkd.data.ffcv_loader:FFCVLoader",
        install="FFCV (`bash scripts/setup.sh`, or `pip install -e .[ffcv]` after installing libturbojpeg0-dev, "
                "libopencv-dev and pkg-config)",
        val=f"{_SAME_BOX}, OpenCV INTER_AREA resize (FFCV's own; top-1 may differ from torch/dali by ~1 point)"),
    "dali": Backend(
        format="dali", options=frozenset({"shuffle", "initial_fill", "hw_decoder_load", "device_memory_padding",
                                          "host_memory_padding", "prefetch_queue_depth"}),
        loader="fastkd.data.dali_loader:DALILoader",
        install="NVIDIA DALI (`pip install nvidia-dali-cuda130`, or `pip install -e .[dali]`)", val=_BILINEAR),
    "torch": Backend(
        format="dali", options=frozenset({"prefetch_factor", "batched_resize", "decode"}),
        loader="fastkd.data.torch_loader:TorchLoader", install=None, val=_BILINEAR),
    "folder": Backend(
        format=None, options=frozenset({"source"}), loader="fastkd.data.folder_loader:FolderLoader", install=None,
        val=f"the source files: shorter side to int(r / {VAL_CROP_RATIO}), centre r x r, antialiased (PIL)"),
    "nvimgcodec": Backend(  # importable; without the GPU's engines build_loader falls back to torch
        format="dali", options=frozenset({"decoders", "hw_decoder_load", "batches_ahead", "batched_resize"}),
        loader="fastkd.data.nvimgcodec_loader:NvImgCodecLoader",
        install="nvImageCodec (`pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg`; DALI brings both)",
        val=_BILINEAR),
}
BACKENDS = tuple(LOADERS)
AUTO = "auto"  # not a backend: build_loader picks one of BACKENDS by fastkd.data.auto's rule
BACKEND_CHOICES = (*BACKENDS, AUTO)  # what --backend and data.backend accept
BackendName = Literal[BACKEND_CHOICES]  # for typed configs (DataConfig.backend): help and checks read it


def val_pipeline(loader) -> str:
    """'BACKEND: what its val batches are' for a loader built by build_loader (its module names
    the backend, also after `auto` or a fallback chose it)."""
    module = type(loader).__module__
    name = next((n for n, b in LOADERS.items() if b.module == module),
                module.rsplit(".", 1)[-1].removesuffix("_loader"))
    return f"{name}: {LOADERS[name].val if name in LOADERS else 'a loader of your own'}"


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
