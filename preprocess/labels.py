"""Labels from the user's CSV: `fastkd pack SRC OUT --labels FILE.csv`, for images in any layout.

    scan = scan_labels(SRC, "labels.csv", classes=None, val_fraction=0.1, seed=0)
    scan.classes                  # list[ClassInfo], label order
    scan.splits["train"].items    # list[Item] in pack order; also "val"
    scan.dropped, scan.sha256     # manifest rows of unchosen classes; the CSV's sha256

The rule (the same text is in `fastkd pack --help`):
- One image per row: `path,label[,split]`. A first row whose cells include `path` and `label`
  (any case) is a header: columns are then found by name (`split` optional, other columns
  ignored). Without a header the columns are path, label and optionally split, in that order.
  Cells are stripped of surrounding spaces; blank lines are skipped; UTF-8 with or without a
  byte-order mark.
- path: relative to SRC, `/`-separated. Absolute paths, paths that leave SRC (`..`), empty paths
  and two rows naming the same file are refused. Every packed row must name an existing file:
  missing files are always an error (the CSV says what to pack; there is no flag to skip them),
  reported once with the count and the first rows. Files that exist but do not decode are
  skipped and listed like any input (fatal with --strict); the extension does not matter.
- label: a class name, any non-empty text. One number spelled two ways (`1` and `01`) is
  refused, naming both (it would make two classes). Classes: every label of the CSV sorted by
  name, or numerically when every label is a whole number (so labels 0..K-1 keep their numbers)
  (`--classes all`, the default); or the names of `--classes FILE` (one per line), labelled in
  the file's order; rows of classes not in the file are dropped and listed in the manifest.
  `--classes imagenet100` takes the shipped WNID list. A class's manifest `wnid` is its name;
  `imagenet_index` is set only when the name is an ImageNet-1k WNID.
- split: `train`, `val` (any case) or empty. Rows without a split are train rows; with
  `--val-fraction F` a seeded (`--seed`) draw moves round(F x n) of each class's n such rows to
  val (at least 1, and at least 1 left in train, when n >= 2).
- Both splits need images, and every chosen class needs train images.
Pack order: classes in label order, the rows of a class sorted by path.
"""

from __future__ import annotations

import posixpath
import random
import re
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from fastkd.errors import FastKDError
from fastkd.preprocess.scan import SPLITS, ClassInfo, Item, ScannedSplit, class_infos, read_class_file, read_csv_rows
from fastkd.resources import imagenet100_wnids

FLAG = "--labels"
COLUMNS = ("path", "label", "split")
SHOWN = 5  # rows named in a message before "... (N in all)"


@dataclass(frozen=True)
class Row:
    line: int  # line of the CSV the row starts on (1-based)
    rel: str  # normalised, posix, relative to SRC
    label: str
    split: str | None  # "train" | "val" | None (not given)


@dataclass
class LabelScan:
    classes: list[ClassInfo]
    splits: dict[str, ScannedSplit]
    sha256: str
    rows: int  # data rows in the CSV
    dropped: list[dict] = field(default_factory=list)  # {"split", "path", "wnid", "reason"}
    notes: list[str] = field(default_factory=list)  # lines the user should see


def _listed(problems: list[str]) -> str:
    more = f"; ... ({len(problems)} in all)" if len(problems) > SHOWN else ""
    return "; ".join(problems[:SHOWN]) + more


def _relative(path: str) -> tuple[str | None, str | None]:
    """CSV path cell -> (normalised posix path relative to SRC, None) or (None, why refused)."""
    if not path:
        return None, "empty path"
    if path.startswith("/") or PureWindowsPath(path).drive:
        return None, f"absolute path {path!r} (paths are relative to SRC)"
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        return None, f"path {path!r} leaves SRC (..)"
    if norm == ".":
        return None, f"path {path!r} names SRC itself"
    return norm, None


def _columns(first: list[str]) -> dict[str, int] | None:
    """Column index by name when `first` is a header (it names path and label), else None."""
    names = [c.lower() for c in first]
    if "path" not in names or "label" not in names:
        return None
    repeated = sorted({n for n in names if n in COLUMNS and names.count(n) > 1})
    if repeated:
        raise FastKDError(f"{FLAG}: the header names column(s) {', '.join(repeated)} twice")
    return {n: names.index(n) for n in COLUMNS if n in names}


