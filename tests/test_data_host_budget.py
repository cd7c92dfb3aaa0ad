"""The host work of the torch backend's batch path, measured on CPU so a GPU run cannot regress.

On a GPU the producer thread's Python and op launches share the GIL with the training step, so
they must stay a fixed, small cost per batch:
- crop boxes: a fixed number of Python/numpy calls per batch, whatever the batch size
  (`transforms.crop_params`; counted with sys.setprofile);
- crop + resize: a fixed number of aten ops per chunk of crops, whatever the batch size
  (`transforms.crop_resize_batch`; counted with a TorchDispatchMode);
- every host -> device copy of the device-decode path comes from pinned memory (run on the meta
  device, with `Tensor.pin_memory` replaced by a recorder, since this machine has no CUDA).
And the vectorised boxes keep what crops need: determinism, independence from the batch,
boxes inside the image, torchvision's RandomResizedCrop distribution, flips at p=0.5.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from dispatch_counts import DispatchCounts
from fastkd.data import torch_loader
from fastkd.data.spec import TRAIN_RATIO, TRAIN_SCALE
from fastkd.data.transforms import (DRAWS, center_boxes, center_crop_box, crop_params, crop_resize_batch,
                                    pinned_for, train_boxes, train_params, uniforms)
from fastkd.errors import FastKDError

CALL_BUDGET = 5  # box calls per batch, in units of one tiny numpy routine's calls
OP_BUDGET = 100  # aten ops of a one-chunk crop_resize_batch (measured: 86 with flips)
OPS_PER_CHUNK = 30  # aten ops each further chunk adds (measured: 26)


def _calls(fn) -> int:
    """Python and C function calls `fn()` makes (what holds the GIL in a producer thread)."""
    count = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            count[0] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count[0]


def _shapes(n: int, seed: int = 0, lo: int = 100, hi: int = 600) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, size=(n, 2))  # [n, (H, W)]


# ----------------------------------------------------------------------------- (a) Python calls


@pytest.mark.parametrize("train", [True, False])
def test_box_calls_do_not_grow_with_the_batch(train):
    """A 256-image batch's boxes cost the same calls as a 32-image one, and a few times one tiny
    numpy routine's: per-sample Python (a generator per sample made ~20 calls per image) fails."""
    reference = _calls(lambda: np.stack([np.arange(4), np.arange(4)]))
    counts = {}
    for n in (32, 256):
        shapes = [tuple(s) for s in _shapes(n).tolist()]  # what the loader passes: a list of (H, W)
        indices = np.arange(n) * 3
        crop_params(shapes, indices, 0, 1, train)  # warm (first-call imports)
        counts[n] = _calls(lambda: crop_params(shapes, indices, 0, 1, train))
    assert counts[256] == counts[32], counts
    assert counts[256] < CALL_BUDGET * reference, (counts, reference)


# ----------------------------------------------------------------------------- (b) aten ops


def _batch(n: int, seed: int = 0):
    """n small uint8 images with valid train boxes and flips (both values present)."""
    shapes = _shapes(n, seed, lo=30, hi=60)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in shapes.tolist()]
    boxes, flips = train_boxes(seed, 0, np.arange(n), shapes[:, 0], shapes[:, 1])
    flips[:2] = [True, False]
    return images, boxes, flips


def _ops(images, boxes, flips, size: int = 16, **kw) -> int:
    with DispatchCounts() as counts:
        crop_resize_batch(images, boxes, flips, size, **kw)
    return counts.total


def test_resize_ops_do_not_grow_with_the_batch():
    """One chunk of 32 or of 256 images: the same aten ops (no per-image op), under the budget."""
    small, large = _ops(*_batch(32)), _ops(*_batch(256))
    assert small == large, (small, large)
    assert large <= OP_BUDGET, large


def test_resize_ops_grow_only_with_chunks():
    images, boxes, flips = _batch(64, seed=1)
    one = _ops(images, boxes, flips)
    four = _ops(images, boxes, flips, chunk_elements=16 * 3 * 60 * 60)  # at most 16 crops per chunk
    assert one < four <= one + 3 * OPS_PER_CHUNK, (one, four)


