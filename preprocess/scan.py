"""Find the classes and image files of an ImageNet-style source folder.

    classes = select_classes(SRC, "imagenet100")          # list[ClassInfo], label order
    split = scan_split(SRC, "train", classes)            # ScannedSplit(items, ignored_folders, ...)
    split = scan_split(SRC, "val", classes, val_labels="LOC_val_solution.csv")   # flat ILSVRC val

Layout: SRC/{train,val}/<wnid>/*.JPEG. Labels are 0..K-1 in sorted-WNID order of the chosen
classes; within a class, files are sorted by name (the contract's pack order). Folders of classes
that were not chosen are ignored and counted; so are files whose extension is not an image's.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastkd.errors import FastKDError
from fastkd.resources import imagenet100_wnids, imagenet1k_synsets

SPLITS = ("train", "val")
# torchvision's IMG_EXTENSIONS, lower-case; matched case-insensitively
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ClassInfo:
    label: int
    wnid: str
    name: str
    imagenet_index: int | None  # row in an ImageNet-1k head; None for non-ImageNet classes

    def to_json(self) -> dict:
        return {"label": self.label, "wnid": self.wnid, "name": self.name,
                "imagenet_index": self.imagenet_index}


@dataclass(frozen=True)
class Item:
    path: Path  # absolute
    rel: str  # relative to SRC, posix, for messages and the manifest
    label: int


@dataclass
class ScannedSplit:
    name: str
    items: list[Item] = field(default_factory=list)
    ignored_folders: list[str] = field(default_factory=list)  # class folders not chosen
    ignored_files: int = 0  # non-image extensions, hidden files
    # flat val with --val-labels: images whose labelled class was not chosen, as manifest rows
    # {"split", "path", "wnid", "reason"}; they are not packed
    dropped: list[dict] = field(default_factory=list)
    # flat val with --val-labels --allow-missing-val: rows of chosen classes naming no file of val/
    missing_rows: int = 0


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _listdir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        raise FastKDError(f"{folder}: no such folder") from None
    except NotADirectoryError:
        raise FastKDError(f"{folder}: not a folder") from None
    except PermissionError:
        raise FastKDError(f"{folder}: cannot read folder (permission denied)") from None
    except OSError as error:
        raise FastKDError(f"{folder}: cannot read folder ({error.strerror or error})") from None


def check_source(src: Path, layout: bool = True) -> None:
    """SRC must be a readable folder holding train/ and val/ folders (only the folder with
    layout=False: `--labels` names the files)."""
    if not src.exists():
        raise FastKDError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise FastKDError(f"source {src} is not a folder")
    _listdir(src)
    if not layout:
        return
    missing = [s for s in SPLITS if not (src / s).is_dir()]
    if missing:
        raise FastKDError(f"source folder {src} has no {' or '.join(s + '/' for s in missing)} folder "
                          f"(expected {src}/train/<wnid>/*.JPEG and {src}/val/<wnid>/*.JPEG)")


def class_folders(split_dir: Path) -> list[str]:
    return [e.name for e in _listdir(split_dir) if e.is_dir() and not e.name.startswith(".")]


def read_class_file(path: Path, whole_line: bool = False) -> list[str]:
    """--classes FILE: one class per line, in file order; `#` starts a comment. A WNID file keeps
    each line's first word (inline comments allowed); with whole_line (class names of --labels,
    which may hold spaces) the whole stripped line is the name and only lines starting with `#`
    are comments."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise FastKDError(f"--classes {path}: cannot read ({why or error})") from None
    names = []
    for line in text.splitlines():
        line = line.strip() if whole_line else line.split("#", 1)[0].strip()
        if line and not line.startswith("#"):
            names.append(line if whole_line else line.split()[0])
    if not names:
        raise FastKDError(f"--classes {path}: no {'class names' if whole_line else 'WNIDs'} in file")
    return names


