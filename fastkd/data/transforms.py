"""Crop geometry shared by the backends that compute it themselves (torch, nvimgcodec, dali's
train boxes; folder uses torchvision's).

Boxes are (top, left, height, width) in source pixels; the box is then resized to r x r.
Train: torchvision's RandomResizedCrop algorithm (10 tries of area in TRAIN_SCALE and log-uniform
aspect in TRAIN_RATIO, else a centre crop clamped to the ratio range), then a flip with p=0.5.
Val: the centre square of side int(0.875 * shorter side), resized to r: the same pixels as
"resize the shorter side to r / 0.875 then centre-crop r", and the box FFCV's
CenterCropRGBImageDecoder uses.

Randomness is counter-based: draw d of sample i is a splitmix64 hash of (seed, epoch, i, d), so a
sample's crop depends only on (seed, epoch, pack index), not on which worker or batch slot
handled it, and a whole batch is drawn with a handful of numpy array operations (`train_boxes`),
not a generator per sample. `train_params` is the same draw for one sample.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastkd.data.spec import FLIP_PROB, IMAGENET_MEAN, IMAGENET_STD, TRAIN_RATIO, TRAIN_SCALE, VAL_CROP_RATIO
from fastkd.errors import FastKDError

Box = tuple[int, int, int, int]

# ----------------------------------------------------------------------------- counter-based draws

TRIES = 10  # RandomResizedCrop's attempts
# per sample: TRIES area draws, TRIES aspect draws, then top, left, flip
_AREA, _ASPECT, _TOP, _LEFT, _FLIP = 0, TRIES, 2 * TRIES, 2 * TRIES + 1, 2 * TRIES + 2
DRAWS = 2 * TRIES + 3
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a bijection that spreads
    every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices, draws: int = DRAWS) -> np.ndarray:
    """float64 [B, draws] in [0, 1): row b holds draws 0..draws-1 of sample indices[b] for
    (seed, epoch). Chained splitmix64: key(seed, epoch) -> key of each sample -> each draw, so a
    value depends on (seed, epoch, index, draw) only."""
    index = np.asarray(indices, dtype=np.int64).reshape(-1).astype(np.uint64)
    key = _mix64(np.array([int(seed) & _MASK64], np.uint64) + _GOLDEN)  # [1]
    key = _mix64(key + np.array([int(epoch) & _MASK64], np.uint64) * _GOLDEN)  # [1]
    sample = _mix64(key + (index + np.uint64(1)) * _GOLDEN)  # [B]
    bits = _mix64(sample[:, None] + np.arange(1, draws + 1, dtype=np.uint64) * _GOLDEN)  # [B, draws]
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # top 53 bits


# ----------------------------------------------------------------------------- boxes


def _fallback_boxes(heights: np.ndarray, widths: np.ndarray, ratio) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop's fallback (h, w): the whole image, clamped to the ratio range."""
    in_ratio = widths / heights
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    h = np.where(narrow, np.rint(widths / min(ratio)), heights)
    w = np.where(wide, np.rint(heights * max(ratio)), widths)
    return h, w


