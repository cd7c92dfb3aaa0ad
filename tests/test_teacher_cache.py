"""Teacher cache (fastkd.teacher_cache, fastkd teacher-cache): cached logits and w equal the live
teacher's on the same view, loaders replay the cached boxes pixel for pixel, an interrupted build
resumes to the uninterrupted result, the teacher saw exactly the pixels training shows, a cache for
other data/classes/resolution is refused.

Data: a tiny pack (3 classes x 6 train images of textured noise, 40-90 px, DALI shards only) made
with fastkd.preprocess.pack; teacher: a randomly initialised resnet18 (3 classes) saved as a
state_dict and loaded with fastkd.models.load_teacher; views at 32 px; CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

from fastkd.data import build_loader
from fastkd.data.packed import ShardStore, shard_paths
from fastkd.data.transforms import crop_resize, normalize_uint8_cpu, train_params
from fastkd.errors import FastKDError
from fastkd.losses import confidence_weight
from fastkd.teacher_cache import CacheFeed, TeacherCache, cache_loader_options, expand_logits, view_order

RES, K, SEED, CHUNK, BATCH = 32, 3, 7, 4, 8  # BATCH views per teacher forward: 2 images
N_CLASSES, PER_CLASS = 3, 6


def _write_source(root, wnids, seed):
    rng = np.random.default_rng(seed)
    for split, count in (("train", PER_CLASS), ("val", 2)):
        for c, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                h, w = (int(v) for v in rng.integers(40, 91, size=2))
                base = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
                image = Image.fromarray(base).resize((w, h), Image.BICUBIC)
                noise = rng.normal(0, 20, size=(h, w, 3))
                pixels = np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{k:03d}.JPEG", quality=95)


def _make_pack(root, wnids, seed):
    from fastkd.preprocess.pack import pack

    _write_source(root / "src", wnids, seed)
    pack(root / "src", root / "packed", classes="all", shard_size=8, workers=1, formats=("dali",))
    return root / "packed"


WNIDS = [f"n0000000{c}" for c in range(N_CLASSES)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data")
    packed = _make_pack(root, WNIDS, 0)
    torch.manual_seed(0)
    import torchvision

    state = torchvision.models.resnet18(num_classes=N_CLASSES).state_dict()
    state["fc.weight"] *= 40  # logits of a few units (a random head gives ~0.1): fp16 error and w matter
    torch.save(state, root / "teacher.pt")
    return {"pack": packed, "src": root / "src", "weights": root / "teacher.pt", "root": root}


def _build(data, out, **kw):
    from fastkd.cache_cmd import build_cache

    kw = {"resolution": RES, "seed": SEED, "batch_size": BATCH, "chunk_size": CHUNK, "num_workers": 0,
          "progress": False, "device": "cpu", **kw}
    return build_cache(data["pack"], "resnet18", str(data["weights"]), kw.pop("views", K), out, **kw)


@pytest.fixture(scope="module")
def built(data):
    out = data["root"] / "cache"
    manifest = _build(data, out)
    return {"dir": out, "manifest": manifest, "cache": TeacherCache.open(out)}


@pytest.fixture(scope="module")
def teacher(data):
    from fastkd.models import load_teacher
    from fastkd.packformat import load_manifest

    return load_teacher(str(data["weights"]), "resnet18", load_manifest(data["pack"]))


def _loader(data, **kw):
    kw = {"num_workers": 1, "return_indices": True, "seed": SEED, **kw}
    return build_loader(data["pack"], "train", kw.pop("backend", "torch"), kw.pop("batch_size", 4), RES, "cpu",
                        "fp32", **kw)


def _store(data):
    loader = _loader(data)
    return ShardStore(shard_paths(data["pack"], loader.manifest, "train"), loader.num_samples)


def test_cached_logits_and_w_equal_the_live_teacher_on_the_same_view(data, built, teacher):
    """View k of image i is the torch loader's epoch-k crop (same seed): the teacher run live on
    what that loader yields gives the cached logits (within fp16 rounding) and w."""
    cache, store = built["cache"], _store(data)
    assert cache.views == K and cache.num_samples == N_CLASSES * PER_CLASS and cache.resolution == RES
    seen = 0
    for k in range(K):
        loader = _loader(data)
        loader.set_epoch(k)
        for images, _, idx in loader:
            with torch.inference_mode():
                live = teacher(images).float()
            cached = cache.logits(idx, k)
            assert cached.dtype == torch.float16 and cached.shape == live.shape
            torch.testing.assert_close(cached.float(), live, rtol=1e-3, atol=5e-4)
            torch.testing.assert_close(cache.w(idx, k), confidence_weight(live), rtol=0, atol=1e-5)
            for i, box, flip in zip(idx.tolist(), cache.boxes(idx, k), cache.flips(idx, k)):
                h, w = decode_jpeg(store.jpeg(i), mode=ImageReadMode.RGB).shape[1:]
                assert (tuple(box.tolist()), bool(flip)) == train_params(SEED, k, i, h, w)
            seen += len(idx)
    assert seen == K * 16  # drop_last: 16 of 18 images per epoch
    idx = np.arange(cache.num_samples)
    assert not torch.allclose(cache.logits(idx, 0), cache.logits(idx, 1))  # views differ: not vacuous


def test_view_order_shows_every_view_once_per_block(built):
    cache, idx = built["cache"], np.arange(18)
    for block in range(2):
        shown = np.stack([cache.view_of(block * K + e, idx) for e in range(K)], axis=1)  # [N, K]
        assert (np.sort(shown, axis=1) == np.arange(K)).all()
    assert not np.array_equal(cache.view_of(0, idx), cache.view_of(K, idx))  # a new order per block
    assert len({tuple(cache.view_of(0, idx[i:i + 6])) for i in (0, 6, 12)}) > 1
    assert np.array_equal(view_order(3, 5, idx, K), view_order(3, 5, idx, K))
    assert cache.view_of(2, 5) == int(cache.view_of(2, np.array([5]))[0])


@pytest.mark.parametrize("epoch", [0, K + 1])
def test_torch_loader_replays_the_cached_boxes(data, built, teacher, epoch):
    """With the cache attached, train images are exactly the direct crop of each image's cached
    box for the epoch's view, and the feed hands the step that view's logits."""
    cache, store = built["cache"], _store(data)
    loader = _loader(data, **cache_loader_options(cache))
    feed = CacheFeed(cache, "cpu")
    feed.attach(loader)
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == 4
    for images, _, idx in batches:
        views = cache.view_of(epoch, idx)
        direct = []
        for i, box, flip in zip(idx.tolist(), cache.boxes(idx, views), cache.flips(idx, views)):
            image = decode_jpeg(store.jpeg(i), mode=ImageReadMode.RGB)
            direct.append(crop_resize(image, tuple(box.tolist()), RES, bool(flip)))
        assert torch.equal(images, normalize_uint8_cpu(torch.cat(direct), torch.float32))
        t = feed.teacher_logits(epoch, idx)
        assert t.dtype == torch.float32 and t.shape == (len(idx), N_CLASSES)
        with torch.inference_mode():
            torch.testing.assert_close(t, teacher(images).float(), rtol=1e-3, atol=5e-4)
        assert torch.equal(feed.w(epoch, idx), cache.w(idx, views))
    # a mid-epoch start (resume) replays the same crops for the tail
    loader.set_epoch(epoch, start_batch=2)
    tail = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(tail, batches[2:]))


class _Recording(torch.nn.Module):
    """A teacher that keeps every input it is given (the build's views, in forward order)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("batched", [False, True])
def test_teacher_saw_the_pixels_the_loader_shows(data, built, tmp_path, monkeypatch, batched):
    """The build and the training loader share one crop/resize/normalise pipeline: for every
    (image i, view v), the tensor the cache's teacher was given is, bit for bit, image i of the
    torch loader's batch in the epoch that shows view v (host or batched resize on both sides)."""
    import fastkd.models

    made = []

    def recording_teacher(*args, **kw):
        made.append(_Recording(load_teacher(*args, **kw)))
        return made[-1]

    load_teacher = fastkd.models.load_teacher
    monkeypatch.setattr(fastkd.models, "load_teacher", recording_teacher)
    _build(data, tmp_path / "cache", batched=batched)
    seen = torch.cat(made[0].seen)  # a fresh build goes through the images in order: row i*K + v
    cache = TeacherCache.open(tmp_path / "cache")
    assert seen.shape == (cache.num_samples * K, 3, RES, RES)
    loader = _loader(data, batched_resize=batched, **cache_loader_options(cache))
    CacheFeed(cache, "cpu").attach(loader)
    shown = set()
    for epoch in range(K):  # one block of K epochs shows every view of every image once
        loader.set_epoch(epoch)
        for images, _, idx in loader:
            rows = idx.numpy() * K + cache.view_of(epoch, idx)
            assert torch.equal(images, seen[rows]), f"epoch {epoch}: the loader shows other pixels"
            shown.update(rows.tolist())
    assert len(shown) == K * 16  # drop_last: 16 of 18 images per epoch, each view of them once


def test_replay_pickles_and_scales_to_a_larger_source(built):
    cache = built["cache"]
    replay = pickle.loads(pickle.dumps(cache.replay))  # what a DataLoader worker receives
    h, w = (int(x) for x in np.load(built["dir"] / "sizes.npy")[5])
    box, flip = replay(4, 5, h, w)
    view = cache.view_of(4, 5)
    assert box == tuple(cache.boxes([5], view)[0].tolist()) and flip == bool(cache.flips([5], view)[0])
    big, _ = replay(4, 5, 2 * h, 2 * w)  # unresized source of a pack made with --max-side
    assert big == tuple(2 * v for v in box)


def test_folder_loader_replays_the_cached_boxes(data, built):
    cache = built["cache"]
    loader = _loader(data, backend="folder", **cache_loader_options(cache))
    CacheFeed(cache, "cpu").attach(loader)
    loader.set_epoch(2)
    files = loader.folder.samples
    for images, _, idx in loader:
        views = cache.view_of(2, idx)
        direct = []
        for i, box, flip in zip(idx.tolist(), cache.boxes(idx, views), cache.flips(idx, views)):
            image = Image.open(files[i][0]).convert("RGB")
            crop = TF.resized_crop(image, *box.tolist(), [RES, RES], antialias=True)
            direct.append(TF.pil_to_tensor(TF.hflip(crop) if flip else crop).unsqueeze(0))
        assert torch.equal(images, normalize_uint8_cpu(torch.cat(direct), torch.float32))


def test_backends_without_replay_refuse(data, built):
    from fastkd.data.dali_loader import DALILoader
    from fastkd.data.ffcv_loader import FFCVLoader

    for cls, name in ((FFCVLoader, "ffcv"), (DALILoader, "dali")):
        with pytest.raises(FastKDError, match=f"the {name} loader cannot crop given boxes"):
            cls.set_crop_fn(object.__new__(cls), built["cache"].replay)
    val = build_loader(data["pack"], "val", "torch", 4, RES, "cpu", "fp32", num_workers=1, return_indices=True)
    with pytest.raises(ValueError, match="train only"):
        CacheFeed(built["cache"], "cpu").attach(val)
    with pytest.raises(ValueError, match="cache_loader_options"):
        CacheFeed(built["cache"], "cpu").attach(_loader(data, return_indices=False))


def test_interrupted_build_resumes_to_the_same_cache(data, built, tmp_path):
    out = tmp_path / "cache"
    ran = []

    def stop_after_two(chunk):
        ran.append(chunk)
        if len(ran) == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _build(data, out, on_chunk=stop_after_two)
    assert not (out / "manifest.json").exists()
    with pytest.raises(FastKDError, match="incomplete"):
        TeacherCache.open(out)
    with pytest.raises(FastKDError, match="views 3 -> 2"):  # other settings on the unfinished build
        _build(data, out, views=2)
    resumed = []
    manifest = _build(data, out, on_chunk=resumed.append)
    assert ran == [0, 1] and resumed == [2, 3, 4]  # 18 images in chunks of 4: only the rest ran
    assert manifest["identity"] == built["manifest"]["identity"]
    for name, entry in built["manifest"]["arrays"].items():
        assert np.array_equal(np.load(out / entry["file"]), np.load(built["dir"] / entry["file"])), name
    assert not (out / ".build").exists()
    assert _build(data, out, on_chunk=resumed.append)["identity"] == manifest["identity"]  # done: no-op
    assert resumed == [2, 3, 4]
    with pytest.raises(FastKDError, match="--overwrite"):
        _build(data, out, resolution=RES * 2)


def test_mismatched_cache_is_refused(data, built, tmp_path):
    root = built["dir"]
    TeacherCache.open(root, expect={"pack": data["pack"], "classes": WNIDS, "resolution": RES,
                                    "num_samples": 18, "teacher": "resnet18", "entropy_temperature": 1.0})
    other = _make_pack(tmp_path, WNIDS, 1)
    with pytest.raises(FastKDError, match="pack: made from another pack"):
        TeacherCache.open(root, expect={"pack": other})
    with pytest.raises(FastKDError, match="classes: the same 3 classes in another label order"):
        TeacherCache.open(root, expect={"classes": WNIDS[::-1]})
    with pytest.raises(FastKDError, match=r"classes: the cache has 3 classes, the run 2"):
        TeacherCache.open(root, expect={"classes": ["n00000000", "n99999999"]})
    with pytest.raises(FastKDError, match="resolution: the teacher saw 32 px views, the run trains at 64 px"):
        TeacherCache.open(root, expect={"resolution": 64})
    with pytest.raises(FastKDError, match="resolution: .* at 32, 48 px"):  # progressive resizing
        TeacherCache.open(root, expect={"resolution": [32, 48, 32]})
    with pytest.raises(FastKDError, match="teacher: .* resnet18's logits, the run names resnet50"):
        TeacherCache.open(root, expect={"teacher": "resnet50"})
    with pytest.raises(FastKDError, match="entropy_temperature"):
        TeacherCache.open(root, expect={"entropy_temperature": 2.0})
    # a damaged or edited cache
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in root.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["resolution"] = 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastKDError, match="identity does not match"):
        TeacherCache.open(copy)
    (copy / "manifest.json").write_bytes((root / "manifest.json").read_bytes())
    w = np.load(copy / "w.npy")
    np.save(copy / "w.npy", w + 1)
    with pytest.raises(FastKDError, match=r"rows of chunk\(s\) \[0, 1, 2, 3, 4\]"):
        TeacherCache.open(copy)  # same size: the sampled chunk checksums (all 5 chunks here) see it
    with pytest.raises(FastKDError, match="w.npy sha256 differs"):
        TeacherCache.open(copy, verify=True)