def read_label_rows(csv_path: Path) -> tuple[list[Row], str]:
    """The CSV's data rows, checked (see the module docstring), and the file's sha256. All bad
    rows are reported in one FastKDError, by line number."""
    raw, digest = read_csv_rows(csv_path, FLAG)
    raw = [(n, [c.strip() for c in cells]) for n, cells in raw if any(c.strip() for c in cells)]
    if not raw:
        raise FastKDError(f"{FLAG} {csv_path}: no rows (expected one `path,label[,split]` row per image)")
    try:
        columns = _columns(raw[0][1])
    except FastKDError as error:
        raise FastKDError(f"{FLAG} {csv_path}: line {raw[0][0]}: {str(error).removeprefix(FLAG + ': ')}") from None
    header = columns is not None
    if header:
        width, raw = len(raw[0][1]), raw[1:]
    else:
        columns, width = dict(zip(COLUMNS, range(3))), 3
    problems, rows, seen = [], [], {}
    for n, cells in raw:
        if len(cells) > width or (not header and len(cells) < 2):
            expected = f"the header has {width}" if header else "expected path,label[,split]"
            hint = " (a comma in a path? quote the cell)" if len(cells) > width else ""
            problems.append(f"line {n}: {len(cells)} cell(s), {expected}{hint}")
            continue
        cell = {name: cells[i] if i < len(cells) else "" for name, i in columns.items()}
        rel, why = _relative(cell["path"])
        split = cell.get("split", "").lower() or None
        reasons = [why] if why else []
        if rel in seen:
            reasons.append(f"{rel} is also on line {seen[rel]} (each file once)")
        if not cell["label"]:
            reasons.append("empty label")
        if split is not None and split not in SPLITS:
            reasons.append(f"split {cell['split']!r} (expected train, val or empty; a pack holds train and "
                           "val only)")
        if reasons:
            problems.append(f"line {n}: {', '.join(reasons)}")
            continue
        seen[rel] = n
        rows.append(Row(n, rel, cell["label"], split))
    if problems:
        raise FastKDError(f"{FLAG} {csv_path}: {len(problems)} bad row(s): {_listed(problems)}")
    if not rows:
        raise FastKDError(f"{FLAG} {csv_path}: a header but no rows (expected one `path,label[,split]` "
                          "row per image)")
    return rows, digest


def _sorted_names(labels: set[str]) -> list[str]:
    """By name; numerically when every label is a whole number (labels 0..K-1 keep their numbers)."""
    if all(re.fullmatch(r"[0-9]+", label) for label in labels):
        return sorted(labels, key=lambda s: (int(s), s))
    return sorted(labels)


def _check_spellings(rows: list[Row], csv_path: Path) -> None:
    """Refuse one number spelled two ways (`1` and `01`): each spelling would be its own class,
    and merging them silently would guess; the user says which one is meant."""
    first: dict[str, int] = {}  # spelling -> first line
    for r in rows:
        first.setdefault(r.label, r.line)
    by_number: dict[int, list[str]] = {}
    for label in first:
        if re.fullmatch(r"[0-9]+", label):
            by_number.setdefault(int(label), []).append(label)
    clashes = [sorted(names, key=first.get) for names in by_number.values() if len(names) > 1]
    if clashes:
        shown = [" and ".join(f"{n!r} (line {first[n]})" for n in names) for names in clashes]
        raise FastKDError(f"{FLAG} {csv_path}: {len(clashes)} number(s) spelled more than one way, which would "
                          f"make separate classes: {_listed(shown)}; write each class's label one way")


def choose_classes(rows: list[Row], spec: str | None, csv_path: Path) -> list[ClassInfo]:
    """`all`/None (every label) | `imagenet100` | a file of class names, in label order.
    FastKDError when a number is spelled two ways (`1`, `01`)."""
    _check_spellings(rows, csv_path)
    labels = {r.label for r in rows}
    if spec in (None, "all"):
        return class_infos(_sorted_names(labels))
    if spec == "imagenet100":
        names = sorted(imagenet100_wnids())
    else:
        names = read_class_file(Path(spec), whole_line=True)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise FastKDError(f"--classes {spec}: class(es) listed twice: {', '.join(repeated[:SHOWN])}")
    missing = [n for n in names if n not in labels]
    if missing:
        raise FastKDError(f"--classes {spec}: {len(missing)} class(es) have no row in {FLAG} {csv_path}: "
                          f"{_listed(missing)}")
    return class_infos(names)


