"""The on-disk format of a teacher cache: what `fastkd teacher-cache` writes and training reads.

    specs = array_specs(n, views, num_classes, storage_for(C))   # name -> (shape, dtype)
    rows = compress_logits(logits, storage)                      # fp32 [..., C] -> stored arrays
    logits = expand_logits(values, index, rest, C)               # top-k storage -> [B, C]
    identity_of(manifest); array_file("boxes"); marker_name(c)

The writer (fastkd.cache_writer, driven by fastkd.cache_cmd) and the reader
(fastkd.teacher_cache) both import this module, so neither reaches into the other, as
fastkd.packformat sits between the pack writer and the loaders. What the views are and how
training uses them: fastkd/teacher_cache.py.

Layout of DIR (manifest.json is written last, atomically: its presence means complete; a build in
progress keeps its state in DIR/.build/: state.json, the build's settings, and one marker
chunk-NNNNNN per finished chunk holding its rows' digest, fastkd/cache_chunks.py):
    manifest.json   format, version, teacher (arch, weights, sha256), pack (dir, manifest sha256,
                    count), classes (WNIDs), views, seed, resolution, amp, entropy_temperature,
                    created, num_classes, storage, arrays (file, shape, dtype, size, sha256),
                    chunks (rows, sha256 of each chunk's rows), bytes_per_image, identity
    logits.npy      [N,K,C] fp16  every logit (C <= 1000, `full_max_classes`), or, for more
                    classes, [N,K,k] fp16 (the k largest) + topk_index.npy [N,K,k] int32 +
                    rest.npy [N,K] fp16: the logit every other class gets so that they share the
                    remaining probability 1 - sum(top-k softmax) equally. The rebuilt row's softmax
                    at T=1 is exact on the top k and uniform on the rest (at the KD temperature
                    the rest is an approximation).
    boxes.npy       [N,K,4] int32 (top, left, h, w) in the packed image's pixels
    flips.npy       [N,K]   bool  horizontal flip
    w.npy           [N,K]   fp32  teacher confidence weight (from the fp32 logits)
    sizes.npy       [N,2]   int32 (H, W) of each packed image
Every array is a plain .npy, memory-mapped read-only when opened.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from fastkd.errors import FastKDError
from fastkd.packformat import MANIFEST_NAME, sha256_file

FORMAT = "fastkd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
BUILD_DIR = ".build"  # state of a build in progress
BUILD_STATE = "state.json"  # in BUILD_DIR: the settings the build was started with
MARKER_GLOB = "chunk-*"  # in BUILD_DIR: one marker per finished chunk (marker_name)
FULL_MAX_CLASSES = 1000  # up to this many classes every logit is stored
TOPK = 100  # logits kept per view above that
IDENTITY_SKIP = ("identity", "created")  # what the identity hash leaves out
# every array a cache may hold (the top-k ones only above FULL_MAX_CLASSES): array_specs' names
LOGIT_ARRAYS = {"full": ("logits",), "topk": ("logits", "topk_index", "rest")}
VIEW_ARRAYS = ("boxes", "flips", "w", "sizes")
ARRAY_NAMES = (*LOGIT_ARRAYS["topk"], *VIEW_ARRAYS)


def array_file(name: str) -> str:
    """File name of array `name` in the cache folder."""
    return f"{name}.npy"


def marker_name(chunk: int) -> str:
    """File name (in BUILD_DIR) of the marker of a finished chunk; matches MARKER_GLOB."""
    return f"chunk-{chunk:06d}"


def marker_chunk(name: str) -> int:
    """Chunk number of a marker's file name (marker_name's inverse)."""
    return int(name.split("-")[1])


def storage_for(num_classes: int, full_max_classes: int = FULL_MAX_CLASSES, topk: int = TOPK) -> dict:
    """How logits are stored: every one, or the top k plus the rest's shared mass."""
    if num_classes <= full_max_classes:
        return {"kind": "full", "dtype": "float16"}
    return {"kind": "topk", "k": int(min(topk, num_classes - 1)), "dtype": "float16"}


def array_specs(n: int, views: int, num_classes: int, storage: dict) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, dtype) of every array of a cache."""
    if storage["kind"] == "full":
        specs = {"logits": ((n, views, num_classes), "float16")}
    else:
        k = storage["k"]
        specs = {"logits": ((n, views, k), "float16"), "topk_index": ((n, views, k), "int32"),
                 "rest": ((n, views), "float16")}
    specs.update(boxes=((n, views, 4), "int32"), flips=((n, views), "bool"), w=((n, views), "float32"),
                 sizes=((n, 2), "int32"))
    return specs


def compress_logits(logits: torch.Tensor, storage: dict) -> dict[str, np.ndarray]:
    """fp32 logits [..., C] -> the stored arrays of those rows (expand_logits' inverse)."""
    logits = logits.float()
    if storage["kind"] == "full":
        return {"logits": logits.half().cpu().numpy()}
    k, c = storage["k"], logits.shape[-1]
    values, index = logits.topk(k, dim=-1)
    lse = logits.logsumexp(dim=-1)
    top_mass = (values - lse.unsqueeze(-1)).exp().sum(-1)
    rest_mass = (1.0 - top_mass).clamp(min=1e-30)
    rest = lse + torch.log(rest_mass / (c - k))
    return {"logits": values.half().cpu().numpy(), "topk_index": index.int().cpu().numpy(),
            "rest": rest.half().cpu().numpy()}


def expand_logits(values: np.ndarray, index: np.ndarray, rest: np.ndarray, num_classes: int) -> torch.Tensor:
    """top-k storage -> fp16 logits [B, C]: the k stored values, `rest` everywhere else."""
    out = torch.from_numpy(np.asarray(rest, np.float16)).unsqueeze(1).repeat(1, num_classes)
    out.scatter_(1, torch.from_numpy(np.asarray(index, np.int64)), torch.from_numpy(np.asarray(values)))
    return out


def identity_of(manifest: dict) -> str:
    """Short hash of a manifest (content, not its timestamp): what a checkpoint records."""
    body = {k: v for k, v in manifest.items() if k not in IDENTITY_SKIP}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def pack_fingerprint(pack_dir: str | Path) -> str:
    """sha256 of a pack's manifest.json (it lists every packed file's sha256): what a cache was made from."""
    path = Path(pack_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FastKDError(f"{pack_dir}: no {MANIFEST_NAME}; not a packed directory (fastkd pack)")
    return sha256_file(path)
