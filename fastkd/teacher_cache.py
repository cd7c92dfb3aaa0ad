"""Teacher once, students many times: a per-view cache of the teacher's logits.

    fastkd teacher-cache --data PACKED --teacher resnet50 --teacher-weights W --views 8 --out CACHE
    cache = TeacherCache.open(CACHE, expect={"pack": PACKED, "classes": wnids, "resolution": 160})
    loader = build_loader(PACKED, "train", "torch", ..., **cache_loader_options(cache))
    feed = CacheFeed(cache, device)
    feed.attach(loader)                                    # train crops = the cached boxes
    # (a training run: fastkd.cache_run.feed_for_run does all of the above and checks the run)
    for images, labels, indices in loader:                 # (loader.set_epoch(epoch) before)
        t = feed.teacher_logits(epoch, indices)            # [B, C] fp32 on the device
        step(images, labels, teacher_logits=t)             # the teacher does not run

What a cache holds. For every train image i of a pack and every view k < K: a crop box and flip
drawn exactly as the torch loader draws epoch k's crop with the cache's seed
(`transforms.train_params(seed, k, i, H, W)`: training's RandomResizedCrop distribution), the
teacher's logits on that view (decoded, cropped, resized to `resolution` and normalised as every
loader does) and w = `losses.confidence_weight(logits, T_w)` from the fp32 logits. Training never
runs the teacher: in epoch e image i is shown as view `view_of(e, i)`, cropped at the cached box,
and the step gets the cached logits.

What it changes in training: the augmentation is a fixed set of K views per image (each view once
every K epochs, in an order drawn from (seed, e // K, i)) instead of a fresh crop every epoch, so
results are not identical to live-teacher training; logits are stored in fp16 (relative error
below 1e-3). The cache is made at one resolution: a run at another one (or with progressive
resizing) is refused, as is one on another pack or with other classes.

Layout of DIR (manifest, arrays, build state) and the logits' storage: fastkd/cacheformat.py,
which the writer (fastkd/cache_writer.py) shares with this reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from fastkd.cache_chunks import check_chunks
from fastkd.cacheformat import (BUILD_DIR, FORMAT, MANIFEST, VERSION, expand_logits, identity_of,
                                pack_fingerprint)
from fastkd.errors import FastKDError
from fastkd.packformat import MANIFEST_NAME, sha256_file


# ----------------------------------------------------------------------------- which view in which epoch

_U64 = 0xFFFFFFFFFFFFFFFF


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a fast, vectorised hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def view_order(seed: int, epoch: int, indices: np.ndarray, views: int) -> np.ndarray:
    """int64 [B] pack indices -> int64 [B] view shown in `epoch`: for each block of K epochs a
    permutation of the K views drawn from (seed, epoch // K, index), so every view of every
    image is shown once per K epochs; independent of rank, batch and worker."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1).astype(np.uint64)
    block = np.uint64(int(epoch) // views)
    key = _mix(_mix(np.full(idx.shape, int(seed) & _U64, dtype=np.uint64)) ^ idx)
    key = _mix(key ^ block)
    draws = _mix(key[:, None] ^ np.arange(views, dtype=np.uint64)[None, :])  # [B, K]
    return np.argsort(draws, axis=1, kind="stable")[:, int(epoch) % views].astype(np.int64)


def _as_index(x) -> np.ndarray:
    """Indices (int, list, numpy, torch CPU tensor) -> int64 [B]."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64).reshape(-1)


# ----------------------------------------------------------------------------- reading


def is_teacher_cache(root: str | Path) -> bool:
    """True when root/manifest.json is a readable JSON object of this format (any version)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _class_ids(classes: Iterable) -> list[str]:
    return [c["wnid"] if isinstance(c, dict) else str(c) for c in classes]


class TeacherCache:
    """A finished cache, its arrays memory-mapped read-only (opened lazily, also after pickling:
    DataLoader workers map the files themselves)."""

    def __init__(self, root: str | Path, manifest: dict, view_seed: int | None = None):
        self.root, self.manifest = Path(root), manifest
        self.views = int(manifest["views"])
        self.num_samples = int(manifest["pack"]["count"])
        self.num_classes = int(manifest["num_classes"])
        self.resolution = int(manifest["resolution"])
        self.seed = int(manifest["seed"])
        self.view_seed = self.seed if view_seed is None else int(view_seed)  # order of the views
        self.identity = manifest["identity"]
        self._arrays: dict[str, np.ndarray] | None = None

    @classmethod
    def open(cls, root: str | Path, expect: dict | None = None, verify: bool = False,
             view_seed: int | None = None) -> "TeacherCache":
        """Open DIR, check its files (sizes and .npy headers; sha256 too with verify=True) and,
        with `expect`, that it fits the run. expect keys (each optional): pack (the run's packed
        directory), classes (WNIDs in label order, or a manifest's classes), resolution (an int,
        or every resolution the run trains at), num_samples, teacher (architecture),
        entropy_temperature. Any mismatch: one FastKDError naming each. `view_seed`: the seed of
        the view order (default the cache's)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            if (root / BUILD_DIR).is_dir():
                raise FastKDError(f"teacher cache {root} is incomplete (its build was interrupted): run the "
                                  f"same `fastkd teacher-cache ... --out {root}` command again to finish it")
            raise FastKDError(f"{root}: no {MANIFEST}; not a teacher cache (make one with `fastkd teacher-cache`)")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise FastKDError(f"{path}: unreadable ({error}); rebuild the cache") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise FastKDError(f"{path}: not a {FORMAT} v{VERSION} manifest (format {manifest.get('format')!r}, "
                              f"version {manifest.get('version')!r}); rebuild with `fastkd teacher-cache`")
        if manifest.get("identity") != identity_of(manifest):
            raise FastKDError(f"{path}: its identity does not match its content (edited by hand?); rebuild the cache")
        cls._check_files(root, manifest, verify)
        check_chunks(root, manifest, every=verify)  # sampled rows: flipped or zeroed logits
        if expect:
            problems = mismatches(manifest, expect)
            if problems:
                raise FastKDError(f"teacher cache {root} does not fit this run: " + "; ".join(problems))
        return cls(root, manifest, view_seed)

    @staticmethod
    def _check_files(root: Path, manifest: dict, verify: bool) -> None:
        problems = []
        for name, entry in manifest["arrays"].items():
            path = root / entry["file"]
            if not path.is_file():
                problems.append(f"{entry['file']} missing")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{entry['file']} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
            elif verify and sha256_file(path) != entry["sha256"]:
                problems.append(f"{entry['file']} sha256 differs from the manifest's")
            else:
                arr = np.load(path, mmap_mode="r")
                if list(arr.shape) != entry["shape"] or arr.dtype != np.dtype(entry["dtype"]):
                    problems.append(f"{entry['file']} is {list(arr.shape)} {arr.dtype}, the manifest says "
                                    f"{entry['shape']} {entry['dtype']}")
        if problems:
            raise FastKDError(f"teacher cache {root}: " + "; ".join(problems) + "; rebuild it")

    def _array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {n: np.load(self.root / e["file"], mmap_mode="r") for n, e in self.manifest["arrays"].items()}
        return self._arrays[name]

    def __getstate__(self):  # memory maps do not pickle; a worker maps the files itself
        return {**self.__dict__, "_arrays": None}

    @property
    def bytes_per_image(self) -> float:
        return float(self.manifest["bytes_per_image"])

    def view_of(self, epoch: int, index):
        """The view shown in `epoch` for pack index `index` (an int -> int; indices -> int64 [B])."""
        views = view_order(self.view_seed, epoch, _as_index(index), self.views)
        return int(views[0]) if np.ndim(index) == 0 else views

    def _rows(self, indices, views) -> tuple[np.ndarray, np.ndarray]:
        idx = _as_index(indices)
        v = np.broadcast_to(_as_index(views), idx.shape) if np.ndim(views) else np.full(idx.shape, int(views))
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples or v.min() < 0 or v.max() >= self.views):
            raise IndexError(f"cache rows ({idx.min()}..{idx.max()}, views {v.min()}..{v.max()}) outside "
                             f"{self.num_samples} images x {self.views} views")
        return idx, v

    def boxes(self, indices, views) -> np.ndarray:
        """int32 [B, 4] (top, left, h, w) of each (image, view), in the packed image's pixels."""
        idx, v = self._rows(indices, views)
        return np.asarray(self._array("boxes")[idx, v])

    def flips(self, indices, views) -> np.ndarray:
        idx, v = self._rows(indices, views)
        return np.asarray(self._array("flips")[idx, v])

    def logits(self, indices, views) -> torch.Tensor:
        """fp16 [B, C] teacher logits of each (image, view), on the CPU."""
        idx, v = self._rows(indices, views)
        values = np.asarray(self._array("logits")[idx, v])
        if self.manifest["storage"]["kind"] == "full":
            return torch.from_numpy(values)
        return expand_logits(values, self._array("topk_index")[idx, v], self._array("rest")[idx, v],
                             self.num_classes)

    def w(self, indices, views) -> torch.Tensor:
        """fp32 [B] teacher confidence weight of each (image, view), from its fp32 logits."""
        idx, v = self._rows(indices, views)
        return torch.from_numpy(np.asarray(self._array("w")[idx, v]))

    def replay(self, epoch: int, index: int, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """A loader's crop_fn: (box, flip) of image `index`'s view in `epoch`. An image of another
        size than the packed one (the folder backend reads the unresized source) gets the box
        scaled to it: the same part of the picture."""
        index = int(index)
        view = int(view_order(self.view_seed, epoch, np.array([index]), self.views)[0])
        top, left, h, w = (int(x) for x in self._array("boxes")[index, view])
        flip = bool(self._array("flips")[index, view])
        H, W = (int(x) for x in self._array("sizes")[index])
        if (height, width) != (H, W):
            sy, sx = height / H, width / W
            top, h = min(int(math.floor(top * sy)), height - 1), max(1, int(round(h * sy)))
            left, w = min(int(math.floor(left * sx)), width - 1), max(1, int(round(w * sx)))
            h, w = min(h, height - top), min(w, width - left)
        return (top, left, h, w), flip


def mismatches(manifest: dict, expect: dict) -> list[str]:
    """What in `expect` (TeacherCache.open) the cache's manifest contradicts, one line each."""
    unknown = set(expect) - {"pack", "classes", "resolution", "num_samples", "teacher", "entropy_temperature"}
    if unknown:
        raise ValueError(f"unknown expect key(s) {sorted(unknown)}")
    problems = []
    if expect.get("pack") is not None:
        want = pack_fingerprint(expect["pack"])
        if want != manifest["pack"]["manifest_sha256"]:
            problems.append(f"pack: made from another pack (its {MANIFEST_NAME} sha256 "
                            f"{manifest['pack']['manifest_sha256'][:12]}, {expect['pack']}/{MANIFEST_NAME} has "
                            f"{want[:12]}; was {manifest['pack'].get('dir')}); rebuild it with --data {expect['pack']}")
    if expect.get("classes") is not None:
        have, want = manifest["classes"], _class_ids(expect["classes"])
        if have != want:
            if sorted(have) == sorted(want):
                first = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
                problems.append(f"classes: the same {len(have)} classes in another label order (first "
                                f"difference at label {first}: {have[first]} vs {want[first]})")
            else:
                missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
                problems.append(f"classes: the cache has {len(have)} classes, the run {len(want)} (not in the "
                                f"cache: {missing[:5]}; not in the run: {extra[:5]})")
    if expect.get("resolution") is not None:
        want = expect["resolution"]
        wants = sorted({int(want)} if isinstance(want, (int, np.integer)) else {int(r) for r in want})
        if wants != [int(manifest["resolution"])]:
            problems.append(f"resolution: the teacher saw {manifest['resolution']} px views, the run trains at "
                            f"{', '.join(map(str, wants))} px (no progressive resizing with a cache; build one "
                            f"at the run's resolution with --resolution)")
    if expect.get("num_samples") is not None and int(expect["num_samples"]) != int(manifest["pack"]["count"]):
        problems.append(f"num_samples: the cache has {manifest['pack']['count']} train images, the run "
                        f"{expect['num_samples']}")
    if expect.get("teacher") is not None and expect["teacher"] != manifest["teacher"]["arch"]:
        problems.append(f"teacher: the cache holds {manifest['teacher']['arch']}'s logits, the run names "
                        f"{expect['teacher']}")
    if expect.get("entropy_temperature") is not None:
        if not math.isclose(float(expect["entropy_temperature"]), float(manifest["entropy_temperature"])):
            problems.append(f"entropy_temperature: the cache's w used T_w={manifest['entropy_temperature']}, "
                            f"the run's loss.entropy_temperature is {expect['entropy_temperature']}")
    return problems


# ----------------------------------------------------------------------------- training with a cache


def cache_loader_options(cache: TeacherCache) -> dict[str, Any]:
    """build_loader keywords a cache needs: the samples' pack indices (to fetch their logits).
    Then `CacheFeed.attach(loader)` makes the loader crop the cached boxes."""
    return {"return_indices": True}


class CacheFeed:
    """The trainer's side of a cache: replayed crops in the loader, cached logits to the step."""

    def __init__(self, cache: TeacherCache, device: torch.device | str):
        self.cache, self.device = cache, torch.device(device)
        self._pin = self.device.type == "cuda"

    def attach(self, loader) -> None:
        """Train passes of `loader` crop each image's cached box for the epoch's view (FastKDError
        from backends that cannot: ffcv, dali)."""
        if not loader.spec.train:
            raise ValueError(f"CacheFeed.attach: split {loader.spec.split!r} is not augmented (train only)")
        if loader.num_samples != self.cache.num_samples:
            raise FastKDError(f"teacher cache {self.cache.root} has {self.cache.num_samples} train images, "
                              f"the loader {loader.num_samples}: made for another pack")
        if not loader.spec.return_indices:
            raise ValueError("the loader must yield indices: build it with **cache_loader_options(cache)")
        loader.set_crop_fn(self.cache.replay)

    def describe(self) -> str:
        """One line for the training output: whose logits, from where, how many views."""
        t = self.cache.manifest["teacher"]
        return (f"teacher cache {self.cache.root} (identity {self.cache.identity}): {t['arch']} logits "
                f"({t['weights']}), {self.cache.views} views per image, no teacher forward")

    def views(self, epoch: int, indices) -> np.ndarray:
        return self.cache.view_of(epoch, _as_index(indices))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def teacher_logits(self, epoch: int, indices) -> torch.Tensor:
        """fp32 [B, C] on the device: the cached logits of the views the loader showed in `epoch`."""
        idx = _as_index(indices)
        return self._to_device(self.cache.logits(idx, self.cache.view_of(epoch, idx))).float()

    def w(self, epoch: int, indices) -> torch.Tensor:
        """fp32 [B] on the device: the cached w of those views."""
        idx = _as_index(indices)
        return self._to_device(self.cache.w(idx, self.cache.view_of(epoch, idx)))
