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

from fastkd.data.spec import FLIP_PROB, IMAGENET_MEAN, IMAGENET_STD, TRAIN_RATIO, TRAIN_SCALE, VAL_CROP_RATIO

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


# ----------------------------------------------------------------------------- batched crop + resize

# Per chunk, the gathered crops (float) plus their int64 gather index take 12 bytes per element:
# 2**24 elements is about 200 MB, whatever the batch size or image size.
CHUNK_ELEMENTS = 1 << 24


def aa_weights(lengths: torch.Tensor, size: int, span: int) -> torch.Tensor:
    """float32 [n] input lengths -> float32 [n, size, span]: row i holds the weights output pixel i
    gives input pixels 0..span-1 under `interpolate(mode="bilinear", antialias=True,
    align_corners=False)` along one axis (a triangle filter widened by the downscale factor,
    normalised over the pixels inside the input, so edges clamp); zero at and beyond each length."""
    device = lengths.device
    scale = lengths / size
    down = scale >= 1
    invscale = torch.where(down, 1 / scale, torch.ones_like(scale))
    center = scale[:, None] * (torch.arange(size, device=device, dtype=torch.float32) + 0.5)
    pos = torch.arange(span, device=device, dtype=torch.float32) + 0.5
    w = (1 - ((pos - center[:, :, None]) * invscale[:, None, None]).abs()).clamp_(min=0)
    w = w.masked_fill_(pos >= lengths[:, None, None], 0)
    return w.div_(w.sum(-1, keepdim=True))


def _chunks(hs: list[int], ws: list[int], budget: int) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """Images sorted by crop size, cut into runs whose padded crops [n, 3, max h, max w] stay
    within `budget` elements: (order, [(start, end, max h, max w)])."""
    order = sorted(range(len(hs)), key=lambda k: (hs[k], ws[k]))
    runs, start, mh, mw = [], 0, 0, 0
    for pos, k in enumerate(order):
        h, w = max(mh, hs[k]), max(mw, ws[k])
        if pos > start and (pos - start + 1) * 3 * h * w > budget:
            runs.append((start, pos, mh, mw))
            start, h, w = pos, hs[k], ws[k]
        mh, mw = h, w
    runs.append((start, len(order), mh, mw))
    return order, runs


def crop_resize_batch(images: list[torch.Tensor], boxes: list[Box], flips: list[bool], size: int,
                      compute_dtype: torch.dtype | None = None,
                      chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`crop_resize` for a whole batch in a few kernels per chunk (no per-image launches except
    the flattening `torch.cat`): uint8 [3,H_i,W_i] images, all on one device -> uint8
    [B,3,size,size] channels_last.

    The antialiased bilinear resize is separable, so crop i resized is `Ay_i @ crop_i @ Ax_i^T`
    with Ay_i [size, h_i] and Ax_i [size, w_i] the weights `interpolate(antialias=True)` uses
    (`aa_weights`). Images are sorted by crop size and taken in chunks (`chunk_elements` bounds
    the padded crops of a chunk); per chunk: one cat of the flattened images, one gather of the
    crops into [n,3,max h,max w] (padding holds neighbouring pixels, weighted zero), weights for
    both axes, two batched matmuls. Then one permutation back to batch order, rounding, and the
    flips as a `torch.where` on the mirrored batch (an exact mirror).

    `compute_dtype`: float16 on CUDA by default (tensor cores; uint8 inputs are exact in it, the
    weights and the intermediate rounding cost at most ~0.3 of a level before the final round),
    float32 on CPU. Values then match `crop_resize` within 1 level (float32: the same filter, only
    summation order differs; the CPU uint8 kernel of `crop_resize` uses fixed-point weights, also
    within 1 level). The dense matmuls spend ~2 * 3 * h * w * size FLOPs per image (~0.2 GFLOP
    at 300 px -> 224): negligible on a GPU, slower than `crop_resize` on CPU.
    """
    n = len(images)
    device = images[0].device
    if compute_dtype is None:
        compute_dtype = torch.float16 if device.type == "cuda" else torch.float32
    hs, ws = [b[2] for b in boxes], [b[3] for b in boxes]
    order, runs = _chunks(hs, ws, chunk_elements)
    # per image, in sorted order: flat offset in its chunk, H*W, W, top, left, h, w, batch slot
    rows, offset = [], 0
    for start, end, _, _ in runs:
        offset = 0
        for k in order[start:end]:
            _, height, width = images[k].shape
            top, left, h, w = boxes[k]
            rows.append((offset, height * width, width, top, left, h, w, k))
            offset += 3 * height * width
    params = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    channel = torch.arange(3, device=device).view(1, 3, 1, 1)
    results = []
    for start, end, mh, mw in runs:
        p = params[start:end]
        off, plane, width, top, left, h, w = (p[:, j] for j in range(7))
        flat = torch.cat([images[k].reshape(-1) for k in order[start:end]])
        ys = torch.arange(mh, device=device)
        xs = torch.arange(mw, device=device)
        rowbase = off[:, None] + (top[:, None] + ys) * width[:, None] + left[:, None]  # [m, mh]
        index = (rowbase[:, None, :, None] + channel * plane.view(-1, 1, 1, 1)) + xs  # [m, 3, mh, mw]
        crops = flat.take(index.clamp_(0, flat.numel() - 1)).to(compute_dtype)
        m = end - start
        weights = aa_weights(torch.cat([h, w]).to(torch.float32), size, max(mh, mw)).to(compute_dtype)
        ay, ax = weights[:m, :, :mh], weights[m:, :, :mw]
        out = torch.bmm(crops.view(m, 3 * mh, mw), ax.transpose(1, 2)).view(m, 3, mh, size)
        results.append(torch.matmul(ay.unsqueeze(1), out))  # [m, 3, size, size]
    out = torch.cat(results) if len(results) > 1 else results[0]
    batch = torch.empty_like(out).index_copy_(0, params[:, 7], out)
    batch = batch.round_().clamp_(0, 255).to(torch.uint8)
    if any(flips):
        mask = torch.tensor(flips, dtype=torch.bool).to(device, non_blocking=True).view(n, 1, 1, 1)
        batch = torch.where(mask, batch.flip(-1), batch)
    return batch.contiguous(memory_format=torch.channels_last)


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
    torch, and bit-identical to the same float32 arithmetic done by torch on the CPU, rounded
    once to `dtype` (on CUDA that arithmetic may differ by up to 2 ulps in fp32 output; bf16 and
    fp16 outputs agree).
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
