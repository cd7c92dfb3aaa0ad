"""Per-chunk checksums of a teacher cache: what lets a resumed build trust the rows it keeps and a
training run check a cache cheaply before it uses it.

    digest = chunk_digest(arrays, start, end)      # sha256 over rows start..end of every array
    bad = bad_chunks(arrays, rows, digests, which)  # indices of chunks whose rows changed

A chunk is rows [c * rows, min(n, (c + 1) * rows)) of every array of the cache (rows = the build's
--chunk-size). Its digest is the sha256 of those rows' bytes (C order), array by array in sorted
name order. The build writes it into the chunk's marker (.build/chunk-NNNNNN) once the rows are
flushed, and the manifest lists every chunk's digest under "chunks" (fastkd/teacher_cache.py).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fastkd.errors import FastKDError

SAMPLED = 4  # chunks a run checks before it trains (besides the first and the last)


def chunk_range(c: int, rows: int, n: int) -> tuple[int, int]:
    """Rows [start, end) of chunk c."""
    return c * rows, min(n, (c + 1) * rows)


def num_chunks(rows: int, n: int) -> int:
    return -(-n // rows)


def chunk_digest(arrays: Mapping[str, np.ndarray], start: int, end: int) -> str:
    """sha256 of rows start..end of every array (sorted by name), as stored."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name][start:end]).tobytes())
    return digest.hexdigest()


def sample(count: int, extra: int = SAMPLED) -> list[int]:
    """The chunks a cheap check hashes: the first, the last and `extra` others drawn at random
    (each run draws anew, so repeated runs cover more of a large cache); all when few."""
    if count <= extra + 2:
        return list(range(count))
    middle = random.SystemRandom().sample(range(1, count - 1), extra)
    return sorted({0, count - 1, *middle})


def bad_chunks(arrays: Mapping[str, np.ndarray], rows: int, digests: list[str], which: list[int]) -> list[int]:
    """Chunks of `which` whose rows no longer match `digests` (the manifest's "chunks.sha256")."""
    n = len(next(iter(arrays.values())))
    return [c for c in which if chunk_digest(arrays, *chunk_range(c, rows, n)) != digests[c]]


def check_chunks(root: Path, manifest: dict, every: bool) -> None:
    """The rows of sampled chunks (all when `every`) against the cache manifest's chunk digests:
    a cheap check that catches flipped or zeroed logits in a right-sized file before a run trains
    on them. A cache made before chunk digests has none to check."""
    chunks = manifest.get("chunks")
    if not chunks:
        return
    arrays = {n: np.load(Path(root) / e["file"], mmap_mode="r") for n, e in manifest["arrays"].items()}
    digests = chunks["sha256"]
    which = list(range(len(digests))) if every else sample(len(digests))
    bad = bad_chunks(arrays, int(chunks["rows"]), digests, which)
    if bad:
        raise FastKDError(f"teacher cache {root}: the rows of chunk(s) {bad[:8]} (of {len(digests)}, "
                          f"{chunks['rows']} images each) differ from the checksums in its manifest.json "
                          "(damaged or edited); rebuild it with `fastkd teacher-cache ... --overwrite`")
