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

from fastkd.data.contract import FLIP_PROB, TRAIN_RATIO, TRAIN_SCALE, VAL_CROP_RATIO

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
    """uint8 [3,H,W] (CPU or CUDA) -> uint8 [3,size,size]: crop `box`, antialiased bilinear resize."""
    top, left, h, w = box
    crop = image[:, top:top + h, left:left + w]
    if image.device.type == "cpu":
        # uint8 antialiased bilinear has a fast CPU kernel; needs a contiguous (1,C,H,W) input
        out = torch.nn.functional.interpolate(crop.unsqueeze(0).contiguous(), size=(size, size),
                                              mode="bilinear", antialias=True, align_corners=False)[0]
    else:
        out = torch.nn.functional.interpolate(crop.unsqueeze(0).float(), size=(size, size),
                                              mode="bilinear", antialias=True, align_corners=False)[0]
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(-1) if flip else out