def test_topk_storage_above_the_class_limit(data, tmp_path):
    """Above full_max_classes: the top k logits exactly (fp16) and the rest sharing the remaining
    probability equally, so the softmax of the rebuilt row keeps the top k and the total mass."""
    from fastkd.cacheformat import compress_logits

    logits = torch.randn(5, 30) * 3
    stored = compress_logits(logits, {"kind": "topk", "k": 6, "dtype": "float16"})
    rebuilt = expand_logits(stored["logits"], stored["topk_index"], stored["rest"], 30).float()
    p, q = logits.softmax(1), rebuilt.softmax(1)
    top = logits.topk(6, dim=1).indices
    torch.testing.assert_close(q.gather(1, top), p.gather(1, top), rtol=5e-3, atol=1e-4)
    rest = torch.ones_like(q, dtype=torch.bool).scatter_(1, top, False)
    assert torch.allclose(q[rest].view(5, 24), q[rest].view(5, 24)[:, :1])  # uniform on the rest
    manifest = _build(data, tmp_path / "topk", views=1, full_max_classes=2, topk=2)
    assert manifest["storage"] == {"kind": "topk", "k": 2, "dtype": "float16"}
    cache = TeacherCache.open(tmp_path / "topk")
    assert cache.logits(np.arange(18), 0).shape == (18, N_CLASSES)
    assert manifest["bytes_per_image"] == 2 * 2 + 4 * 2 + 2 + 16 + 1 + 4 + 8


