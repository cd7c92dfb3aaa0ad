r"""Run the teacher once over K augmented views of every train image: a teacher cache for training.

    fastkd teacher-cache --data data/imagenet100-packed --teacher resnet50 \
        --teacher-weights runs/imagenet100-teacher --views 8 --resolution 160 --out cache/r50-k8
    fastkd train ... --backend torch --teacher-cache cache/r50-k8     # no teacher forward per step

Per image i and view k < K: the crop box and flip the torch loader draws for epoch k with --seed
(training's RandomResizedCrop + flip), cut, resized to --resolution and normalised by the torch
loader's own functions (fastkd.data.torch_loader: decode on the host in workers, or nvJPEG on
CUDA as the loader decides; transforms.normalize_uint8, what Loader.normalize runs), the teacher
in eval mode (device, autocast and input dtype from fastkd.runtime, as in training: auto = bf16
on CUDA, fp32 on CPU), its logits stored in fp16 and w = confidence_weight(fp32 logits,
--entropy-temperature). Format: fastkd/cacheformat.py; what it changes in training:
fastkd/teacher_cache.py.

Why the build does not iterate a TorchLoader K times (epoch k = view k): a loader pass is a
shuffled pass over every image, so each image would be decoded K times instead of once, and no
chunk of images would be finished (all K views written) before the last pass, which would make
the build unresumable until its end. It takes images in order, decodes each once and crops its K
views in one call.

Disk: K x (2 C + 21) + 8 bytes per image with C <= 1000 classes (fp16 logits, int32 box, flip,
fp32 w; above 1000 classes the top --topk logits + index + the rest's mass). ImageNet-100 (126,689
images, C = 100) with K = 8: 1.8 KB per image, 225 MB. ImageNet-1k (1,281,167) with K = 8: 16 KB
per image, 21 GB.

Resumable: images are taken in chunks of --chunk-size; a chunk's rows go into the memory-mapped
arrays, are flushed, and only then is its marker OUT/.build/chunk-NNNNNN written (atomically),
holding the sha256 of the chunk's rows (fastkd/cache_chunks.py). Run the same command again after
a crash or Ctrl-C and it keeps each marked chunk whose rows still match that checksum (a chunk
of a truncated or damaged array is made again, with a note) and does the rest; other settings
on an unfinished OUT are refused (or --overwrite starts over). manifest.json, with every array's
sha256, is written last: until then `--teacher-cache OUT` refuses the folder as incomplete.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastkd.atomic import atomic_write_bytes
from fastkd.cache_chunks import chunk_range, num_chunks
from fastkd.cache_writer import CacheWriter
from fastkd.cacheformat import (ARRAY_NAMES, BUILD_DIR, BUILD_STATE, FULL_MAX_CLASSES, MANIFEST, MARKER_GLOB, TOPK,
                                array_file, array_specs, marker_chunk, marker_name, pack_fingerprint, storage_for)
from fastkd.data.packed import ShardStore, open_packed, shard_paths
from fastkd.data.torch_loader import crop_batch, decode_host, decode_jpegs, decode_where, jpeg_batch
from fastkd.data.transforms import crop_params, mean_std_255, normalize_uint8
from fastkd.errors import FastKDError
from fastkd.losses import confidence_weight
from fastkd.notes import console as shared_console
from fastkd.notes import drawing, say, show
from fastkd.packformat import sha256_file
from fastkd.runtime import AMP_MODES, amp_dtype, amp_mode, input_dtype, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="PACKED", help="packed directory (fastkd pack)")
    parser.add_argument("--teacher", default="resnet50", help="teacher architecture (torchvision name)")
    parser.add_argument("--teacher-weights", required=True, metavar="W",
                        help="fastkd checkpoint or run folder, state_dict file, or `imagenet`")
    parser.add_argument("--views", type=int, default=8, metavar="K", help="augmented views per image")
    parser.add_argument("--out", required=True, metavar="DIR", help="cache folder")
    parser.add_argument("--resolution", type=int, default=160, help="side of the views (px): the run's resolution")
    parser.add_argument("--seed", type=int, default=0, help="seed of the views' crops and flips")
    parser.add_argument("--batch-size", type=int, default=256, help="views per teacher forward")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES,
                        help="teacher autocast (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--entropy-temperature", type=float, default=1.0, help="T_w of the stored w")
    parser.add_argument("--chunk-size", type=int, default=2048, help="images per resumable chunk")
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: all cores)")
    parser.add_argument("--topk", type=int, default=TOPK, help=f"logits kept per view above {FULL_MAX_CLASSES} classes")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache (or unfinished build) in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    manifest = build_cache(args.data, args.teacher, args.teacher_weights, args.views, args.out,
                           resolution=args.resolution, seed=args.seed, batch_size=args.batch_size,
                           device=args.device, amp=args.amp, entropy_temperature=args.entropy_temperature,
                           chunk_size=args.chunk_size, num_workers=args.workers, topk=args.topk,
                           overwrite=args.overwrite, progress=not args.quiet, console=shared_console(err=True))
    n, per = manifest["pack"]["count"], manifest["bytes_per_image"]
    show(f"fastkd teacher-cache: {args.out}: {n:,} images x {manifest['views']} views x "
         f"{manifest['num_classes']} classes ({manifest['storage']['kind']}), {_size(per)} per image, "
         f"{_size(per * n)} in all; identity {manifest['identity']}")
    return 0


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


# ----------------------------------------------------------------------------- plan and folder


def _weights_identity(weights: str, arch: str) -> dict:
    """{arch, weights, sha256} of the teacher: the file's sha256 (torchvision's cached file for
    `imagenet`; None where it is not on disk)."""
    from fastkd.checkpoint import resolve_weights_path

    if weights == "imagenet":
        digest = None
        try:
            from torchvision.models import get_model_weights

            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(get_model_weights(arch).DEFAULT.url).name
            digest = sha256_file(path) if path.is_file() else None
        except Exception:  # noqa: BLE001 - no weights enum for this arch: load_teacher says so
            pass
        return {"arch": arch, "weights": "imagenet", "sha256": digest}
    path = resolve_weights_path(weights, arch)
    if not path.is_file():
        raise FastKDError(f"--teacher-weights {weights}: no file at {path}")
    return {"arch": arch, "weights": str(path.resolve()), "sha256": sha256_file(path)}


def _plan_diff(old: dict, new: dict, skip: tuple = ()) -> list[str]:
    """`key old -> new` for each setting of `new` that `old` (a build state or a manifest) differs in."""
    keys = [k for k in new if k not in ("created", "pack", *skip)] + ["pack.manifest_sha256"]
    diffs = []
    for key in keys:
        a = old.get("pack", {}).get("manifest_sha256") if key.startswith("pack.") else old.get(key)
        b = new["pack"]["manifest_sha256"] if key.startswith("pack.") else new[key]
        if a != b:
            diffs.append(f"{key} {str(a)[:60]} -> {str(b)[:60]}")
    return diffs


def _clear(out: Path) -> None:
    """Remove what a cache or a build of one wrote in `out` (nothing else)."""
    shutil.rmtree(out / BUILD_DIR, ignore_errors=True)
    for name in ARRAY_NAMES:
        (out / array_file(name)).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)


def _prepare(out: Path, plan: dict, overwrite: bool) -> str:
    """'done' (an identical finished cache), 'resume' or 'fresh'; refuses what it must not touch."""
    state_path = out / BUILD_DIR / BUILD_STATE
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        diffs = _plan_diff(old, plan, skip=("chunk_size",))
        if not diffs and not overwrite:
            return "done"
        if not overwrite:
            raise FastKDError(f"--out {out} holds a teacher cache made with other settings ({'; '.join(diffs)}); "
                              "pass --overwrite to replace it, or choose another --out")
        _clear(out)
    elif state_path.is_file():
        diffs = _plan_diff(json.loads(state_path.read_text()), plan)
        if not diffs:
            return "resume"
        if not overwrite:
            raise FastKDError(f"--out {out} holds an unfinished build with other settings ({'; '.join(diffs)}); "
                              "run that build's command again to finish it, or pass --overwrite to start over")
        _clear(out)
    elif out.exists() and any(out.iterdir()):
        raise FastKDError(f"--out {out} is not empty and holds no teacher cache: choose an empty or new folder")
    (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state_path, json.dumps(plan, indent=1).encode())
    return "fresh"


# ----------------------------------------------------------------------------- reading views


class _Views(torch.utils.data.Dataset):
    """Item: pack indices [b] -> (view_crops of the batch decoded on the host, indices), or, when
    the main process decodes on the device, (jpeg_batch's bytes, indices): the torch loader's
    worker item, with K views per image instead of one."""

    def __init__(self, store: ShardStore, seed: int, views: int, resolution: int, host: bool):
        self.store, self.seed, self.views, self.resolution, self.host = store, seed, views, resolution, host

    def __getitem__(self, indices):
        if not self.host:
            return jpeg_batch(self.store, indices), indices
        images = decode_host(self.store, indices)
        return view_crops(images, indices, self.seed, self.views, self.resolution, batched=False), indices


def _identity(item):
    return item


def view_crops(images: list, indices, seed: int, views: int, resolution: int, batched: bool) -> tuple:
    """Decoded uint8 [3,H,W] images [b] -> (uint8 [b*K,3,r,r] crops, image-major: row j*K+k is
    image j's view k; int64 [b,K,4] boxes; bool [b,K] flips; [b] (H, W) sizes).

    View k is the torch loader's train crop of epoch k: its own draw (crop_params) and its own
    crop (crop_batch), so a run replaying the cached boxes (CacheFeed) shows the teacher's pixels.
    One crop_batch call for all K views: each image is decoded once, not once per view."""
    sizes = [tuple(im.shape[1:]) for im in images]
    drawn = [crop_params(sizes, indices, seed, k, True) for k in range(views)]  # per view: [b,4], [b]
    boxes = np.stack([b for b, _ in drawn], axis=1)  # [b, K, 4]
    flips = np.stack([f for _, f in drawn], axis=1)  # [b, K]
    repeated = [im for im in images for _ in range(views)]
    return crop_batch(repeated, boxes.reshape(-1, 4), flips.reshape(-1), resolution, batched), boxes, flips, sizes


class _Bar:
    """Rich progress bar over images: done/total, rate, elapsed, ETA (disabled: no output)."""

    def __init__(self, total: int, done: int, enabled: bool, console=None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console or shared_console(), disable=not enabled)
        self.task = self.bar.add_task("cache", total=total, completed=done, rate="- img/s")
        self._drawing = contextlib.ExitStack()

    def __enter__(self):
        self.bar.start()
        if not self.bar.disable:  # the build's notes go above the bar
            self._drawing.enter_context(drawing(self.bar.console))
        return self

    def __exit__(self, *exc):
        self.bar.stop()
        self._drawing.close()

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
        speed = self.bar.tasks[0].speed
        self.bar.update(self.task, rate=f"{speed:,.0f} img/s" if speed else "- img/s")


# ----------------------------------------------------------------------------- the build


def build_cache(data, teacher: str, weights: str, views: int, out, *, resolution: int = 160, seed: int = 0,
                batch_size: int = 256, device: str = "auto", amp: str = "auto", entropy_temperature: float = 1.0,
                chunk_size: int = 2048, num_workers: int | None = None, full_max_classes: int = FULL_MAX_CLASSES,
                topk: int = TOPK, overwrite: bool = False, progress: bool = True, console=None,
                on_chunk: Callable[[int], None] | None = None, batched: bool | None = None) -> dict:
    """Build (or finish) the cache of `teacher` on pack `data` in `out`; returns its manifest.
    `on_chunk(c)` is called after chunk c is on disk (tests stop a build there). `batched`:
    workers only read bytes, the main process decodes on the device and crops with
    crop_resize_batch, as the torch loader does on CUDA (default: on CUDA; else workers decode
    and crop image by image, the torch loader's CPU path)."""
    from fastkd.models import load_teacher

    for flag, value, low in (("--views", views, 1), ("--resolution", resolution, 8), ("--batch-size", batch_size, 1),
                             ("--chunk-size", chunk_size, 1), ("--topk", topk, 1)):
        if int(value) < low:
            raise FastKDError(f"{flag} must be >= {low}, got {value}")
    if not entropy_temperature > 0:
        raise FastKDError(f"--entropy-temperature must be > 0, got {entropy_temperature}")
    dev = resolve_device(device, flag="--device")
    amp = amp_mode(amp, dev)  # the name the plan records: auto is resolved
    pack = open_packed(data, "train", "dali")
    n, classes = int(pack["splits"]["train"]["count"]), [c["wnid"] for c in pack["classes"]]
    storage = storage_for(len(classes), full_max_classes, topk)
    plan = {"teacher": _weights_identity(weights, teacher),
            "pack": {"dir": str(Path(data).resolve()), "manifest_sha256": pack_fingerprint(data), "count": n},
            "classes": classes, "views": int(views), "seed": int(seed), "resolution": int(resolution), "amp": amp,
            "entropy_temperature": float(entropy_temperature), "storage": storage, "chunk_size": int(chunk_size)}
    out = Path(out)
    mode = _prepare(out, plan, overwrite)
    if mode == "done":
        return json.loads((out / MANIFEST).read_text())
    specs = array_specs(n, views, len(classes), storage)
    marks = out / BUILD_DIR
    if any(not (out / array_file(name)).is_file() for name in specs):  # arrays gone: no marker can be trusted
        for mark in marks.glob(MARKER_GLOB):
            mark.unlink()
    writer = CacheWriter(out, n, views, len(classes), storage, resume=mode == "resume", note=say)
    digests = _kept_chunks(marks, writer, chunk_size, n)  # chunk -> digest of its rows
    chunks = [(c, *chunk_range(c, chunk_size, n)) for c in range(num_chunks(chunk_size, n)) if c not in digests]

    net = load_teacher(weights, teacher, pack, channels_last=True).to(dev)
    autocast = amp_dtype(amp, dev)  # None: fp32, no autocast
    in_dtype, mean_std = input_dtype(amp, dev), mean_std_255(dev)  # the images a training loader hands the step
    store = ShardStore(shard_paths(data, pack, "train"), n)
    batched = decode_where(dev) == "device" if batched is None else bool(batched)
    per_batch = max(1, batch_size // views)  # images per teacher forward
    batches = [(c, np.arange(s, min(e, s + per_batch))) for c, a, e in chunks for s in range(a, e, per_batch)]
    workers = (len(os.sched_getaffinity(0)) if num_workers is None else int(num_workers))
    loader = torch.utils.data.DataLoader(_Views(store, seed, views, resolution, host=not batched),
                                         batch_size=None, sampler=[b for _, b in batches], num_workers=workers,
                                         collate_fn=_identity)
    chunk_end = {c: e for c, _, e in chunks}
    done_images = n - sum(e - a for _, a, e in chunks)
    with _Bar(n, done_images, progress, console) as bar:
        for (c, _), item in zip(batches, loader):
            if batched:  # the worker read bytes: decode and crop on the device, as the loader does there
                data_bytes, indices = item
                item = view_crops(decode_jpegs(data_bytes, dev), indices, seed, views, resolution, True), indices
            (crops, boxes, flips, sizes), indices = item
            x = normalize_uint8(crops.to(dev), in_dtype, mean_std)
            with torch.inference_mode(), torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                logits = net(x).float()  # [b*K, C]
            w = confidence_weight(logits, entropy_temperature)
            _check_finite(logits, indices, plan)
            b = len(indices)
            writer.write(int(indices[0]), logits.view(b, views, -1), boxes, flips,
                         w.view(b, views).cpu().numpy(), sizes)
            bar.advance(b)
            if int(indices[-1]) + 1 == chunk_end[c]:
                writer.flush()  # the rows on disk before the marker that says so
                digests[c] = writer.chunk_digest(*chunk_range(c, chunk_size, n))
                mark = {"end": chunk_end[c], "sha256": digests[c]}
                atomic_write_bytes(marks / marker_name(c), json.dumps(mark).encode())
                if on_chunk is not None:
                    on_chunk(c)
    info = {k: v for k, v in plan.items() if k not in ("chunk_size", "storage")}
    info["created"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = writer.finish(info, chunk_size, [digests[c] for c in range(num_chunks(chunk_size, n))])
    shutil.rmtree(marks, ignore_errors=True)
    return manifest


def _kept_chunks(marks: Path, writer: CacheWriter, rows: int, n: int) -> dict[int, str]:
    """{chunk: digest} of the finished chunks an interrupted build may keep: those whose marker
    holds a checksum their rows on disk still match. Any other marker (damaged rows, a truncated
    array made anew, a marker without a checksum) is removed and its chunk made again."""
    kept, redo = {}, []
    for path in sorted(marks.glob(MARKER_GLOB)):
        c = marker_chunk(path.name)
        try:
            digest = json.loads(path.read_text())["sha256"]
        except (OSError, ValueError, TypeError, KeyError):
            digest = None
        if c < num_chunks(rows, n) and digest == writer.chunk_digest(*chunk_range(c, rows, n)):
            kept[c] = digest
        else:
            path.unlink()
            redo.append(c)
    if redo:
        say(f"fastkd teacher-cache: {len(redo)} finished chunk(s) no longer match their checksums "
            f"({redo[:8]}); making them again")
    return kept


def _check_finite(logits: torch.Tensor, indices, plan: dict) -> None:
    """Logits that fp16 cannot hold (non-finite, or beyond +-65504) are a broken teacher."""
    if not bool(torch.isfinite(logits).all()) or float(logits.abs().max()) > 65504:
        raise FastKDError(f"teacher {plan['teacher']['arch']} ({plan['teacher']['weights']}) gives non-finite or "
                          f"out-of-fp16-range logits on images {int(indices[0])}..{int(indices[-1])}: check the weights")


if __name__ == "__main__":  # python -m fastkd.cache_cmd ...
    parser = argparse.ArgumentParser(prog="fastkd teacher-cache", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        sys.exit(run(parser.parse_args()))
    except FastKDError as error:
        say(f"fastkd teacher-cache: error: {error}")
        sys.exit(2)