def class_infos(names: list[str]) -> list[ClassInfo]:
    """Classes in label order; ImageNet WNIDs get their synset name and head row, others none."""
    synsets = imagenet1k_synsets()
    classes = []
    for label, name in enumerate(names):
        synset = synsets.get(name)
        classes.append(ClassInfo(label, name, synset.name if synset else name,
                                 synset.imagenet_index if synset else None))
    return classes


def select_classes(src: Path, spec: str) -> list[ClassInfo]:
    """`imagenet100` | `all` | path to a file of WNIDs (one per line) -> classes in label order."""
    available = class_folders(src / "train")
    if spec == "all":
        wnids = available
        if not wnids:
            raise FastKDError(f"{src / 'train'}: no class folders")
    elif spec == "imagenet100":
        wnids = list(imagenet100_wnids())
    else:
        wnids = read_class_file(Path(spec))
    wnids = sorted(set(wnids))
    missing = [w for w in wnids if w not in set(available)]
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise FastKDError(f"--classes {spec}: {len(missing)} requested class(es) missing from "
                          f"{src / 'train'}: {shown}")
    return class_infos(wnids)


def _files_of(folder: Path, src: Path, label: int, split: ScannedSplit) -> list[Item]:
    items = []
    for entry in _listdir(folder):
        if entry.is_file() and _is_image_name(entry.name):
            path = Path(entry.path)
            items.append(Item(path.absolute(), path.relative_to(src).as_posix(), label))
        else:
            split.ignored_files += 1
    return items