def rrc_boxes(u: np.ndarray, heights, widths, scale=TRAIN_SCALE, ratio=TRAIN_RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params over a batch: u float64 [B, >= 2*TRIES+2]
    uniforms (columns as in `DRAWS`), heights/widths [B] -> int64 [B, 4] (top, left, h, w).

    All 10 tries are computed at once; each sample takes its first try that fits (h, w in
    1..H, 1..W), placed uniformly at random, else the centre-crop fallback. A fixed number of
    numpy calls whatever B (no per-sample Python)."""
    H = np.asarray(heights, dtype=np.float64).reshape(-1, 1)  # [B, 1]
    W = np.asarray(widths, dtype=np.float64).reshape(-1, 1)
    if H.shape != W.shape or np.minimum.reduce(np.minimum(H, W), axis=None, initial=1) < 1:
        raise FastKDError(f"crop boxes need one height and one width >= 1 per image, got {heights}, {widths}")
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA:_AREA + TRIES])  # [B, TRIES]
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, _ASPECT:_ASPECT + TRIES])
    w = np.rint(np.sqrt(area * aspect))  # rint rounds half to even, as Python's round()
    h = np.rint(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)  # [B, TRIES]
    rows, first = np.arange(len(H)), fits.argmax(axis=1)  # the first try that fits (0 if none does)
    found, h, w = fits[rows, first], h[rows, first], w[rows, first]  # [B]
    H, W = H[:, 0], W[:, 0]
    fh, fw = _fallback_boxes(H, W, ratio)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    # uniform position in 0..H-h (u < 1, so floor(u * (H-h+1)) <= H-h; the min guards rounding);
    # the fallback is centred
    top = np.where(found, np.minimum(np.floor(u[:, _TOP] * (H - h + 1)), H - h), (H - h) // 2)
    left = np.where(found, np.minimum(np.floor(u[:, _LEFT] * (W - w + 1)), W - w), (W - w) // 2)
    out = np.empty((len(H), 4), np.int64)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = top, left, h, w
    return out


def train_boxes(seed: int, epoch: int, indices, heights, widths) -> tuple[np.ndarray, np.ndarray]:
    """A batch's train crops: (int64 [B, 4] boxes (top, left, h, w), bool [B] flips), each
    sample's from (seed, epoch, its pack index) only."""
    u = uniforms(seed, epoch, indices)
    return rrc_boxes(u, heights, widths), u[:, _FLIP] < FLIP_PROB


def train_params(seed: int, epoch: int, index: int, height: int, width: int) -> tuple[Box, bool]:
    """One sample's `train_boxes`: ((top, left, h, w) as ints, flip)."""
    boxes, flips = train_boxes(seed, epoch, [index], [height], [width])
    return tuple(boxes[0].tolist()), bool(flips[0])


def center_boxes(heights, widths, ratio: float = VAL_CROP_RATIO) -> np.ndarray:
    """int64 [B, 4]: each image's centre square of side int(ratio * shorter side), at least 1."""
    H = np.asarray(heights, dtype=np.int64).reshape(-1)
    W = np.asarray(widths, dtype=np.int64).reshape(-1)
    side = np.maximum(1, (ratio * np.minimum(H, W)).astype(np.int64))  # astype truncates, as int()
    return np.stack([(H - side) // 2, (W - side) // 2, side, side], axis=1)


def center_crop_box(height: int, width: int, ratio: float = VAL_CROP_RATIO) -> Box:
    side = max(1, int(ratio * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


def crop_params(shapes, indices, seed: int, epoch: int, train: bool,
                crop_fn=None) -> tuple[np.ndarray, np.ndarray]:
    """A batch's crops: shapes [B] of (H, W), pack indices [B] -> (int64 [B, 4] boxes, bool [B]
    flips): train boxes drawn (`train_boxes`) or, when given, crop_fn(epoch, index, H, W) ->
    (box, flip) per sample (a teacher cache's views); val: centre squares, no flip."""
    shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    n = len(shapes)
    if train and crop_fn is not None:
        given = [crop_fn(epoch, int(i), int(h), int(w)) for (h, w), i in zip(shapes.tolist(), indices)]
        return (np.array([b for b, _ in given], np.int64).reshape(n, 4),
                np.array([f for _, f in given], bool).reshape(n))
    if train:
        return train_boxes(seed, epoch, indices, shapes[:, 0], shapes[:, 1])
    return center_boxes(shapes[:, 0], shapes[:, 1]), np.zeros(n, bool)


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


# ----------------------------------------------------------------------------- host -> device


def pinned_for(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor ready for `.to(device, non_blocking=True)`: page-locked when the target is
    not the CPU (a copy from pageable memory is synchronous in practice), as it is otherwise."""
    return tensor if torch.device(device).type == "cpu" else tensor.pin_memory()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor -> `device`, asynchronously from pinned memory (no copy on CPU)."""
    return pinned_for(tensor, device).to(device, non_blocking=True)


# ----------------------------------------------------------------------------- batched crop + resize

# Per chunk, the gathered uint8 crops plus their float copy take 3 (float16) to 5 (float32) bytes
# per element: 2**25 elements is 100-170 MB, whatever the batch size or image size.
CHUNK_ELEMENTS = 1 << 25
# columns of crop_resize_batch's parameter table, one row per image in chunk (sorted) order
_BASE, _PLANE, _STRIDE, _H, _W, _SLOT, _FLIP_COL = range(7)


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


def _chunks(hs: np.ndarray, ws: np.ndarray, budget: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Crops sorted by (h, w), cut greedily into runs whose padded crops [m, 3, max h, max w] stay
    within `budget` elements: (order [n], [(start, end, max h, max w)]). One numpy pass per run."""
    order = np.lexsort((ws, hs))
    hs, ws = hs[order], ws[order]
    runs, start, n = [], 0, len(order)
    while start < n:
        mh, mw = hs[start:], np.maximum.accumulate(ws[start:])  # a run's max h is its last h
        cost = 3 * np.arange(1, n - start + 1) * mh * mw  # nondecreasing in the run's length
        m = max(1, int(np.searchsorted(cost, budget, side="right")))
        runs.append((start, start + m, int(mh[m - 1]), int(mw[m - 1])))
        start += m
    return order, runs


def _check_boxes(shapes: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> None:
    """shapes [n, 3] (C, H, W), boxes [n, 4], flips [n]: a clear error for a box outside its image."""
    n = len(shapes)
    if boxes.shape != (n, 4) or flips.shape != (n,):
        raise FastKDError(f"crop_resize_batch needs one (top, left, h, w) box and one flip per image: "
                          f"{n} images, boxes {boxes.shape}, flips {flips.shape}")
    top, left, h, w = boxes.T
    bad = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > shapes[:, 1]) | (left + w > shapes[:, 2])
    if (shapes[:, 0] != 3).any() or bad.any():
        k = int(np.argmax(bad | (shapes[:, 0] != 3)))
        raise FastKDError(f"image {k} of shape {tuple(shapes[k])} cannot take crop box {tuple(boxes[k])} "
                          f"(images are [3, H, W]; boxes (top, left, h, w) inside them)")


def _table(shapes: np.ndarray, boxes: np.ndarray, flips: np.ndarray, order: np.ndarray) -> torch.Tensor:
    """int64 [n, 7] CPU, rows in chunk order: the flat offset of the crop's first pixel
    (image offset + top * W + left), H * W, W, h, w, batch slot, flip."""
    planes = shapes[:, 1] * shapes[:, 2]
    offsets = np.cumsum(3 * planes) - 3 * planes  # each image's start in the flattened batch
    top, left, h, w = boxes.T
    table = np.stack([offsets + top * shapes[:, 2] + left, planes, shapes[:, 2], h, w,
                      np.arange(len(shapes)), flips.astype(np.int64)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(table[order]))


def _flatten(images: list[torch.Tensor], total: int, pad: int) -> torch.Tensor:
    """uint8 [total + pad]: every image's pixels (C, H, W order) one after another, then `pad`
    zeros, in one op (`_chunk_cat` writes the concatenation of the flattened images)."""
    flat = torch.empty(total + pad, dtype=torch.uint8, device=images[0].device)
    if hasattr(torch, "_chunk_cat"):
        torch._chunk_cat(images, 0, 1, out=flat[:total].view(1, total))
    else:  # older torch: a view per image, one cat
        torch.cat([im.reshape(-1) for im in images], out=flat[:total])
    flat[total:].zero_()  # read only where a window runs past the last image: weighted zero
    return flat


def _chunk(flat: torch.Tensor, rowbase: torch.Tensor, stride: torch.Tensor, lengths: torch.Tensor,
           mh: int, mw: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """One chunk of m crops -> float [m, 3, size, size].

    rowbase int64 [m, 3]: flat offset of each crop's first pixel per channel; stride [m]: image
    widths; lengths float32 [2, m]: crop heights and widths. Rows are gathered as windows of mw
    pixels of `flat` (an unfold view, so the index is [m, 3, mh], not one entry per pixel); rows
    and columns past a crop's h, w hold other pixels, weighted zero by `aa_weights`."""
    m = rowbase.shape[0]
    windows = flat.unfold(0, mw, 1)  # [len - mw + 1, mw]: row s = flat[s:s + mw], no copy
    ys = torch.arange(mh, device=flat.device)
    starts = rowbase[:, :, None] + (ys * stride[:, None])[:, None, :]  # [m, 3, mh]
    crops = windows[starts.clamp_(max=windows.shape[0] - 1)].to(dtype)  # [m, 3, mh, mw]
    weights = aa_weights(lengths.reshape(-1), size, max(mh, mw)).to(dtype)  # [2m, size, span]
    ay, ax = weights[:m, :, :mh], weights[m:, :, :mw]
    out = torch.bmm(crops.view(m, 3 * mh, mw), ax.transpose(1, 2)).view(m, 3, mh, size)
    return torch.matmul(ay.unsqueeze(1), out)  # [m, 3, size, size]


def crop_resize_batch(images: list[torch.Tensor], boxes, flips, size: int,
                      compute_dtype: torch.dtype | None = None,
                      chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`crop_resize` for a whole batch in a fixed number of ops per chunk, whatever the batch
    size: uint8 [3,H_i,W_i] images, all on one device, boxes [B, 4] (top, left, h, w) and flips
    [B] (sequences or numpy arrays) -> uint8 [B,3,size,size] channels_last.

    The antialiased bilinear resize is separable, so crop i resized is `Ay_i @ crop_i @ Ax_i^T`
    with Ay_i [size, h_i] and Ax_i [size, w_i] the weights `interpolate(antialias=True)` uses
    (`aa_weights`). Host work: one numpy table of every image's parameters (`_table`), copied to
    the device once from pinned memory; one op flattening all images into one buffer. Images are
    sorted by crop size and taken in chunks (`chunk_elements` bounds the padded crops of a
    chunk); per chunk: a gather of the crops' rows, weights for both axes, two batched matmuls.
    Then rounding, the flips as a `torch.where` on the mirrored batch (an exact mirror) and one
    index_copy back to batch order.

    `compute_dtype`: float16 on CUDA by default (tensor cores; uint8 inputs are exact in it, the
    weights and the intermediate rounding cost at most ~0.3 of a level before the final round),
    float32 on CPU. Values then match `crop_resize` within 1 level (float32: the same filter, only
    summation order differs; the CPU uint8 kernel of `crop_resize` uses fixed-point weights, also
    within 1 level). The dense matmuls spend ~2 * 3 * h * w * size FLOPs per image (~0.2 GFLOP
    at 300 px -> 224): negligible on a GPU, slower than `crop_resize` on CPU.
    """
    if not images:
        raise FastKDError("crop_resize_batch needs at least one image")
    device = images[0].device
    if compute_dtype is None:
        compute_dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        shapes = np.array([im.shape for im in images], dtype=np.int64).reshape(len(images), 3)  # [n, 3]
    except ValueError:
        raise FastKDError("crop_resize_batch takes uint8 [3, H, W] images") from None
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    flips = np.asarray(flips, dtype=bool).reshape(-1)
    _check_boxes(shapes, boxes, flips)
    order, runs = _chunks(boxes[:, 2], boxes[:, 3], chunk_elements)
    params = to_device(_table(shapes, boxes, flips, order), device)  # [n, 7], chunk order
    flat = _flatten(images, int(3 * (shapes[:, 1] * shapes[:, 2]).sum()), int(boxes[:, 3].max()))
    channel = torch.arange(3, device=device)
    rowbase = params[:, _BASE, None] + channel * params[:, _PLANE, None]  # [n, 3]
    lengths = params[:, _H:_W + 1].t().to(torch.float32)  # [2, n]: crop heights, widths
    stride = params[:, _STRIDE]
    results = [_chunk(flat, rowbase[a:b], stride[a:b], lengths[:, a:b], mh, mw, size, compute_dtype)
               for a, b, mh, mw in runs]
    out = torch.cat(results) if len(results) > 1 else results[0]
    out = out.round_().clamp_(0, 255).to(torch.uint8)  # [n, 3, size, size], chunk order
    if flips.any():
        mask = params[:, _FLIP_COL].bool().view(-1, 1, 1, 1)
        out = torch.where(mask, out.flip(-1), out)
    batch = torch.empty_like(out).index_copy_(0, params[:, _SLOT], out)
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


def mean_std_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std in uint8 units, float32 [1,3,1,1] on `device`."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize_uint8(images: torch.Tensor, dtype: torch.dtype, mean_std=None) -> torch.Tensor:
    """uint8 [B,3,r,r] (any layout, on its device) -> (x - mean) / std in `dtype`, channels_last:
    what every loader hands the step (Loader.normalize) and what a teacher cache's teacher sees.

    Values are the float32 results rounded once to `dtype`. CPU: one table-lookup pass
    (normalize_uint8_cpu); elsewhere float32 arithmetic, then the cast. `mean_std`: the device's
    mean_std_255, kept by a caller that normalises every batch (made here when None).
    """
    if images.device.type == "cpu":
        return normalize_uint8_cpu(images, dtype)
    mean, std = mean_std_255(images.device) if mean_std is None else mean_std
    out = images.to(dtype=torch.float32, memory_format=torch.channels_last)
    return out.sub_(mean).div_(std).to(dtype)
