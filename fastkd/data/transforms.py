"""Crop geometry shared by the backends that compute it themselves (torch; folder uses torchvision's).

Boxes are (top, left, height, width) in source pixels; the box is then resized to r x r.
Train: torchvision's RandomResizedCrop algorithm (10 tries of area in TRAIN_SCALE and log-uniform
aspect in TRAIN_RATIO, else a centre crop clamped to the ratio range), then a flip with p=0.5.
Val: the centre square of side int(0.875 * shorter side), resized to r: the same pixels as
"resize the shorter side to r / 0.875 then centre-crop r", and the box FFCV's
CenterCropRGBImageDecoder uses.

Per-sample randomness comes from a generator keyed by (seed, epoch, pack index), so a sample's
crop does not depend on which worker or batch slot handled it: same seed, same crops.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastkd.data.contract import FLIP_PROB, IMAGENET_MEAN, IMAGENET_STD, TRAIN_RATIO, TRAIN_SCALE, VAL_CROP_RATIO

Box = tuple[int, int, int, int]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale=TRAIN_SCALE, ratio=TRAIN_RATIO) -> Box:
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, ratio: float = VAL_CROP_RATIO) -> Box:
    side = max(1, int(ratio * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


def train_params(seed: int, epoch: int, index: int, height: int, width: int) -> tuple[Box, bool]:
    rng = sample_rng(seed, epoch, index)
    box = random_resized_crop_box(rng, height, width)
    return box, bool(rng.random() < FLIP_PROB)


def crop_resize(image: torch.Tensor, box: Box, size: int, flip: bool) -> torch.Tensor:
    """uint8 [3,H,W] (CPU or CUDA) -> uint8 [1,3,size,size] channels_last: crop `box`, antialiased
    bilinear resize, optional horizontal flip."""
    top, left, h, w = box
    crop = image[:, top:top + h, left:left + w].unsqueeze(0)
    if image.device.type == "cpu":
        # uint8 antialiased bilinear has a fast (AVX) CPU kernel for channels_last input
        out = torch.nn.functional.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(size, size),
                                              mode="bilinear", antialias=True, align_corners=False)
    else:
        out = torch.nn.functional.interpolate(crop.float(), size=(size, size),
                                              mode="bilinear", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    out = out.flip(-1) if flip else out
    return out.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- normalisation on CPU

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_tables: dict[torch.dtype, np.ndarray] = {}


def _lut_kernel():
    from numba import njit, prange

    @njit(parallel=True, nogil=True, cache=True)
    def lut(src, table, dst):  # src [B, P*3] uint8 (NHWC), table [256, 3], dst [B, P*3]
        for i in prange(src.shape[0]):
            s, d = src[i], dst[i]
            for p in range(0, s.shape[0], 3):
                d[p] = table[s[p], 0]
                d[p + 1] = table[s[p + 1], 1]
                d[p + 2] = table[s[p + 2], 2]

    return lut


_lut = None


def normalize_uint8_cpu(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B,3,H,W] on CPU -> (x - mean) / std in `dtype`, channels_last, in one pass.

    A 256 x 3 table of the results, already rounded to `dtype`, is looked up per byte (numba,
    parallel over the batch): 2-3x faster than converting to float and doing the arithmetic in
    torch, and bit-identical to float32 arithmetic rounded once to `dtype`.
    """
    global _lut
    if _lut is None:
        _lut = _lut_kernel()
    if dtype not in _tables:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255
        values = (torch.arange(256, dtype=torch.float64).view(256, 1) - mean) / std
        _tables[dtype] = values.to(torch.float32).to(dtype).view(_BITS[dtype]).numpy()
    B, C, H, W = images.shape
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # a view when the input is channels_last
    out = torch.empty((B, H, W, C), dtype=_BITS[dtype])
    _lut(nhwc.view(B, -1).numpy(), _tables[dtype], out.view(B, -1).numpy())
    return out.view(dtype).permute(0, 3, 1, 2)
