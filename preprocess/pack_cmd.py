"""Pack an ImageNet-style folder, or any folder plus a labels CSV, into FFCV and DALI formats.

    fastkd pack ~/imagenet packed/in100                       # ImageNet-100, both formats
    fastkd pack ~/imagenet packed/in1k --classes all --workers 16
    fastkd pack ~/ILSVRC packed/in100 --val-labels LOC_val_solution.csv   # flat val folder
    fastkd pack demo/ packed/demo --classes all --max-side 64
    fastkd pack ~/photos packed/photos --labels labels.csv --val-fraction 0.1   # your own data

SRC holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (or a flat val/ folder labelled by Kaggle's
LOC_val_solution.csv), or, with --labels FILE.csv, images in any layout named by the CSV:
  - one row per image: path,label[,split]. A first row naming the columns path and label (any
    case) is a header and columns are found by name (split optional, others ignored); otherwise
    the columns are path,label[,split] in that order. UTF-8 (a byte-order mark is fine).
  - path: relative to SRC with / separators; absolute paths, paths leaving SRC (..), empty paths
    and a file named twice are errors. Every row must name an existing file: missing files are
    always an error (one message with the count and the first rows), never skipped.
  - label: a class name (any text). Classes are all labels sorted by name (numerically when all
    are whole numbers), or the names of --classes FILE (one per line) labelled in file order,
    rows of other classes dropped (listed in manifest.json). The manifest records the CSV's path
    and sha256; a class's wnid is its name (imagenet_index only for ImageNet WNIDs).
  - split: train, val or empty. Rows without a split are train rows; --val-fraction F moves a
    seeded (--seed), per-class fraction F of them to val. Both splits need images.

Each image is decoded once (by content; no EXIF rotation), converted to RGB, shrunk so its
longer side is at most --max-side, and encoded once as a baseline JPEG.
Output: OUT/ffcv/{train,val}.beton, OUT/dali/{train,val}/shard-NNNNNN.tar + .idx, and
OUT/manifest.json (written last: its presence means the pack is complete). Unreadable inputs
are skipped and listed (path + reason); --strict makes them fatal. SRC and OUT must not overlap;
--overwrite replaces only an empty folder or an earlier pack.
"""

from __future__ import annotations

import argparse
import contextlib

from fastkd.notes import console as shared_console
from fastkd.notes import drawing, show
from fastkd.packformat import FORMATS
from fastkd.preprocess.pack import Progress, default_workers, pack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="ImageNet-style folder with train/ and val/, or with "
                                                   "--labels the folder the CSV's paths are relative to")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--classes", default=None,
                        help="imagenet100 (CMC list, default) | all | a file of WNIDs, one per line; with "
                             "--labels: all (default) | a file of class names, labelled in file order")
    parser.add_argument("--val-labels", metavar="CSV", default=None,
                        help="Kaggle LOC_val_solution.csv, for a flat ILSVRC-2012 val/ folder")
    parser.add_argument("--allow-missing-val", action="store_true",
                        help="with --val-labels: pack though rows of the chosen classes name no image in "
                             "val/ (an error otherwise); their count goes into the manifest")
    parser.add_argument("--labels", metavar="CSV", default=None,
                        help="path,label[,split] rows naming SRC's images (see above)")
    parser.add_argument("--val-fraction", metavar="F", type=float, default=None,
                        help="with --labels: per class, move this fraction of the rows without a split to val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction draw (default 0)")
    parser.add_argument("--max-side", type=int, default=400,
                        help="shrink so the longer side is at most this many px; 0 keeps the size (default 400)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="ffcv,dali (default) | ffcv | dali")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"decode/encode processes (default: all cores, here {default_workers()})")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per DALI tar shard (default 1000)")
    parser.add_argument("--strict", action="store_true", help="any unreadable input is an error")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is an earlier pack or empty (once the new pack is done)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class RichProgress(Progress):
    def __init__(self, console, enabled: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RP, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.enabled = enabled
        self.bar = RP(TextColumn("packing"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                      TimeRemainingColumn(), console=console, transient=False, disable=not enabled)
        self.task = None
        self._drawing = contextlib.ExitStack()

    def start(self, total: int) -> None:
        self.bar.start()
        if self.enabled:  # the pack's notes (fastkd.notes.say) go above the bar, a path whole
            self._drawing.enter_context(drawing(self.bar.console))
        self.task = self.bar.add_task("pack", total=total, rate="- img/s")

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)
        task = self.bar.tasks[0]
        if task.completed % 16 == 0 or task.finished:
            speed = task.speed
            self.bar.update(self.task, rate=f"{speed:,.0f} img/s" if speed else "- img/s")

    def stop(self) -> None:
        if self.task is not None:
            self.bar.stop()
        self._drawing.close()


def _mib(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def summary(result) -> None:
    """Per split counts, sizes and times on stdout; OUT and the skipped inputs' paths go whole
    on their own lines (in a table cell or title, a narrow terminal would wrap or cut them)."""
    from rich.table import Table

    m = result.manifest
    show(f"fastkd pack -> {result.out}")
    table = Table()
    for header in ("split", "images", "skipped", "ignored folders", "JPEG bytes", "shards", "time", "images/s"):
        table.add_column(header, justify="left" if header == "split" else "right")
    for name, s in result.splits.items():
        rate = (s.count + s.skipped) / s.seconds if s.seconds > 0 else float("nan")
        table.add_row(name, f"{s.count:,}", f"{s.skipped:,}", f"{s.ignored_folders:,}", _mib(s.jpeg_bytes),
                      str(s.shards), f"{s.seconds:.1f} s", f"{rate:,.0f}")
    show(table)
    sizes = {f: sum(e["size"] for e in m["files"] if e["path"].startswith(f + "/")) for f in m["params"]["formats"]}
    show(f"{len(m['classes'])} classes, max side {m['params']['max_side']}, quality "
         f"{m['params']['quality']}; " + ", ".join(f"{f} {_mib(b)}" for f, b in sizes.items()))
    total = result.images + sum(s.skipped for s in result.splits.values())
    show(f"{total:,} inputs in {result.seconds:.1f} s end to end (scan, encode, write, hash): "
         f"{total / max(result.seconds, 1e-9):,.0f} images/s")
    if m["skipped"]:
        show(f"skipped inputs ({len(m['skipped'])}, also in manifest.json):")
        for row in m["skipped"][:50]:
            show(f"  {row['path']}: {row['reason']}")
        if len(m["skipped"]) > 50:
            show(f"  ... {len(m['skipped']) - 50} more in manifest.json")


def run(args) -> int:
    progress = RichProgress(shared_console(err=True), enabled=not args.quiet)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    try:
        result = pack(args.src, args.out, classes=args.classes, val_labels=args.val_labels,
                      allow_missing_val=args.allow_missing_val,
                      labels=args.labels, val_fraction=args.val_fraction, seed=args.seed,
                      max_side=args.max_side, quality=args.quality, formats=formats, workers=args.workers,
                      shard_size=args.shard_size, strict=args.strict, overwrite=args.overwrite,
                      progress=progress)
    finally:
        progress.stop()
    summary(result)
    return 0
