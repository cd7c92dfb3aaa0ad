"""Loader backends on packed data: contract, cross-backend val equality, augmentation statistics,
epoch/seed behaviour, sharding, clear errors.

Data (made once per session, packed with `fastkd.preprocess.pack.pack`):
- "gradient": 3 classes, 12 train + 6 val images each, 64-160 px, whose pixels encode where they
  are and which sample they are: R = 255 * x / (W-1), G = 255 * y / (H-1), B = a constant per
  sample (train 20 + 6*i, val 25 + 12*i for pack index i). From an output crop we read back its
  box and flip (R, G) and the sample it came from (B), whatever the backend.
- "digits": `fastkd demo-data` (scikit-learn digits, 10 classes), for labels against the manifest.

FFCV JIT-compiles each pipeline (~10-20 s on 2 cores), so its loaders are session fixtures.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd.data import available_backends, build_loader
from fastkd.data.spec import IMAGENET_MEAN, IMAGENET_STD
from fastkd.data.sharding import epoch_indices, num_batches
from fastkd.errors import FastKDError

N_CLASSES, N_TRAIN, N_VAL = 3, 12, 6  # per class
RES = 32
BACKENDS = ("ffcv", "dali", "torch", "folder")


def _b_value(split: str, index: int) -> float:
    return 20.0 + 6.0 * index if split == "train" else 25.0 + 12.0 * index


def _write_gradient_source(src: Path) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = {"train": [], "val": []}  # (H, W) in pack order
    for split, per_class in (("train", N_TRAIN), ("val", N_VAL)):
        index = 0
        for c in range(N_CLASSES):
            folder = src / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                h, w = (int(v) for v in rng.integers(64, 161, size=2))
                y, x = np.mgrid[0:h, 0:w].astype(np.float64)
                rgb = np.stack([255 * x / (w - 1), 255 * y / (h - 1),
                                np.full_like(x, _b_value(split, index))], -1)
                Image.fromarray(np.round(rgb).astype(np.uint8)).save(folder / f"img{k:03d}.JPEG", quality=98)
                sizes[split].append((h, w))
                index += 1
    return sizes


@pytest.fixture(scope="session")
def gradient(tmp_path_factory):
    from fastkd.preprocess.pack import pack

    root = tmp_path_factory.mktemp("gradient")
    sizes = _write_gradient_source(root / "src")
    pack(root / "src", root / "packed", classes="all", shard_size=8, workers=1, quality=98)
    return {"dir": root / "packed", "src": root / "src", "sizes": sizes}


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    from fastkd.preprocess.demo import write_demo
    from fastkd.preprocess.pack import pack

    root = tmp_path_factory.mktemp("digits")
    write_demo(root / "src", size=32)
    pack(root / "src", root / "packed", classes="all", shard_size=100, workers=1)
    return root / "packed"


def _loader(data, split, backend, **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("return_indices", True)
    return build_loader(data["dir"] if isinstance(data, dict) else data, split, backend,
                        kw.pop("batch_size", 8), kw.pop("resolution", RES), "cpu", kw.pop("dtype", "fp32"), **kw)


@pytest.fixture(scope="session")
def ffcv_train(gradient):
    return _loader(gradient, "train", "ffcv")


@pytest.fixture(scope="session")
def ffcv_val(gradient):
    return _loader(gradient, "val", "ffcv")


@pytest.fixture
def get_loader(gradient, ffcv_train, ffcv_val):
    """(split, backend, **kw) -> a loader; the session FFCV loaders when kw is empty."""

    def make(split, backend, **kw):
        if backend == "ffcv" and not kw:
            loader = ffcv_train if split == "train" else ffcv_val
            loader.set_epoch(0)
            return loader
        return _loader(gradient, split, backend, **kw)

    return make


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised [B,3,r,r] -> float pixel values 0..255."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return images.float() * std + mean


def _pass(loader):
    images, labels, indices = [], [], []
    for x, y, i in loader:
        images.append(x)
        labels.append(y)
        indices.append(i)
    return torch.cat(images), torch.cat(labels), torch.cat(indices)


def _label_of(index: torch.Tensor, per_class: int) -> torch.Tensor:
    return index // per_class


# ----------------------------------------------------------------------------- sharding (pure)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [17, 18, 30])
def test_sharding_partitions_each_epoch(world_size, n):
    for epoch in (0, 1):
        parts = [epoch_indices(n, True, 5, epoch, r, world_size, drop_last=False) for r in range(world_size)]
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(n))  # each sample exactly once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        even = [epoch_indices(n, True, 5, epoch, r, world_size, drop_last=True) for r in range(world_size)]
        assert {len(p) for p in even} == {n // world_size}
        assert len(set(np.concatenate(even).tolist())) == n // world_size * world_size
    a = epoch_indices(n, True, 5, 0, 0, 1, False)
    assert np.array_equal(a, epoch_indices(n, True, 5, 0, 0, 1, False))
    assert not np.array_equal(a, epoch_indices(n, True, 5, 1, 0, 1, False))
    assert not np.array_equal(a, epoch_indices(n, True, 6, 0, 0, 1, False))
    assert np.array_equal(epoch_indices(n, False, 5, 3, 0, 1, False), np.arange(n))


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_contract(get_loader, gradient, backend, split):
    loader = get_loader(split, backend)
    per_class = N_TRAIN if split == "train" else N_VAL
    n = N_CLASSES * per_class
    assert loader.num_classes == N_CLASSES
    assert [c["wnid"] for c in loader.manifest["classes"]] == [f"n0000000{c}" for c in range(N_CLASSES)]
    batches = 0
    seen = []
    for images, labels, indices in loader:
        batches += 1
        assert images.shape == (len(labels), 3, RES, RES)
        assert images.dtype == torch.float32 and images.device.type == "cpu"
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (len(indices),)
        assert torch.equal(labels, _label_of(indices, per_class))
        # the image really is the sample the index names (B channel identifies it)
        b = _pixels(images)[:, 2].mean(dim=(1, 2))
        expected = torch.tensor([_b_value(split, int(i)) for i in indices])
        assert (b - expected).abs().max() < 2.5, (b, expected)
        if split == "train":
            assert len(labels) == 8  # drop_last
        seen += indices.tolist()
    assert batches == len(loader)
    if split == "val":
        assert seen == list(range(n))  # in pack order, nothing dropped
    else:
        assert len(set(seen)) == len(seen) == n // 8 * 8
        assert seen != sorted(seen)  # shuffled


@pytest.mark.parametrize("backend", ["dali", "torch", "folder"])
def test_bf16_fp16(get_loader, backend):
    x32 = next(iter(get_loader("val", backend)))[0]
    for dtype, tol in (("bf16", 2e-2), ("fp16", 2e-3)):
        x = next(iter(get_loader("val", backend, dtype=dtype)))[0]
        assert x.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(x.float(), x32, atol=tol * 3, rtol=tol)


def test_val_identical_across_backends(get_loader):
    """Same val pixels from ffcv, dali and torch, up to decoder/interpolation differences.

    Tolerances in normalised units (1.0 = about 57 grey levels): dali vs torch decode with
    libjpeg-turbo and resize with the same antialiased linear filter from the same integer box:
    mean |diff| < 0.01, max < 0.15. ffcv resizes with OpenCV INTER_AREA: mean < 0.03, max < 0.4.
    folder (PIL, resize then crop) is the loosest: mean < 0.05.
    """
    out = {b: _pass(get_loader("val", b)) for b in BACKENDS}
    for b in BACKENDS:
        assert torch.equal(out[b][2], out["torch"][2]) and torch.equal(out[b][1], out["torch"][1])
    ref = out["torch"][0]

    def diff(b):
        d = (out[b][0] - ref).abs()
        return d.mean().item(), d.max().item()

    mean, worst = diff("dali")
    assert mean < 0.01 and worst < 0.15, (mean, worst)
    mean, worst = diff("ffcv")
    assert mean < 0.03 and worst < 0.4, (mean, worst)
    assert diff("folder")[0] < 0.05


# ----------------------------------------------------------------------------- augmentation


def _read_crops(images: torch.Tensor):
    """From gradient-image outputs: relative box extents (ex, ey) and whether each was flipped."""
    px = _pixels(images)
    r = images.shape[-1]
    red = px[:, 0].mean(dim=1)  # [B, r] mean over rows: R by column
    green = px[:, 1].mean(dim=2)  # [B, r] G by row
    scale = r / (r - 1)  # column centres span (r-1)/r of the crop
    ex = (red[:, -1] - red[:, 0]).abs() / 255 * scale
    ey = (green[:, -1] - green[:, 0]) / 255 * scale
    flipped = red[:, -1] < red[:, 0]
    return ex, ey, flipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_crops_statistically_sane(get_loader, gradient, backend):
    loader = get_loader("train", backend)
    ex, ey, flips, idx = [], [], [], []
    for _ in range(5):  # 5 epochs x 32 crops
        images, _, indices = _pass(loader)
        a, b, f = _read_crops(images)
        ex.append(a), ey.append(b), flips.append(f), idx.append(indices)
    ex, ey, flips, idx = torch.cat(ex), torch.cat(ey), torch.cat(flips), torch.cat(idx)
    area = ex * ey
    sizes = torch.tensor(gradient["sizes"]["train"], dtype=torch.float64)[idx]
    aspect = (ex * sizes[:, 1]) / (ey * sizes[:, 0])  # crop w / h in source pixels
    n = len(area)
    assert 0.3 < flips.float().mean() < 0.7, flips.float().mean()  # p=0.5, n=160: sd 0.04
    assert area.min() < 0.2 and area.max() > 0.8, (area.min(), area.max())
    assert area.min() > 0.05 and area.max() < 1.06
    assert 0.35 < area.mean() < 0.7, area.mean()  # E = 0.54 for U(0.08, 1)
    assert ((aspect > 3 / 4 - 0.12) & (aspect < 4 / 3 + 0.2)).float().mean() > 0.95, aspect
    assert (area < 0.5).sum() > n // 5 and (area > 0.5).sum() > n // 5  # spread, not one crop


def test_val_is_centre_crop(get_loader, gradient):
    images, _, indices = _pass(get_loader("val", "torch"))
    ex, ey, flipped = _read_crops(images)
    sizes = torch.tensor(gradient["sizes"]["val"], dtype=torch.float64)[indices]
    side = (0.875 * sizes.min(1).values).floor()
    assert not flipped.any()
    assert torch.allclose(ex.double(), side / sizes[:, 1], atol=0.03)
    assert torch.allclose(ey.double(), side / sizes[:, 0], atol=0.03)


# ----------------------------------------------------------------------------- epochs and seeds


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_and_seed(get_loader, backend):
    a = get_loader("train", backend)
    a.set_epoch(0)
    x0, _, i0 = _pass(a)
    x1, _, i1 = _pass(a)  # no set_epoch: the next epoch
    a.set_epoch(0)
    x0b, _, i0b = _pass(a)
    assert torch.equal(i0, i0b)
    assert not torch.equal(i0, i1)
    if backend != "ffcv":  # FFCV draws crops with unseeded per-thread numba RNG: order only
        assert torch.equal(x0, x0b)
    other = get_loader("train", backend, seed=1)
    assert not torch.equal(_pass(other)[2], i0)
    if backend in ("torch", "dali", "folder"):  # a fresh loader, same seed: same order and crops
        again = get_loader("train", backend, seed=0)
        xa, _, ia = _pass(again)
        assert torch.equal(ia, i0) and torch.equal(xa, x0)


def test_dali_reader_shuffle_is_seeded(get_loader):
    """shuffle="reader" (fn.readers.webdataset's own shuffling): reproducible, new each epoch."""
    a = get_loader("train", "dali", shuffle="reader")
    x0, _, i0 = _pass(a)
    x1, _, i1 = _pass(a)
    b = get_loader("train", "dali", shuffle="reader")
    xb, _, ib = _pass(b)
    assert torch.equal(i0, ib) and torch.equal(x0, xb)
    assert not torch.equal(i0, i1)


@pytest.mark.parametrize("backend", ["torch", "folder"])
def test_crops_independent_of_workers(get_loader, backend):
    x1, _, i1 = _pass(get_loader("train", backend, num_workers=1))
    x2, _, i2 = _pass(get_loader("train", backend, num_workers=2))
    assert torch.equal(i1, i2) and torch.equal(x1, x2)


@pytest.mark.parametrize("split", ["train", "val"])
def test_torch_batched_resize_matches_per_image(gradient, split):
    """TorchLoader(batched_resize=True) (the CUDA default) vs the per-image resize (the CPU
    default): same samples, crops and flips; pixels within 1 grey level (normalised < 0.02)."""
    from fastkd.data.packed import shard_paths
    from fastkd.data.torch_loader import TorchLoader

    base = _loader(gradient, split, "torch")
    assert base.batched_resize is False  # cpu default
    shards = shard_paths(gradient["dir"], base.manifest, split)
    batched = TorchLoader(base.spec, base.manifest, shards, batched_resize=True)
    x0, y0, i0 = _pass(base)
    x1, y1, i1 = _pass(batched)
    assert torch.equal(i0, i1) and torch.equal(y0, y1)
    assert x1.dtype == torch.float32 and x1.is_contiguous(memory_format=torch.channels_last)
    d = (x1 - x0).abs()
    assert d.mean() < 0.01 and d.max() < 0.02, (d.mean(), d.max())
    batched.set_epoch(0)
    assert torch.equal(_pass(batched)[0], x1)  # same seed and epoch: same pixels


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_resolution(get_loader, backend):
    loader = get_loader("val", backend)
    try:
        loader.set_resolution(24)
        x, _, _ = next(iter(loader))
        assert x.shape[-2:] == (24, 24) and x.is_contiguous(memory_format=torch.channels_last)
    finally:
        loader.set_resolution(RES)


# ----------------------------------------------------------------------------- mid-epoch start


def _batches(loader):
    return [(x, y, i) for x, y, i in loader]


def _record_reads(loader) -> list:
    """Pack indices whose JPEG bytes the loader reads from now on (torch with num_workers=1
    reads in this process; dali's external source runs in a thread of it)."""
    reads, read = [], loader.store.jpeg_bytes

    def recording(index):
        reads.append(int(index))
        return read(index)

    loader.store.jpeg_bytes = recording
    return reads


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_batch_yields_the_tail(get_loader, backend):
    """set_epoch(e, start_batch=k): batches k.. of epoch e's full pass (same samples and labels;
    same pixels where crops are keyed by (seed, epoch, sample): torch, folder, dali "global"),
    reading none of batches 0..k-1; len() stays the full pass; the pass after starts at 0."""
    loader = get_loader("train", backend)
    k, n = 2, len(loader)  # 36 samples, batch 8: 4 batches
    assert n == 4 and loader.start_batch == 0
    loader.set_epoch(1)
    full = _batches(loader)
    reads = _record_reads(loader) if backend in ("torch", "dali") else None
    loader.set_epoch(1, start_batch=k)
    assert loader.start_batch == k and len(loader) == n
    tail, starts = [], []
    for x, y, i in loader:
        starts.append(loader.start_batch)  # the running pass's first batch
        tail.append((x, y, i))
    assert starts == [k] * (n - k) and loader.start_batch == 0
    assert len(tail) == n - k
    for (x, y, i), (xf, yf, i_f) in zip(tail, full[k:]):
        assert torch.equal(i, i_f) and torch.equal(y, yf)
        b = _pixels(x)[:, 2].mean(dim=(1, 2))  # the images are those samples
        assert (b - torch.tensor([_b_value("train", int(j)) for j in i])).abs().max() < 2.5
        if backend != "ffcv":  # FFCV's crops are unseeded: same samples, other crops
            assert torch.equal(x, xf)
    if reads is not None:  # nothing of batches 0..k-1 was read, let alone decoded
        assert sorted(reads) == sorted(torch.cat([i for _, _, i in full[k:]]).tolist())
    # the next pass: epoch 2 from batch 0
    following = torch.cat([i for _, _, i in loader])
    assert following.tolist() == epoch_indices(36, True, 0, 2, 0, 1, True)[:32].tolist()


def test_jpeg_size_reads_the_frame_header():
    """dali "global" takes each image's size from its header to draw the torch backend's box."""
    import io

    from PIL import Image

    from fastkd.data.dali_loader import jpeg_size

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 91, 3), dtype=np.uint8))
    for opts in ({}, {"progressive": True}, {"exif": Image.Exif(), "icc_profile": b"x" * 300}, {"quality": 5}):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **opts)
        assert jpeg_size(buffer.getvalue()) == (37, 91), opts
    with pytest.raises(ValueError, match="JPEG"):
        jpeg_size(b"\x89PNG....")