def test_command_reports_size_per_image(data, built, capsys):
    from fastkd import cache_cmd

    parser = argparse.ArgumentParser()
    cache_cmd.add_arguments(parser)
    args = parser.parse_args(["--data", str(data["pack"]), "--teacher", "resnet18", "--teacher-weights",
                              str(data["weights"]), "--views", str(K), "--out", str(built["dir"]),
                              "--resolution", str(RES), "--seed", str(SEED), "--device", "cpu", "--quiet"])
    assert cache_cmd.run(args) == 0  # the finished cache: nothing to do
    per = K * (2 * N_CLASSES + 16 + 1 + 4) + 8
    assert f"18 images x {K} views x {N_CLASSES} classes (full), {per} B per image" in capsys.readouterr().out


def test_step_benchmark_writes_a_schema_result(tmp_path, capsys):
    """benchmarks/teacher_cache_step.py: both modes measured in one run, the ratio against the live
    teacher, the JSON valid under benchmarks/common.py's schema."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("teacher_cache_step", folder / "teacher_cache_step.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        import common

        out = tmp_path / "r.json"
        assert bench.main(["--res", "16", "--batch", "2", "--teacher", "resnet18", "--students", "resnet18",
                           "--method", "kd", "--num-classes", "10", "--views", "2", "--steps", "1",
                           "--windows", "1", "--warmup", "0", "--json", str(out)]) == 0
        result = common.read_result(out)
    finally:
        sys.path.remove(str(folder))
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"live_teacher", "teacher_cache", "cache_read"}
    assert rows["teacher_cache"]["baseline"] == "live_teacher" and rows["teacher_cache"]["ratio"] > 0
    assert rows["teacher_cache"]["ratio"] == pytest.approx(rows["teacher_cache"]["value"] / rows["live_teacher"]["value"])
    assert "teacher_cache / live_teacher:" in capsys.readouterr().out


def test_batched_build_path_matches(data, built, tmp_path):
    """The CUDA path of the build (bytes from the workers, decode in the main process, K crops
    per image by crop_resize_batch), run on the CPU: the same boxes, flips and sizes, and logits
    within the resize's 1-level pixel difference of the per-image path."""
    manifest = _build(data, tmp_path / "batched", batched=True)
    cache, ref = TeacherCache.open(tmp_path / "batched"), built["cache"]
    idx = np.arange(18)
    for k in range(K):
        assert np.array_equal(cache.boxes(idx, k), ref.boxes(idx, k))
        assert np.array_equal(cache.flips(idx, k), ref.flips(idx, k))
        torch.testing.assert_close(cache.logits(idx, k).float(), ref.logits(idx, k).float(), rtol=0, atol=0.4)
    assert (ref.logits(idx, 0).float() - ref.logits(idx, 1).float()).abs().mean() > 0.8  # views differ more
    assert np.array_equal(np.load(tmp_path / "batched" / "sizes.npy"), np.load(built["dir"] / "sizes.npy"))
    assert manifest["identity"] != built["manifest"]["identity"]  # other bytes, another identity