def _check_files(src: Path, rows: list[Row], csv_path: Path) -> None:
    """Every row must name an existing regular file under SRC: one FastKDError for all that do not."""
    problems, bad = [], []
    for r in rows:
        path = src / r.rel
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else ("not a regular file" if path.exists()
                                                                 else "missing")
            problems.append(f"line {r.line}: {r.rel} ({what})")
            bad.append(r)
    if not problems:
        return
    hints = []
    if len(problems) == len(rows):
        hints.append(f"is {src} the folder the paths are relative to?")
    if bad[0].line == 1:
        hints.append("if line 1 is a header, it must name the columns path and label")
    if any("\\" in r.rel for r in bad):
        hints.append("paths must use / as the separator")
    raise FastKDError(f"{FLAG} {csv_path}: {len(problems)} of {len(rows)} row(s) name no file under {src}: "
                      f"{_listed(problems)}. Missing files are always an error (the CSV says what to pack): "
                      "fix the paths or remove the rows" + "".join(f"; {h}" for h in hints))


def _assign(rows: list[Row], classes: list[ClassInfo], val_fraction: float | None,
            seed: int) -> dict[str, list[Row]]:
    """Rows by split: given splits kept; the rest train, or per class a seeded val_fraction to val."""
    out: dict[str, list[Row]] = {s: [r for r in rows if r.split == s] for s in SPLITS}
    loose: dict[str, list[Row]] = {c.wnid: [] for c in classes}
    for r in sorted(rows, key=lambda r: r.rel):  # by path: the draw ignores the CSV's row order
        if r.split is None:
            loose[r.label].append(r)
    rng = random.Random(seed)
    for c in classes:  # label order, so the draw depends only on the CSV, the classes and the seed
        group = loose[c.wnid]
        n = len(group)
        k = 0 if not val_fraction or n < 2 else min(n - 1, max(1, int(val_fraction * n + 0.5)))
        chosen = set(rng.sample(range(n), k)) if k else set()
        for i, r in enumerate(group):
            out["val" if i in chosen else "train"].append(r)
    return out


def scan_labels(src: Path, csv_path: Path, classes: str | None = None, val_fraction: float | None = None,
                seed: int = 0) -> LabelScan:
    """SRC + the --labels CSV -> classes, items per split in pack order, dropped rows, notes."""
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise FastKDError(f"--val-fraction {val_fraction}: must be between 0 and 1 (e.g. 0.1)")
    rows, digest = read_label_rows(csv_path)
    chosen = choose_classes(rows, classes, csv_path)
    index = {c.wnid: c.label for c in chosen}
    kept = [r for r in rows if r.label in index]
    scan = LabelScan(chosen, {s: ScannedSplit(s) for s in SPLITS}, digest, len(rows))
    scan.dropped = [{"split": r.split, "path": r.rel, "wnid": r.label,
                     "reason": f"class {r.label} ({Path(csv_path).name} line {r.line}) is not among the "
                               "chosen classes"} for r in rows if r.label not in index]
    if scan.dropped:
        scan.notes.append(f"dropped {len(scan.dropped):,} of {len(rows):,} {FLAG} row(s) whose class is not "
                          f"among the chosen --classes (listed under 'dropped' in the manifest)")
    _check_files(src, kept, csv_path)
    if val_fraction and all(r.split is not None for r in kept):
        scan.notes.append(f"--val-fraction {val_fraction}: every row has a split; nothing drawn")
    by_split = _assign(kept, chosen, val_fraction, seed)
    for s in SPLITS:
        if not by_split[s]:
            how = ("give rows a third column split (train/val), or pass --val-fraction F" if s == "val"
                   else "rows without a split are train rows")
            raise FastKDError(f"{FLAG} {csv_path}: no {s} images among the {len(kept):,} packed row(s); {how}")
    present = {s: {r.label for r in by_split[s]} for s in SPLITS}
    no_train = [c.wnid for c in chosen if c.wnid not in present["train"]]
    if no_train:
        raise FastKDError(f"{FLAG} {csv_path}: {len(no_train)} class(es) have no train images: "
                          f"{_listed(no_train)}")
    no_val = [c.wnid for c in chosen if c.wnid not in present["val"]]
    if no_val:
        scan.notes.append(f"val: {len(no_val)} class(es) have no val images: {_listed(no_val)}")
    for s in SPLITS:
        ordered = sorted(by_split[s], key=lambda r: (index[r.label], r.rel))
        scan.splits[s].items = [Item(src / r.rel, r.rel, index[r.label]) for r in ordered]
    return scan