def test_start_batch_edges(get_loader):
    loader = get_loader("train", "torch")
    loader.set_epoch(3, start_batch=len(loader))  # everything done: an empty pass
    assert list(loader) == [] and loader.start_batch == 0 and loader.epoch == 4
    for bad in (-1, len(loader) + 1):
        with pytest.raises(ValueError, match="start_batch"):
            loader.set_epoch(0, start_batch=bad)
    reader = get_loader("train", "dali", shuffle="reader")
    assert not reader.supports_start_batch
    reader.set_epoch(2)  # from the top: fine
    with pytest.raises(FastKDError, match="shuffle='global'"):
        reader.set_epoch(2, start_batch=1)


def test_folder_start_batch_opens_no_skipped_file(gradient, tmp_path):
    """The files of the skipped batches are overwritten with garbage: a pass started after them
    still runs, and equals the tail of a full pass over the intact source."""
    src = tmp_path / "src"
    shutil.copytree(gradient["src"], src)
    broken = _loader(gradient, "train", "folder", source=str(src))
    intact = _loader(gradient, "train", "folder")
    k = 3
    intact.set_epoch(5)
    full = _batches(intact)
    for j in torch.cat([i for _, _, i in full[:k]]).tolist():
        Path(broken.folder.samples[j][0]).write_bytes(b"not a jpeg")
    broken.set_epoch(5, start_batch=k)
    tail = _batches(broken)
    assert len(tail) == len(full) - k == 1
    for (x, y, i), (xf, yf, i_f) in zip(tail, full[k:]):
        assert torch.equal(i, i_f) and torch.equal(y, yf) and torch.equal(x, xf)
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):  # the garbage is really there: a full pass fails
        broken.set_epoch(5)
        _batches(broken)