def test_training_with_a_cache_runs_no_teacher_and_refuses_another_cache(data, built, tmp_path, capsys):
    """`fastkd train --teacher-cache DIR`: no teacher module, the KD term from the cached logits,
    the cache's identity in last.pt, and a resume with another cache refused by name."""
    from fastkd import cli
    from fastkd.checkpoint import load_last
    from fastkd.train import Trainer

    out = tmp_path / "run"
    args = ["train", "--data", str(data["pack"]), "--backend", "torch", "--method", "uadkd",
            "--students", "resnet18,resnet18", "--teacher-cache", str(built["dir"]), "--batch-size", "4",
            "--data.resolution", str(RES), "--data.val_resolution", str(RES), "--data.num_workers", "1",
            "--run.device", "cpu", "--run.live", "false", "--run.log_every", "2", "--log", "none",
            "--epochs", "2", "--out", str(out)]  # fmt: skip
    seen = []
    original = Trainer.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        seen.append(self)

    import unittest.mock

    with unittest.mock.patch.object(Trainer, "__init__", spy):
        assert cli.main(args + ["--run.stop_after", "1"]) == 0
    assert seen[0].teacher is None and seen[0].cache_feed is not None
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert steps and all(v > 0 for r in steps for v in r["kd"].values()) and 0 < steps[-1]["w_mean"] < 1
    assert load_last(out / "checkpoints/last.pt")["teacher_cache"] == built["cache"].identity

    other = data["root"] / "cache-2views"
    _build(data, other, views=2)
    capsys.readouterr()
    assert cli.main([*args, "--resume", "auto", "--teacher-cache", str(other)]) == 2
    assert "teacher cache" in capsys.readouterr().err
    assert cli.main([*args, "--resume", "auto"]) == 0  # its own cache: continues
    assert load_last(out / "checkpoints/last.pt")["epoch"] == 2