# ----------------------------------------------------------------------------- (c) pinned copies


class _HostCopies(TorchDispatchMode):
    """Each copy from the CPU to another device: the source tensor's data pointer."""

    def __init__(self):
        super().__init__()
        self.sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source, target = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            if source.device.type == "cpu" and target.device.type != "cpu":
                self.sources.append(source.data_ptr())
        return out


@pytest.fixture
def fake_pinning(monkeypatch):
    """`Tensor.pin_memory` without CUDA: a copy, its data pointer recorded as pinned."""
    pinned = set()

    def pin_memory(self, *args, **kwargs):
        copy = self.clone()
        pinned.add(copy.data_ptr())
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    return pinned


def test_pinned_for_pins_only_off_the_cpu(fake_pinning):
    t = torch.arange(4)
    assert pinned_for(t, torch.device("cpu")) is t
    assert pinned_for(t, torch.device("meta")).data_ptr() in fake_pinning


@pytest.mark.parametrize("train", [True, False])
def test_device_decode_copies_only_from_pinned_memory(monkeypatch, fake_pinning, train):
    """The torch backend's device-decode step (nvJPEG stubbed by meta images of the decoded
    shapes): the crop parameters and the labels reach the device, each from pinned memory."""
    device = torch.device("meta")
    shapes = _shapes(8, seed=2, lo=40, hi=90).tolist()
    monkeypatch.setattr(torch_loader, "decode_jpeg", lambda data, mode, device: [
        torch.empty(3, h, w, dtype=torch.uint8, device=device) for h, w in shapes])
    loader = SimpleNamespace(spec=SimpleNamespace(seed=3, train=train, device=device), batched_resize=True,
                             crop_fn=None, normalize=lambda images: images)
    to_device = torch_loader.TorchLoader._device_decoder(loader, 1, 24)
    buffer, sizes = torch.zeros(80, dtype=torch.uint8), [10] * 8
    labels = torch.arange(8)  # pageable, as the DataLoader hands them over for device decode
    with _HostCopies() as copies:
        images, labels_out, _ = to_device((buffer, sizes), labels, np.arange(8))
    assert images.shape == (8, 3, 24, 24) and labels_out.device == device
    assert len(copies.sources) >= 2  # parameters, labels
    assert all(ptr in fake_pinning for ptr in copies.sources), "a host -> device copy from pageable memory"


# ----------------------------------------------------------------------------- (d) the boxes


def test_uniforms_are_uniform_and_keyed():
    u = uniforms(7, 2, np.arange(20000))
    assert u.shape == (20000, DRAWS) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03  # draws of one sample: independent
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03  # neighbouring samples: independent
    for other in (uniforms(8, 2, np.arange(20000)), uniforms(7, 3, np.arange(20000))):
        assert (other != u).mean() > 0.999  # another seed or epoch: other draws


def test_boxes_are_deterministic_and_independent_of_the_batch():
    shapes, indices = _shapes(64, seed=3), np.random.default_rng(3).permutation(10000)[:64]
    boxes, flips = train_boxes(5, 2, indices, shapes[:, 0], shapes[:, 1])
    again = train_boxes(5, 2, indices, shapes[:, 0], shapes[:, 1])
    assert np.array_equal(boxes, again[0]) and np.array_equal(flips, again[1])
    perm = np.random.default_rng(4).permutation(64)  # other batch slots, other neighbours
    shuffled = train_boxes(5, 2, indices[perm], shapes[perm, 0], shapes[perm, 1])
    assert np.array_equal(shuffled[0], boxes[perm]) and np.array_equal(shuffled[1], flips[perm])
    for k in (0, 17, 63):  # alone: the same box and flip
        assert train_params(5, 2, int(indices[k]), *shapes[k].tolist()) == (tuple(boxes[k].tolist()), bool(flips[k]))
    other = train_boxes(5, 3, indices, shapes[:, 0], shapes[:, 1])[0]
    assert (other != boxes).any(axis=1).mean() > 0.9  # the next epoch: new crops