# ----------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("backend", ["torch", "dali", "dali-reader", "folder"])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("split", ["train", "val"])
def test_sharding(get_loader, backend, world_size, split):
    n = N_CLASSES * (N_TRAIN if split == "train" else N_VAL)
    batch = 4
    opts = {"shuffle": "reader"} if backend == "dali-reader" else {}
    backend = backend.split("-")[0]
    for epoch in (0, 1):
        parts = []
        for rank in range(world_size):
            loader = get_loader(split, backend, rank=rank, world_size=world_size, batch_size=batch, **opts)
            loader.set_epoch(epoch)
            seen = [i for _, _, idx in loader for i in idx.tolist()]
            assert len(loader) == -(-len(seen) // batch)
            parts.append(seen)
        joined = [i for p in parts for i in p]
        assert len(set(joined)) == len(joined)  # disjoint
        if split == "val":  # drop_last=False: every sample exactly once across ranks
            assert sorted(joined) == list(range(n))
        else:  # drop_last=True: equal steps on every rank, the remainder is dropped
            assert {len(p) for p in parts} == {(n // world_size) // batch * batch}
            assert len({len(get_loader(split, backend, rank=r, world_size=world_size, batch_size=batch, **opts))
                        for r in range(world_size)}) == 1


def test_world_size_change_at_an_epoch_boundary(get_loader):
    """The epoch order is a function of (seed, epoch) alone and rank r of W takes every W-th
    sample of it, so a run may change its world size between epochs: epoch 1 at W=2 reads what
    epoch 1 at W=1 reads, minus the documented remainder (sharding.py: N % W + W * ((N // W) % B)
    samples: here 0 + 2 * (18 % 4) = 4, the last 4 of the epoch order), and each sample gets the
    same crop and flip. (A mid-epoch start needs the world size and batch size it was saved with.)"""
    batch = 4
    one = get_loader("train", "torch", batch_size=batch)
    one.set_epoch(1)
    x1, _, i1 = _pass(one)
    assert len(i1) == 36
    images, indices = [], []
    for rank in range(2):
        part = get_loader("train", "torch", batch_size=batch, rank=rank, world_size=2)
        part.set_epoch(1)
        x, _, i = _pass(part)
        images.append(x), indices.append(i)
    x2, i2 = torch.cat(images), torch.cat(indices)
    assert len(i2) == len(set(i2.tolist())) == 36 - 4
    assert set(i2.tolist()) == set(i1[:32].tolist())  # the epoch order minus its last 4 samples
    position = {int(j): p for p, j in enumerate(i1)}
    assert torch.equal(x2, x1[[position[int(j)] for j in i2]])  # same crops, whichever rank


def test_ffcv_quasi_random_covers_the_epoch(gradient):
    """FFCV's QUASI_RANDOM (single process, os_cache=False): every sample once per epoch, and the
    yielded indices are the samples FFCV read (B channel); its order is seeded but depends on the
    epochs before it (FFCV shuffles its page table in place), so only coverage is promised."""
    loader = _loader(gradient, "train", "ffcv", order="quasi_random", os_cache=False, drop_last=False)
    threads = torch.get_num_threads()
    for _ in range(2):
        images, labels, indices = _pass(loader)
        assert sorted(indices.tolist()) == list(range(N_CLASSES * N_TRAIN))
        assert torch.equal(labels, _label_of(indices, N_TRAIN))
        b = _pixels(images)[:, 2].mean(dim=(1, 2))
        assert (b - torch.tensor([_b_value("train", int(i)) for i in indices])).abs().max() < 2.5
    assert torch.get_num_threads() == threads  # FFCV's set_num_threads side effect undone
    assert not loader.supports_start_batch
    with pytest.raises(FastKDError, match="quasi_random"):
        loader.set_epoch(0, start_batch=1)


def test_ffcv_reads_the_rank_part(gradient):
    loader = _loader(gradient, "val", "ffcv", rank=1, world_size=3, batch_size=4)
    assert len(loader) == num_batches(18, 4, 1, 3, False)
    assert loader._loader.traversal_order.sample_order(0).tolist() == list(range(1, 18, 3))


# ----------------------------------------------------------------------------- labels on real data


@pytest.mark.parametrize("backend", ["dali", "torch", "folder"])
def test_digits_labels_match_manifest(digits, backend):
    loader = build_loader(digits, "val", backend, 64, 16, "cpu", "fp32", num_workers=1, return_indices=True)
    manifest = json.loads((digits / "manifest.json").read_text())
    wnids = [c["wnid"] for c in manifest["classes"]]
    assert wnids == [f"digit{k}" for k in range(10)] and loader.num_classes == 10
    source = Path(manifest["source"]) / "val"
    truth = [wnids.index(folder.name) for folder in sorted(source.iterdir()) for _ in sorted(folder.iterdir())]
    labels, indices = [], []
    for _, y, i in loader:
        labels += y.tolist()
        indices += i.tolist()
    assert indices == list(range(len(truth))) and labels == truth


def test_folder_skips_what_the_packer_skipped(gradient, tmp_path):
    """A source file the packer skipped (unreadable) is left out by `folder` too, so sample i is
    still pack index i; `source=` points the backend at a moved source folder."""
    from fastkd.preprocess.pack import pack

    src = tmp_path / "src"
    shutil.copytree(gradient["src"], src)
    bad = src / "val" / "n00000001" / "img002.JPEG"  # pack index 8 of val
    bad.write_bytes(bad.read_bytes()[:200])
    pack(src, tmp_path / "packed", classes="all", shard_size=8, workers=1, quality=98)
    moved = tmp_path / "moved"
    src.rename(moved)
    folder = build_loader(tmp_path / "packed", "val", "folder", 8, RES, "cpu", "fp32", num_workers=1,
                          return_indices=True, source=str(moved))
    torch_ = build_loader(tmp_path / "packed", "val", "torch", 8, RES, "cpu", "fp32", num_workers=1,
                          return_indices=True)
    (xf, yf, i_f), (xt, yt, it) = _pass(folder), _pass(torch_)
    assert len(i_f) == N_CLASSES * N_VAL - 1
    assert torch.equal(i_f, it) and torch.equal(yf, yt)
    b_folder, b_torch = _pixels(xf)[:, 2].mean(dim=(1, 2)), _pixels(xt)[:, 2].mean(dim=(1, 2))
    assert (b_folder - b_torch).abs().max() < 2.5  # the same images, sample by sample


# ----------------------------------------------------------------------------- errors


def test_missing_backend_is_explained(gradient, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali.fn", None)
    with pytest.raises(FastKDError, match=r"backend 'dali' cannot run here.*pip install nvidia-dali.*torch"):
        _loader(gradient, "val", "dali")
    monkeypatch.setitem(sys.modules, "ffcv.loader", None)
    with pytest.raises(FastKDError, match=r"backend 'ffcv' cannot run here.*FFCV.*torch"):
        _loader(gradient, "val", "ffcv")


def _copy_pack(gradient, tmp_path) -> Path:
    out = tmp_path / "packed"
    shutil.copytree(gradient["dir"], out)
    return out


def test_truncated_files_named_before_training(gradient, tmp_path):
    out = _copy_pack(gradient, tmp_path)
    shard = out / "dali" / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    beton = out / "ffcv" / "train.beton"
    beton.write_bytes(beton.read_bytes()[:-100])
    for backend, name in (("dali", "shard-000001.tar"), ("torch", "shard-000001.tar"), ("ffcv", "train.beton")):
        with pytest.raises(FastKDError, match=name):
            build_loader(out, "train", backend, 8, RES, "cpu", "fp32")
    # the val files are intact: a val loader still works
    assert len(build_loader(out, "val", "torch", 8, RES, "cpu", "fp32")) == 3


def test_corrupted_same_size_needs_verify(gradient, tmp_path):
    out = _copy_pack(gradient, tmp_path)
    shard = out / "dali" / "val" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000:2100] = bytes(100)
    shard.write_bytes(bytes(data))
    build_loader(out, "val", "dali", 8, RES, "cpu", "fp32")  # sizes match: cheap check passes
    with pytest.raises(FastKDError, match="shard-000000.tar.*sha256"):
        build_loader(out, "val", "dali", 8, RES, "cpu", "fp32", verify=True)


def test_manifest_mismatch(gradient, tmp_path):
    with pytest.raises(FastKDError, match="classes"):
        _loader(gradient, "val", "torch", expected_classes=["n00000000", "n00000001", "n09999999"])
    with pytest.raises(FastKDError, match="label order"):
        _loader(gradient, "val", "torch", expected_classes=["n00000001", "n00000000", "n00000002"])
    with pytest.raises(FastKDError, match="3 classes"):
        _loader(gradient, "val", "torch", expected_classes=100)
    _loader(gradient, "val", "torch", expected_classes=[f"n0000000{c}" for c in range(3)])
    out = _copy_pack(gradient, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastKDError, match="version"):
        build_loader(out, "val", "torch", 8, RES, "cpu", "fp32")


def test_bad_arguments(gradient):
    with pytest.raises(FastKDError, match="quasi_random"):
        _loader(gradient, "train", "ffcv", order="quasi_random", os_cache=False, rank=0, world_size=2)
    with pytest.raises(FastKDError, match="does not take"):
        _loader(gradient, "val", "torch", order="random")
    with pytest.raises(FastKDError, match="unknown loader backend"):
        _loader(gradient, "val", "pillow")
    with pytest.raises(FastKDError, match="no split"):
        _loader(gradient, "test", "torch")
    with pytest.raises(FastKDError, match="rank"):
        _loader(gradient, "val", "torch", rank=2, world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(FastKDError, match="CUDA"):
            build_loader(gradient["dir"], "val", "torch", 8, RES, "cuda", "fp32")


# ----------------------------------------------------------------------------- GPU (skipped on CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_gpu_val_matches_cpu(gradient, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed here")
    cpu = _pass(_loader(gradient, "val", backend))
    gpu_loader = build_loader(gradient["dir"], "val", backend, 8, RES, "cuda", "bf16", num_workers=2,
                              return_indices=True)
    xs, ys, idx = [], [], []
    for x, y, i in gpu_loader:
        assert x.is_cuda and y.is_cuda and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        xs.append(x.float().cpu()), ys.append(y.cpu()), idx.append(i)
    assert torch.equal(torch.cat(idx), cpu[2]) and torch.equal(torch.cat(ys), cpu[1])
    assert (torch.cat(xs) - cpu[0]).abs().mean() < 0.03  # nvJPEG vs libjpeg-turbo, bf16 rounding


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["train", "val"])
def test_gpu_torch_batched_resize(gradient, split):
    """On CUDA the torch backend resizes batched by default; the per-image path stays available
    and agrees (same decoder, same boxes: only the resize arithmetic differs, <= 1 level)."""
    from fastkd.data.packed import shard_paths
    from fastkd.data.torch_loader import TorchLoader

    batched = build_loader(gradient["dir"], split, "torch", 8, RES, "cuda", "fp32", num_workers=2,
                           return_indices=True)
    assert batched.batched_resize is True
    per_image = TorchLoader(batched.spec, batched.manifest, shard_paths(gradient["dir"], batched.manifest, split),
                            batched_resize=False)
    (xb, yb, ib), (xp, yp, ip) = _pass(batched), _pass(per_image)
    assert torch.equal(ib, ip) and torch.equal(yb, yp)
    assert xb.is_cuda and xb.is_contiguous(memory_format=torch.channels_last)
    d = (xb - xp).abs()
    assert d.mean() < 0.01 and d.max() < 0.02, (d.mean(), d.max())
