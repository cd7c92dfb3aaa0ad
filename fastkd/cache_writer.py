"""The writing side of a teacher cache (format: fastkd/cacheformat.py), used by `fastkd teacher-cache`.

    writer = CacheWriter(OUT, n, views, num_classes, storage_for(C), resume=False)
    writer.write(start, logits, boxes, flips, w, sizes)    # rows start..start+b
    writer.flush(); digest = writer.chunk_digest(start, end)   # into the chunk's marker
    manifest = writer.finish(info, chunk_rows, digests)    # hashes, manifest.json last

A resumed build reopens the arrays in place; an array whose file is missing, unreadable or of
the wrong size (truncated by a crash or by hand) is made anew, zero-filled, and the build then
re-makes every chunk whose rows no longer match the digest in its marker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fastkd.atomic import atomic_write_bytes
from fastkd.cache_chunks import chunk_digest
from fastkd.packformat import sha256_file
from fastkd.cacheformat import FORMAT, MANIFEST, VERSION, array_file, array_specs, compress_logits, identity_of
from fastkd.notes import say


def _reopen(path: Path, shape: tuple, dtype: str) -> np.ndarray | None:
    """The array of an earlier run of the build, writable in place; None when it cannot be
    trusted as a whole (missing, unreadable, other shape or dtype, or a truncated file)."""
    try:  # the size first: numpy's r+ memmap silently zero-extends a short file
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            header = read(f)  # (shape, fortran_order, dtype)
            offset = f.tell()
        if (header[0], header[2]) != (shape, np.dtype(dtype)) or header[1]:
            return None
        if path.stat().st_size != offset + int(np.prod(shape)) * np.dtype(dtype).itemsize:
            return None
        return np.load(path, mmap_mode="r+")
    except (OSError, ValueError):
        return None


class CacheWriter:
    """The arrays of a cache being built, memory-mapped for writing (a resumed build reopens
    them in place), then `finish` hashes them and writes manifest.json. `note` hears of each
    array made anew on resume."""

    def __init__(self, root: str | Path, n: int, views: int, num_classes: int, storage: dict, resume: bool,
                 note: Callable[[str], None] = say):  # fmt: skip
        self.root, self.storage, self.num_classes = Path(root), storage, num_classes
        self.specs = array_specs(n, views, num_classes, storage)
        self.root.mkdir(parents=True, exist_ok=True)
        self.arrays = {}
        for name, (shape, dtype) in self.specs.items():
            path = self.root / array_file(name)
            arr = _reopen(path, shape, dtype) if resume and path.is_file() else None
            if arr is None:
                if resume:  # the chunk digests then send every chunk of it back to the teacher
                    note(f"{path}: missing or damaged (not {list(shape)} {dtype}); made anew")
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            self.arrays[name] = arr

    def write(self, start: int, logits: torch.Tensor, boxes, flips, w, sizes) -> None:
        """Rows start..start+b: logits fp32 [b,K,C], boxes [b,K,4], flips [b,K], w [b,K], sizes [b,2]."""
        end = start + logits.shape[0]
        rows = compress_logits(logits, self.storage)
        rows.update(boxes=np.asarray(boxes, np.int32), flips=np.asarray(flips, bool),
                    w=np.asarray(w, np.float32), sizes=np.asarray(sizes, np.int32))
        for name, value in rows.items():
            self.arrays[name][start:end] = value

    def flush(self) -> None:
        for arr in self.arrays.values():
            arr.flush()

    def chunk_digest(self, start: int, end: int) -> str:
        """fastkd.cache_chunks.chunk_digest of rows start..end as they are now."""
        return chunk_digest(self.arrays, start, end)

    def finish(self, info: dict, chunk_rows: int, digests: list[str]) -> dict:
        """Flush, hash, write manifest.json (atomically, last) with every chunk's digest; returns
        the manifest."""
        self.flush()
        arrays, total = {}, 0
        for name, (shape, dtype) in self.specs.items():
            path = self.root / array_file(name)
            size = path.stat().st_size
            total += int(np.prod(shape)) * np.dtype(dtype).itemsize
            arrays[name] = {"file": path.name, "shape": list(shape), "dtype": dtype, "size": size,
                            "sha256": sha256_file(path)}
        n = self.specs["sizes"][0][0]
        manifest = {"format": FORMAT, "version": VERSION, **info, "num_classes": self.num_classes,
                    "storage": self.storage, "arrays": arrays, "chunks": {"rows": int(chunk_rows), "sha256": digests},
                    "bytes_per_image": total / max(n, 1)}  # fmt: skip
        manifest["identity"] = identity_of(manifest)
        atomic_write_bytes(self.root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        return manifest
