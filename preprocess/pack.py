"""Pack an ImageNet-style folder into FFCV and DALI formats: the library behind `fastkd pack`.

    result = pack("imagenet/", "packed/", classes="imagenet100", max_side=400, quality=90)
    result = pack("photos/", "packed/", labels="labels.csv", val_fraction=0.1)   # any layout + CSV

With `labels`, SRC is any folder and the CSV names its images and their classes (`labels.py`
has the rule); otherwise SRC is the ImageNet layout (`scan.py`).

scan (classes, files in pack order) -> a process pool decodes/encodes each image once
(`encode.encode_file`) -> the main process writes the same JPEG bytes, in order, to the
`.beton` and to the tar shards (`writers`) -> hashes -> `manifest.json`, written last.

Safety (never lose a user's data):
- SRC and OUT must not overlap (same folder, or either inside the other, symlinks resolved).
- Everything is written into a hidden temporary folder next to OUT (same file system) and
  renamed into place at the end, so an interrupted pack (Ctrl-C, kill -9) never leaves a
  manifest at OUT. An existing OUT is replaced only with `overwrite=True`, only if it is empty
  or holds a fastkd pack (a manifest.json of ours and nothing but the pack's own files), and
  only once the new pack is complete.
- A full disk or quota (ENOSPC/EDQUOT) anywhere in the pack removes the temporary folder and
  raises one FastKDError with the space needed (estimated) and the space free.
- Pool workers die with the parent (PR_SET_PDEATHSIG) so a killed pack leaves no orphans; any
  later pack into the same parent folder removes temporary folders of dead packs.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import fastkd
from fastkd.errors import FastKDError
from fastkd.notes import say
from fastkd.packformat import FORMAT, FORMAT_VERSION, FORMATS, MANIFEST_NAME, PAGE_SIZE, file_entry, write_manifest
from fastkd.preprocess import encode as _encode
from fastkd.preprocess.safety import (TMP_MARK, check_no_overlap, check_replaceable, disk_full_message,
                                      is_disk_full, remove_stale_temporaries, tree_bytes, what_is_left)
from fastkd.preprocess.labels import scan_labels
from fastkd.preprocess.scan import SPLITS, ScannedSplit, check_source, scan_split, select_classes
from fastkd.preprocess.writers import BetonWriter, ShardWriter


class Progress:
    """Callbacks for a progress display; the default shows no bar. The pack's notes (stale
    folders removed, images dropped) go through fastkd.notes.say, above a bar where one is drawn."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


@dataclass
class SplitStats:
    count: int = 0
    skipped: int = 0
    jpeg_bytes: int = 0
    shards: int = 0
    ignored_folders: int = 0
    ignored_files: int = 0
    seconds: float = 0.0  # wall time from the split's first to its last result (decode pipelined)


@dataclass
class PackResult:
    out: Path
    manifest: dict
    seconds: float
    splits: dict[str, SplitStats] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(s.count for s in self.splits.values())


# ----------------------------------------------------------------------------- pool workers

_JOB: tuple[int, int] = (400, 90)  # (max_side, quality), set by _init_worker
_ABORT = None  # multiprocessing.Event from the parent (set: the pack failed), set by _init_worker


def _init_worker(max_side: int, quality: int, abort=None) -> None:
    global _JOB, _ABORT
    _JOB, _ABORT = (max_side, quality), abort
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:  # die with the parent, even on kill -9 (Linux)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _encode_job(path: str):
    """-> (jpeg, width, height) or the reason (str) the input was skipped."""
    if _ABORT is not None and _ABORT.is_set():  # the pack failed: queued jobs end at once
        return "pack stopped"
    try:
        e = _encode.encode_file(path, *_JOB)
    except _encode.BadImage as error:
        return str(error)
    except Exception as error:  # a decoder bug on odd data must not kill the pack: report it
        return f"cannot decode: {type(error).__name__}: {error}"
    return e.jpeg, e.width, e.height


# ----------------------------------------------------------------------------- helpers


def _check_params(max_side, quality, formats, workers, shard_size) -> None:
    if max_side < 0:
        raise FastKDError(f"--max-side {max_side}: must be >= 0 (0 keeps the original size)")
    if not 1 <= quality <= 100:
        raise FastKDError(f"--quality {quality}: must be in 1..100")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise FastKDError(f"--formats {','.join(formats)}: expected one or both of {','.join(FORMATS)}")
    if workers < 1:
        raise FastKDError(f"--workers {workers}: must be >= 1")
    if shard_size < 1:
        raise FastKDError(f"--shard-size {shard_size}: must be >= 1")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- pack