def test_resumed_build_remakes_chunks_whose_rows_changed(data, built, tmp_path):
    """Chunk checksums: a truncated logits.npy and zeroed rows of a kept chunk are made again,
    never kept as zeros; the finished cache equals the uninterrupted one."""
    out = tmp_path / "cache"

    def stop_after_three(chunk):
        if chunk == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _build(data, out, on_chunk=stop_after_three)
    w = np.load(out / "w.npy", mmap_mode="r+")
    w[CHUNK:2 * CHUNK] = 0  # chunk 1's rows lost, its marker still there
    w.flush()
    del w
    logits = out / "logits.npy"
    logits.write_bytes(logits.read_bytes()[: logits.stat().st_size // 2])  # truncated mid-build
    remade = []
    manifest = _build(data, out, on_chunk=remade.append)
    assert remade == [0, 1, 2, 3, 4]  # every chunk: the truncated array was made anew
    assert manifest["identity"] == built["manifest"]["identity"]
    for name, entry in built["manifest"]["arrays"].items():
        assert np.array_equal(np.load(out / entry["file"]), np.load(built["dir"] / entry["file"])), name


def test_open_and_verify_catch_flipped_logits(data, built, tmp_path, capsys):
    from fastkd import cli

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in built["dir"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert cli.main(["verify", str(copy)]) == 0 and "OK: teacher cache" in capsys.readouterr().out
    logits = np.load(copy / "logits.npy", mmap_mode="r+")
    logits[5] = -logits[5]  # same size: only the chunk checksums see it
    logits.flush()
    del logits
    with pytest.raises(FastKDError, match=r"chunk\(s\) \[1\]"):
        TeacherCache.open(copy)  # the check every training run does before it starts
    assert cli.main(["verify", str(copy)]) == 1 and "logits.npy sha256 differs" in capsys.readouterr().out


def test_training_refuses_a_teacher_that_contradicts_the_cache(data, built, tmp_path, capsys):
    from fastkd import cli

    out = tmp_path / "run"
    args = ["train", "--data", str(data["pack"]), "--backend", "torch", "--method", "uadkd",
            "--students", "resnet18,resnet18", "--teacher-cache", str(built["dir"]), "--batch-size", "4",
            "--data.resolution", str(RES), "--data.val_resolution", str(RES), "--run.device", "cpu",
            "--run.live", "false", "--log", "none", "--epochs", "1", "--out", str(out)]  # fmt: skip
    other = tmp_path / "other.pt"
    other.write_bytes(data["weights"].read_bytes())
    assert cli.main([*args, "--teacher-weights", str(other)]) == 2
    assert "name two teachers" in capsys.readouterr().err
    assert cli.main([*args, "--teacher", "mobilenet_v2"]) == 2
    assert "resnet18's logits, the run names mobilenet_v2" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main([*args, "--run.stop_after", "1"]) == 0
    err = capsys.readouterr().err
    assert f"teacher cache {built['dir']}" in err and "resnet18 logits" in err
    assert "teacher: resnet18" in (out / "config.yaml").read_text()  # the cache's, not the default resnet50
