"""The torch backend's batched crop + resize (`transforms.crop_resize_batch`) against the per-image
path (`transforms.crop_resize`) on the same decoded images, boxes and flips.

Tolerances, in grey levels (1 level = about 0.017 in normalised units):
- float32 batched vs the float per-image resize (what `crop_resize` does on CUDA): the same filter,
  only the summation order differs: at most 1 level, on under 1% of the pixels.
- vs the CPU uint8 kernel of `crop_resize` (fixed-point weights): at most 1 level, mean < 0.3.
- float16 batched (the CUDA default): at most 1 level, mean < 0.15.
In normalised units all of these are mean |diff| < 0.006 and max < 0.02 (brief: mean < 0.05).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastkd.data.spec import IMAGENET_STD
from fastkd.data.transforms import (aa_weights, center_crop_box, crop_resize, crop_resize_batch,
                                    train_params)

STD_MIN = min(IMAGENET_STD) * 255  # grey levels per normalised unit, at most


def _images(n: int, seed: int = 0, lo: int = 40, hi: int = 260) -> list[torch.Tensor]:
    """Natural-ish uint8 [3,H,W] images: smooth colour fields plus noise, random sizes."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        low = torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=gen) * 255
        smooth = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
        out.append((smooth + 20 * torch.randn(3, h, w, generator=gen)).round().clamp(0, 255).to(torch.uint8))
    return out


def _params(images, train: bool, seed: int = 0, epoch: int = 0):
    if train:
        p = [train_params(seed, epoch, i, *im.shape[1:]) for i, im in enumerate(images)]
    else:
        p = [(center_crop_box(*im.shape[1:]), False) for im in images]
    return [b for b, _ in p], [f for _, f in p]


def _float_reference(images, boxes, flips, size):
    """What `crop_resize` computes on CUDA (float antialiased bilinear, rounded), on CPU."""
    out = []
    for im, (t, l, h, w), flip in zip(images, boxes, flips):
        x = torch.nn.functional.interpolate(im[:, t:t + h, l:l + w][None].float(), size=(size, size),
                                            mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
        out.append(x.flip(-1) if flip else x)
    return torch.cat(out)


def _per_image(images, boxes, flips, size):
    return torch.cat([crop_resize(im, b, size, f) for im, b, f in zip(images, boxes, flips)])


def _diff(a, b):
    d = (a.float() - b.float()).abs()
    return d.mean().item(), d.max().item(), (d > 0).float().mean().item()


@pytest.mark.parametrize("length,size", [(300, 32), (17, 32), (32, 32), (401, 224), (100, 224), (33, 7)])
def test_weights_are_interpolates(length, size):
    """Row i of aa_weights = what interpolate(antialias=True) gives input pixels for output i."""
    eye = torch.eye(length).view(1, 1, length, length)
    ref = torch.nn.functional.interpolate(eye, size=(size, length), mode="bilinear", antialias=True,
                                          align_corners=False)[0, 0]
    w = aa_weights(torch.tensor([float(length)]), size, length + 9)[0]
    assert torch.allclose(w[:, :length], ref, atol=1e-6)
    assert not w[:, length:].any()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [24, 64])
def test_batched_matches_per_image(train, size):
    images = _images(24, seed=size + train)
    boxes, flips = _params(images, train)
    out = crop_resize_batch(images, boxes, flips, size)
    assert out.shape == (24, 3, size, size) and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last)

    mean, worst, frac = _diff(out, _float_reference(images, boxes, flips, size))
    assert worst <= 1 and frac < 0.01, (mean, worst, frac)
    mean, worst, frac = _diff(out, _per_image(images, boxes, flips, size))  # CPU uint8 kernel
    assert worst <= 1 and mean < 0.3, (mean, worst, frac)
    assert mean / STD_MIN < 0.05 and worst / STD_MIN < 0.02  # in normalised units

    half = crop_resize_batch(images, boxes, flips, size, compute_dtype=torch.float16)
    mean, worst, frac = _diff(half, out)
    assert worst <= 1 and mean < 0.15, (mean, worst, frac)


def test_flips_exactly_mirror():
    images = _images(10, seed=3)
    boxes, _ = _params(images, True)
    plain = crop_resize_batch(images, boxes, [False] * 10, 20)
    flipped = crop_resize_batch(images, boxes, [True] * 10, 20)
    mixed = [k % 3 == 0 for k in range(10)]
    some = crop_resize_batch(images, boxes, mixed, 20)
    assert torch.equal(flipped, plain.flip(-1))
    for k, f in enumerate(mixed):
        assert torch.equal(some[k], plain[k].flip(-1) if f else plain[k])


def test_chunks_and_order():
    """Small chunk budgets (many chunks, reordered by crop size) give the same pixels (up to
    float summation order) in batch order; one-pixel crops and upscaling work."""
    images = _images(12, seed=5, lo=8, hi=120)
    boxes, flips = _params(images, True)
    boxes[0] = (3, 4, 1, 1)  # a single pixel, upscaled
    boxes[1] = (0, 0, images[1].shape[1], images[1].shape[2])  # the whole image
    whole = crop_resize_batch(images, boxes, flips, 16)
    for budget in (1, 3 * 40 * 40, 3 * 120 * 120 * 3):
        mean, worst, frac = _diff(crop_resize_batch(images, boxes, flips, 16, chunk_elements=budget), whole)
        assert worst <= 1 and frac < 0.005, (budget, mean, worst, frac)
    t, l, _, _ = boxes[0]
    assert torch.equal(whole[0], images[0][:, t, l].view(3, 1, 1).expand(3, 16, 16))
    assert _diff(whole, _float_reference(images, boxes, flips, 16))[1] <= 1


def test_same_seed_same_pixels():
    images = _images(8, seed=7)
    a = crop_resize_batch(images, *_params(images, True, seed=4, epoch=2), 32)
    b = crop_resize_batch(images, *_params(images, True, seed=4, epoch=2), 32)
    c = crop_resize_batch(images, *_params(images, True, seed=5, epoch=2), 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
def test_cuda_batched_matches_cpu():
    """The CUDA batched path (float16 matmuls) against the CPU float32 batched path and the CUDA
    per-image path, on the same uint8 images and boxes."""
    images = _images(64, seed=11, lo=64, hi=500)
    for train in (True, False):
        boxes, flips = _params(images, train)
        cpu = crop_resize_batch(images, boxes, flips, 160)
        gpu_images = [im.cuda() for im in images]
        gpu = crop_resize_batch(gpu_images, boxes, flips, 160)
        assert gpu.is_cuda and gpu.dtype == torch.uint8 and gpu.shape == (64, 3, 160, 160)
        assert gpu.is_contiguous(memory_format=torch.channels_last)
        mean, worst, _ = _diff(gpu.cpu(), cpu)
        assert worst <= 1 and mean < 0.15, (mean, worst)
        per_image = _per_image(gpu_images, boxes, flips, 160)  # crop_resize's CUDA (float) branch
        mean, worst, _ = _diff(gpu.cpu(), per_image.cpu())
        assert worst <= 1 and mean < 0.15, (mean, worst)
        fp32 = crop_resize_batch(gpu_images, boxes, flips, 160, compute_dtype=torch.float32)
        assert _diff(fp32.cpu(), cpu)[1] <= 1
        # memory stays bounded: 256 images of 500 px
        big = [torch.full((3, 500, 500), 7, dtype=torch.uint8, device="cuda")] * 256
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        crop_resize_batch(big, [(0, 0, 500, 500)] * 256, [False] * 256, 224)
        assert torch.cuda.max_memory_allocated() - base < 1.5 * 2**30