def test_boxes_inside_the_image_and_distributed_as_random_resized_crop():
    """Boxes fit their images; area fraction and aspect agree with torchvision's own
    RandomResizedCrop.get_params on the same image sizes (means within 3 standard errors)."""
    n = 4000
    shapes = _shapes(n, seed=5, lo=60, hi=500)
    boxes, flips = train_boxes(11, 0, np.arange(n), shapes[:, 0], shapes[:, 1])
    top, left, h, w = boxes.T
    H, W = shapes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = np.array([torchvision.transforms.RandomResizedCrop.get_params(
            torch.empty(1, hh, ww), list(TRAIN_SCALE), list(TRAIN_RATIO)) for hh, ww in shapes.tolist()])
    for ours, theirs in ((h * w / (H * W), ref[:, 2] * ref[:, 3] / (H * W)), (np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                         ((top + h / 2) / H, (ref[:, 0] + ref[:, 2] / 2) / H)):
        se = math.sqrt(ours.var() / n + theirs.var() / n)
        assert abs(ours.mean() - theirs.mean()) < 3 * se + 1e-3, (ours.mean(), theirs.mean())
    area = h * w / (H * W)
    assert area.min() > TRAIN_SCALE[0] * 0.9 and area.max() <= 1
    assert abs(flips.mean() - 0.5) < 0.03  # p = 0.5, n = 4000: sd 0.008


@pytest.mark.parametrize("height,width", [(20, 1000), (1000, 20), (9, 2000), (2000, 9)])
def test_boxes_fall_back_to_torchvisions_centre_crop(height, width):
    """Images no try fits (a side under sqrt(0.08 * area * 3/4)): torchvision's fallback, the
    centre crop of the whole image clamped to the ratio range."""
    if width > height:
        h, w = height, int(round(height * max(TRAIN_RATIO)))
    else:
        h, w = int(round(width / min(TRAIN_RATIO))), width
    for index in range(20):  # whatever the draws
        assert train_params(0, 0, index, height, width)[0] == ((height - h) // 2, (width - w) // 2, h, w)


def test_val_boxes_are_centre_squares():
    shapes = np.concatenate([_shapes(300, seed=6, lo=1, hi=700), [[1, 1], [1, 500], [8, 9]]])
    boxes, flips = crop_params(shapes.tolist(), np.arange(len(shapes)), 0, 0, train=False)
    assert not flips.any()
    assert [tuple(b) for b in boxes.tolist()] == [center_crop_box(h, w) for h, w in shapes.tolist()]
    assert np.array_equal(center_boxes(shapes[:, 0], shapes[:, 1]), boxes)


def test_crop_fn_boxes_are_used_as_given():
    given = {3: ((1, 2, 5, 6), True), 9: ((0, 0, 7, 7), False)}
    boxes, flips = crop_params([(20, 30), (40, 50)], [3, 9], 0, 4, True, lambda e, i, h, w: given[i])
    assert boxes.tolist() == [[1, 2, 5, 6], [0, 0, 7, 7]] and flips.tolist() == [True, False]


def test_bad_boxes_and_sizes_are_clear_errors():
    images = [torch.zeros(3, 10, 12, dtype=torch.uint8)]
    with pytest.raises(FastKDError, match="cannot take crop box"):
        crop_resize_batch(images, [(5, 0, 6, 4)], [False], 8)  # past the bottom
    with pytest.raises(FastKDError, match="one .* box and one flip per image"):
        crop_resize_batch(images, [(0, 0, 4, 4)] * 2, [False] * 2, 8)
    with pytest.raises(FastKDError, match="at least one image"):
        crop_resize_batch([], [], [], 8)
    with pytest.raises(FastKDError, match=">= 1"):
        train_boxes(0, 0, [1], [0], [5])