def stop_pool(pool, abort) -> None:
    """Stop a Pool whose results are no longer wanted (the pack failed or was interrupted).
    Never Pool.terminate(): a worker killed while it sends a result keeps the result queue's
    lock, and the pool's task thread then blocks on that lock forever (a hang seen in this
    project's suite, a pack stopped by a full disk while imap was still feeding). Instead
    `abort` makes every queued job return at once (`_encode_job`), so close + join end in
    about one job's time, with no worker killed."""
    abort.set()
    pool.close()
    pool.join()


def pack(
    src,
    out,
    *,
    classes: str | None = None,
    val_labels=None,
    allow_missing_val: bool = False,
    labels=None,
    val_fraction: float | None = None,
    seed: int = 0,
    max_side: int = 400,
    quality: int = 90,
    formats=FORMATS,
    workers: int | None = None,
    shard_size: int = 1000,
    strict: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PackResult:
    t0 = time.perf_counter()
    workers = default_workers() if workers is None else int(workers)
    _check_params(max_side, quality, tuple(formats), workers, shard_size)
    formats = tuple(f for f in FORMATS if f in formats)  # canonical order
    progress = progress or Progress()
    src, out = Path(src).absolute(), Path(out).absolute()
    val_labels = Path(val_labels).absolute() if val_labels else None
    labels = Path(labels).absolute() if labels else None
    if labels and val_labels:
        raise FastKDError(f"--val-labels {val_labels} is for the ImageNet layout's flat val/ folder; with "
                          f"--labels {labels}, mark val rows with a third column split=val, or pass --val-fraction")
    if allow_missing_val and not val_labels:
        raise FastKDError("--allow-missing-val is for --val-labels rows without an image; pass --val-labels CSV")
    if val_fraction is not None and not labels:
        raise FastKDError(f"--val-fraction {val_fraction} needs --labels (the ImageNet layout has its own val/)")

    check_source(src, layout=labels is None)
    check_no_overlap(src, out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FastKDError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)
    labels_sha256 = None
    if labels:
        classes = classes or "all"
        scan = scan_labels(src, labels, classes, val_fraction, seed)
        chosen, scanned, dropped, labels_sha256 = scan.classes, scan.splits, scan.dropped, scan.sha256
        for line in scan.notes:
            say(line)
    else:
        classes = classes or "imagenet100"
        chosen = select_classes(src, classes)
        scanned: dict[str, ScannedSplit] = {s: scan_split(src, s, chosen, val_labels, allow_missing_val)
                                            for s in SPLITS}  # fmt: skip
        if scanned["val"].missing_rows:
            say(f"val: {scanned['val'].missing_rows:,} --val-labels row(s) of the chosen classes name no "
                f"image in {src / 'val'} (--allow-missing-val; counted in {MANIFEST_NAME})")
        dropped = [row for s in SPLITS for row in scanned[s].dropped]
        for s in SPLITS:
            if scanned[s].dropped:
                say(f"{s}: dropped {len(scanned[s].dropped):,} of "
                    f"{len(scanned[s].dropped) + len(scanned[s].items):,} image(s) whose --val-labels "
                    f"class is not among the chosen classes (listed under 'dropped' in {MANIFEST_NAME})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(out.parent)
        if stale:
            say(f"removed {len(stale)} temporary folder(s) of earlier packs that did not finish "
                f"(process gone) in {out.parent}: {', '.join(p.name for p in stale[:3])}"
                f"{' ...' if len(stale) > 3 else ''}")
        tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as error:
        raise FastKDError(f"{out.parent}: cannot create the output ({error.strerror or error})") from None

    stats = {s: SplitStats(ignored_folders=len(scanned[s].ignored_folders),
                           ignored_files=scanned[s].ignored_files) for s in SPLITS}
    skipped: list[dict] = []
    betons: dict[str, BetonWriter] = {}
    shards: dict[str, ShardWriter] = {}
    pool = None
    jobs = [(s, item) for s in SPLITS for item in scanned[s].items]
    done = 0  # results consumed, for the disk-full estimate
    try:
        progress.start(len(jobs))
        # fork: workers start in milliseconds and inherit the encoder module; they use only PIL
        ctx = multiprocessing.get_context("fork")
        abort = ctx.Event()  # set by stop_pool: the workers skip what is still queued
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(max_side, quality, abort))
        results = pool.imap(_encode_job, [str(item.path) for _, item in jobs],
                            chunksize=max(1, min(32, len(jobs) // (workers * 8) or 1)))
        for s in SPLITS:
            if "ffcv" in formats:
                (tmp / "ffcv").mkdir(exist_ok=True)
                betons[s] = BetonWriter(tmp / "ffcv" / f"{s}.beton", capacity=len(scanned[s].items))
            if "dali" in formats:
                shards[s] = ShardWriter(tmp / "dali" / s, shard_size=shard_size)

        t_split = time.perf_counter()
        for n, ((s, item), result) in enumerate(zip(jobs, results)):
            if n and jobs[n - 1][0] != s:  # first result of the next split
                now = time.perf_counter()
                stats[jobs[n - 1][0]].seconds, t_split = now - t_split, now
            if isinstance(result, tuple) and "ffcv" in formats and len(result[0]) > PAGE_SIZE:
                result = f"encoded JPEG of {len(result[0])} bytes exceeds FFCV's page ({PAGE_SIZE} bytes); lower --max-side"
            if isinstance(result, str):
                if strict:
                    raise FastKDError(f"{item.path}: {result} (--strict: bad inputs are fatal)")
                skipped.append({"split": s, "path": item.rel, "reason": result})
                stats[s].skipped += 1
            else:
                jpeg, width, height = result
                if s in betons:
                    betons[s].add(jpeg, width, height, item.label)
                if s in shards:
                    shards[s].add(jpeg, item.label)
                stats[s].count += 1
                stats[s].jpeg_bytes += len(jpeg)
            done = n + 1
            progress.advance(1)
        if jobs:
            stats[jobs[-1][0]].seconds = time.perf_counter() - t_split
        pool.close()
        pool.join()
        pool = None

        for s in SPLITS:
            if stats[s].count == 0:
                where = f"--labels {labels}: split {s}" if labels else str(src / s)
                raise FastKDError(f"{where}: no readable images among {len(scanned[s].items)} file(s) "
                                  f"of the chosen classes (all skipped)")
        files = []
        for s in SPLITS:
            if s in betons:
                betons[s].close()
                files.append(file_entry(tmp, betons[s].path))
        for s in SPLITS:
            if s in shards:
                shards[s].close()
                stats[s].shards = shards[s].shards
                files += [file_entry(tmp, p, size, digest) for p, size, digest in shards[s].files]

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fastkd_version": fastkd.__version__,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": str(src),
            "params": {"max_side": max_side, "quality": quality, "classes": classes,
                       "formats": list(formats), "shard_size": shard_size,
                       "val_labels": str(val_labels) if val_labels else None,
                       # rows of chosen classes without an image, packed anyway (--allow-missing-val)
                       "val_labels_missing": scanned["val"].missing_rows if val_labels else None,
                       # the label source: the CSV (its sha256 pins the labels) or the folder layout
                       "layout": "labels" if labels else "imagenet",
                       "labels": str(labels) if labels else None, "labels_sha256": labels_sha256,
                       "val_fraction": val_fraction, "seed": seed if val_fraction else None},
            "classes": [c.to_json() for c in chosen],
            "splits": {s: {"count": stats[s].count, "skipped": stats[s].skipped, "shards": stats[s].shards}
                       for s in SPLITS},
            "files": files,
            "skipped": skipped,
            "dropped": dropped,
        }
        write_manifest(tmp, manifest)
        _move_into_place(tmp, out, overwrite)
    except BaseException as error:
        if pool is not None:
            stop_pool(pool, abort)
        for writer in [*betons.values(), *shards.values()]:
            writer.abort()  # never raises: a full disk fails the close too
        written = tree_bytes(tmp) if is_disk_full(error) else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(error):
            raise FastKDError(disk_full_message(error, out, written, done, [item.path for _, item in jobs],
                                                len(formats))) from None
        if isinstance(error, OSError):  # quota, permissions, I/O error: the user can fix these
            raise FastKDError(f"writing {tmp} (for {out}) failed: {error.strerror or error}; "
                              f"the partial pack was removed and {what_is_left(out)}") from error
        raise
    return PackResult(out, manifest, time.perf_counter() - t0, stats)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FastKDError(f"{out} appeared while packing; pass --overwrite to replace it")
        check_replaceable(out)  # it may have changed while we packed
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        tmp.rename(out)
