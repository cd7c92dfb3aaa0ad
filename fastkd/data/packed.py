"""Opening a packed directory for a loader: manifest, checks before any byte is decoded, shard index.

`open_packed` is the one gate every backend passes: it loads the manifest (format and version
checked by `fastkd.packformat.load_manifest`), compares its classes with what the run
expects, and checks the backend's files (size always, sha256 with verify=True), naming every file
that fails, so a truncated shard or .beton is a FastKDError before training, never a hang or a
segfault inside FFCV/DALI later.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastkd.errors import FastKDError
from fastkd.packformat import MANIFEST_NAME, check_outputs, load_manifest, split_files


def _class_ids(classes: Sequence) -> list[str]:
    """WNIDs from a manifest `classes` list (dicts) or a plain list of WNID strings."""
    return [c["wnid"] if isinstance(c, dict) else str(c) for c in classes]


def check_classes(manifest: dict, expected_classes: Sequence | int | None, where: str) -> None:
    """`expected_classes`: a class count, WNIDs in label order, or another manifest's `classes`."""
    if expected_classes is None:
        return
    have = _class_ids(manifest["classes"])
    if isinstance(expected_classes, int):
        if len(have) != expected_classes:
            raise FastKDError(f"{where}: manifest has {len(have)} classes, the run expects {expected_classes}")
        return
    want = _class_ids(expected_classes)
    if have == want:
        return
    if sorted(have) == sorted(want):
        raise FastKDError(f"{where}: same classes as the run expects but in another label order "
                          f"(first difference at label {next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)})")
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    raise FastKDError(f"{where}: classes differ from what the run expects ({len(have)} vs {len(want)}); "
                      f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                      f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")


def open_packed(data_dir: str | Path, split: str, fmt: str | None, verify: bool = False,
                expected_classes: Sequence | int | None = None) -> dict:
    """Load and check the manifest and the `fmt` files ("ffcv", "dali" or None for none)."""
    root = Path(data_dir)
    manifest = load_manifest(root)
    where = str(root / MANIFEST_NAME)
    check_classes(manifest, expected_classes, where)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise FastKDError(f"{where}: no split {split!r} (has {sorted(splits)})")
    if int(splits[split].get("count", 0)) <= 0:
        raise FastKDError(f"{where}: split {split!r} is empty")
    if fmt is not None:
        formats = manifest.get("params", {}).get("formats")
        if formats is not None and fmt not in formats:
            raise FastKDError(f"{where}: packed without the {fmt!r} format (has {formats}); "
                              f"re-run `fastkd pack` with it or use another backend")
        # only this split's files: the train loader does not hash the val shards and vice versa
        mine = [f for f in manifest.get("files", [])
                if f["path"].startswith((f"{fmt}/{split}.", f"{fmt}/{split}/"))]
        problems = check_outputs(root, {**manifest, "files": mine}, full_hash=verify, formats=[fmt])
        if problems:
            raise FastKDError(f"{root}: {len(problems)} packed file(s) fail the manifest check"
                              f"{' (sha256)' if verify else ' (size; verify=True also hashes)'}: "
                              + "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "")
                              + " -- re-run `fastkd pack`")
    return manifest


def shard_paths(data_dir: str | Path, manifest: dict, split: str) -> list[tuple[Path, Path]]:
    """(tar, idx) pairs of a split, in sample order."""
    tars = [Path(t) for t in split_files(Path(data_dir), manifest, split, "dali")]
    return [(t, t.with_suffix(".idx")) for t in tars]


def read_shard_index(idx_path: Path) -> np.ndarray:
    """DALI webdataset index -> int64 [n, 4]: jpg offset, jpg size, cls offset, cls size.

    Format (wds2idx v1.1 or v1.2): a header `v1.x N`, then one line per sample of
    `ext offset size[ name]` groups.
    """
    try:
        lines = Path(idx_path).read_text().split("\n")
        version, count = lines[0].split()
        group = 4 if version >= "v1.2" else 3
        rows = []
        for line in lines[1:1 + int(count)]:
            parts = line.split()
            comp = {parts[k]: (int(parts[k + 1]), int(parts[k + 2])) for k in range(0, len(parts), group)}
            rows.append((*comp["jpg"], *comp["cls"]))
        if len(rows) != int(count):
            raise ValueError(f"{len(rows)} of {count} lines")
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise FastKDError(f"{idx_path}: unreadable webdataset index ({error}); re-run `fastkd pack`") from None
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


class ShardStore:
    """Sample i of a split -> its JPEG bytes and label, via the shards' index files."""

    def __init__(self, shards: list, expected_count: int):
        self.tars = [str(t) for t, _ in shards]
        tables = [read_shard_index(i) for _, i in shards]
        self.shard = np.concatenate([np.full(len(t), k, np.int64) for k, t in enumerate(tables)])
        table = np.concatenate(tables) if tables else np.zeros((0, 4), np.int64)
        self.offset, self.size = table[:, 0], table[:, 1]
        if len(self.shard) != expected_count:
            raise FastKDError(f"{os.path.dirname(self.tars[0]) if self.tars else 'shards'}: index files list "
                              f"{len(self.shard)} samples, the manifest says {expected_count}; re-run `fastkd pack`")
        self._maps: list[mmap.mmap] | None = None
        self._pid = None
        self.labels = np.array([int(self._slice(k, o, s)) for k, o, s in
                                zip(self.shard, table[:, 2], table[:, 3])], dtype=np.int64)

    def _slice(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # (re)map after a fork: one set of maps per process
            self._maps = []
            for path in self.tars:
                with open(path, "rb") as f:
                    self._maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            self._pid = os.getpid()
        data = self._maps[shard][offset:offset + size]
        if len(data) != size:
            raise FastKDError(f"{self.tars[shard]}: sample at byte {offset} runs past the end of the file "
                              "(truncated shard); re-run `fastkd pack`")
        return data

    def jpeg_bytes(self, index: int) -> bytes:
        i = int(index)
        return self._slice(self.shard[i], self.offset[i], self.size[i])

    def jpeg(self, index: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.jpeg_bytes(index)), dtype=torch.uint8)

    def __getstate__(self):  # mmaps do not pickle; workers map the files themselves
        return {**self.__dict__, "_maps": None, "_pid": None}