def read_csv_rows(csv_path: Path, flag: str) -> tuple[list[tuple[int, list[str]]], str]:
    """A user's CSV -> ([(line number, cells)], sha256 of the file's bytes); blank lines are rows
    without cells. UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8"); anything else
    is a FastKDError naming `flag`, the file and the byte offset of the first bad byte."""
    try:
        data = Path(csv_path).read_bytes()
    except OSError as error:
        raise FastKDError(f"{flag} {csv_path}: cannot read ({error.strerror or error})") from None
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise FastKDError(f"{flag} {csv_path}: not UTF-8 text: byte 0x{data[offset]:02x} at byte offset "
                          f"{offset} (line {line}) is {error.reason}; save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, end = [], 0
    try:
        for row in reader:  # a quoted cell may span lines: a row starts after the previous one ends
            rows.append((end + 1, row))
            end = reader.line_num
    except csv.Error as error:
        raise FastKDError(f"{flag} {csv_path}: line {reader.line_num}: not valid CSV ({error})") from None
    return rows, hashlib.sha256(data).hexdigest()


def read_val_labels(csv_path: Path) -> dict[str, tuple[str, int]]:
    """Kaggle's LOC_val_solution.csv: `ImageId,PredictionString` where the string starts with
    the WNID ("n01751748 86 55 412 303 n01751748 ..."). UTF-8, with or without a byte-order mark.
    Returns ImageId -> (WNID, line number)."""
    rows, _ = read_csv_rows(csv_path, "--val-labels")
    if not rows or [c.strip() for c in rows[0][1][:2]] != ["ImageId", "PredictionString"]:
        raise FastKDError(f"--val-labels {csv_path}: expected a header 'ImageId,PredictionString' "
                          "(Kaggle's LOC_val_solution.csv)")
    labels = {}
    for n, row in rows[1:]:
        if not row:
            continue
        if len(row) < 2 or not row[1].split():
            raise FastKDError(f"--val-labels {csv_path}: line {n} has no WNID")
        labels[row[0].strip()] = (row[1].split()[0], n)
    return labels


def _missing_rows(labels: dict[str, tuple[str, int]], present: set[str], by_wnid: dict, val_labels: Path,
                  split_dir: Path, allow: bool) -> int:  # fmt: skip
    """Rows of chosen classes whose ImageId has no image in split_dir (rows of other classes may
    name absent files: a val/ holding only the chosen classes is fine). FastKDError with the
    count and the first few, as --labels does, unless `allow`; returns the count."""
    missing = sorted((line, image) for image, (wnid, line) in labels.items() if wnid in by_wnid and image not in present)
    if missing and not allow:
        shown = ", ".join(f"line {line}: {image}" for line, image in missing[:5])
        more = f", ... ({len(missing)} in all)" if len(missing) > 5 else ""
        chosen = sum(wnid in by_wnid for wnid, _ in labels.values())
        raise FastKDError(f"--val-labels {val_labels}: {len(missing)} of {chosen} row(s) of the chosen classes "
                          f"name no image in {split_dir}: {shown}{more}. Restore the files, or pass "
                          "--allow-missing-val to pack the images present (the count goes into the manifest)")
    return len(missing)


def scan_split(src: Path, name: str, classes: list[ClassInfo], val_labels: Path | None = None,
               allow_missing: bool = False) -> ScannedSplit:  # fmt: skip
    """The items of split `name`: class folders, or a flat val/ labelled by `val_labels`, whose
    rows of chosen classes must each name an image there (`allow_missing`: counted instead)."""
    split = ScannedSplit(name)
    split_dir = src / name
    by_wnid = {c.wnid: c for c in classes}
    if name == "val" and val_labels is not None:
        # flat ILSVRC-2012 val folder: val/ILSVRC2012_val_00000001.JPEG ...
        subfolders = class_folders(split_dir)
        if subfolders:
            raise FastKDError(f"--val-labels {val_labels}: {split_dir} is not flat: it has {len(subfolders)} "
                              f"subfolder(s) ({', '.join(subfolders[:3])}{', ...' if len(subfolders) > 3 else ''}); "
                              "--val-labels is for a flat ILSVRC-2012 val folder of images; for class "
                              "folders, leave --val-labels out")
        labels = read_val_labels(val_labels)
        per_class: dict[int, list[Item]] = {c.label: [] for c in classes}
        unlabelled, present = [], set()
        for entry in _listdir(split_dir):
            if not (entry.is_file() and _is_image_name(entry.name)):
                split.ignored_files += 1
                continue
            present.add(entry.name.rsplit(".", 1)[0])
            wnid, line = labels.get(entry.name.rsplit(".", 1)[0], (None, 0))
            path = Path(entry.path)
            rel = path.relative_to(src).as_posix()
            if wnid is None:
                unlabelled.append(entry.name)
            elif wnid in by_wnid:
                per_class[by_wnid[wnid].label].append(Item(path.absolute(), rel, by_wnid[wnid].label))
            else:
                split.dropped.append({"split": name, "path": rel, "wnid": wnid,
                                      "reason": f"class {wnid} ({Path(val_labels).name} line {line}) "
                                                "is not among the chosen classes"})
        if unlabelled:
            raise FastKDError(f"--val-labels {val_labels}: no label for {len(unlabelled)} file(s) of "
                              f"{split_dir}, e.g. {unlabelled[0]}")
        split.missing_rows = _missing_rows(labels, present, by_wnid, val_labels, split_dir, allow_missing)
        empty = [c.wnid for c in classes if not per_class[c.label]]
        if empty:
            raise FastKDError(f"{split_dir}: no images of class(es) {', '.join(empty[:20])} "
                              f"according to {val_labels}")
        split.items = [item for c in classes for item in per_class[c.label]]
        return split

    folders = class_folders(split_dir)
    if not folders and any(_is_image_name(e.name) for e in _listdir(split_dir)):
        raise FastKDError(f"{split_dir} holds images but no class folders: for the flat ILSVRC-2012 "
                          "val folder, pass --val-labels LOC_val_solution.csv")
    missing = [c.wnid for c in classes if c.wnid not in set(folders)]
    if missing:
        raise FastKDError(f"{split_dir}: {len(missing)} chosen class(es) have no folder: "
                          f"{', '.join(missing[:20])}")
    split.ignored_folders = [f for f in folders if f not in by_wnid]
    for c in classes:
        items = _files_of(split_dir / c.wnid, src, c.label, split)
        if not items:
            raise FastKDError(f"{split_dir / c.wnid}: empty class folder (no image files)")
        split.items.extend(items)
    return split
