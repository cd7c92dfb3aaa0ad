"""The on-disk format of a packed directory: what `fastkd pack` writes and every loader reads.

    manifest = load_manifest(OUT)                          # FastKDError if missing/invalid/edited
    problems = check_outputs(OUT, manifest, full_hash=True)   # [] when every file matches
    tars = split_files(OUT, manifest, "train", "dali")     # shard tars in order
    is_pack_folder(OUT)                                    # True: OUT holds a manifest of ours

The writer (fastkd.preprocess) and the readers (fastkd.data) both import this module, so neither
reaches into the other. The schema is in docs/CONTRACTS.md ("Packed directory").

Layout:
    OUT/manifest.json                       written last, atomically: its presence means complete
    OUT/ffcv/{train,val}.beton              FFCV file version 2, records below
    OUT/dali/{train,val}/shard-NNNNNN.tar   WebDataset tar shards (NNNNNNNN.jpg + NNNNNNNN.cls)
    OUT/dali/{train,val}/shard-NNNNNN.idx   DALI wds2idx index, format INDEX_VERSION

FFCV record types restate FFCV's own (`ffcv.types`, `RGBImageField.metadata_type`,
`IntField.metadata_type`; tests/test_pack.py asserts they are equal), so writing a `.beton`
needs neither FFCV nor its heavy import.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fastkd.atomic import atomic_write_bytes
from fastkd.errors import FastKDError

# ----------------------------------------------------------------------------- manifest

FORMAT = "fastkd-pack"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DIGEST_KEY = "digest"  # sha256 of the manifest without this key (manifest_digest)
FORMATS = ("ffcv", "dali")  # canonical order; also the top-level folder of each format's files
_HASH_CHUNK = 1 << 22

# ----------------------------------------------------------------------------- FFCV .beton records

PAGE_SIZE = 1 << 23  # 8 MiB, FFCV's DatasetWriter default; also the largest storable JPEG
FFCV_VERSION = 2  # ffcv.types.CURRENT_VERSION
FFCV_TYPE_INT, FFCV_TYPE_RGB_IMAGE = 1, 2  # ffcv.types.TYPE_ID_HANDLER keys
FFCV_JPG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES['jpg']
HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                           align=True)
RGB_IMAGE_METADATA = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
INT_METADATA = np.dtype("<i8")
# one row per sample: (image, label), laid out like ffcv.types.get_metadata_type
SAMPLE_METADATA = np.dtype([("", RGB_IMAGE_METADATA), ("", INT_METADATA)], align=True)
FIELDS = (("image", FFCV_TYPE_RGB_IMAGE), ("label", FFCV_TYPE_INT))

# ----------------------------------------------------------------------------- DALI shards

TAR_BLOCK = 512
INDEX_VERSION = "v1.2"  # DALI wds2idx index format: `ext offset size name` per member


# ----------------------------------------------------------------------------- functions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(root: Path, path: Path, size: int | None = None, sha256: str | None = None) -> dict:
    """Manifest row of one output file; size and hash are computed unless given."""
    return {"path": Path(path).relative_to(root).as_posix(),
            "size": path.stat().st_size if size is None else size,
            "sha256": sha256_file(path) if sha256 is None else sha256}


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without its own "digest" key (canonical JSON: sorted
    keys), so a hand edit of any value (a split's count, a file's size) is caught."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def digest_state(manifest: dict) -> str:
    """"ok" | "absent" (written before manifests carried a digest) | "mismatch" (edited since)."""
    if DIGEST_KEY not in manifest:
        return "absent"
    return "ok" if manifest[DIGEST_KEY] == manifest_digest(manifest) else "mismatch"


def write_manifest(root: Path, manifest: dict) -> Path:
    """Write atomically (temporary name, fsync, rename): its presence means a complete pack. The
    written manifest carries its own digest (`manifest_digest`)."""
    manifest = {**manifest, DIGEST_KEY: manifest_digest(manifest)}
    text = json.dumps(manifest, indent=1) + "\n"
    return atomic_write_bytes(Path(root) / MANIFEST_NAME, text.encode("utf-8"))


def is_pack_folder(root) -> bool:
    """True when `root/manifest.json` is a readable JSON object with our `format` (any version)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def load_manifest(root) -> dict:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FastKDError(f"{path}: no manifest (not a packed directory, or the pack did not finish); "
                          "run `fastkd pack SRC OUT` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FastKDError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FastKDError(f"{path}: not a fastkd pack manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FastKDError(f"{path}: format version {manifest.get('format_version')!r}, this fastkd reads "
                          f"version {FORMAT_VERSION}; re-pack with this version")
    for key in ("params", "classes", "splits", "files"):
        if key not in manifest:
            raise FastKDError(f"{path}: manifest has no '{key}'")
    if digest_state(manifest) == "mismatch":
        raise FastKDError(f"{path}: its content does not match its digest (edited after packing?); restore "
                          "the manifest `fastkd pack` wrote, or re-pack")
    return manifest


def _format_of(rel_path: str) -> str:
    return rel_path.split("/", 1)[0]


def check_outputs(root, manifest: dict, full_hash: bool = False, formats=None) -> list[str]:
    """One message per listed file that is missing, has another size, or (full_hash) another sha256."""
    root = Path(root)
    wanted = set(formats) if formats else None
    problems = []
    for entry in manifest["files"]:
        rel = entry["path"]
        if wanted is not None and _format_of(rel) not in wanted:
            continue
        path = root / rel
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if size != entry["size"]:
            problems.append(f"{rel}: size {size} bytes, manifest says {entry['size']}")
        elif full_hash:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                problems.append(f"{rel}: sha256 {digest[:16]}..., manifest says {entry['sha256'][:16]}...")
    return problems


def split_files(root, manifest: dict, split: str, fmt: str) -> list[Path]:
    """The `.beton` (one) or the shard tars of a split, in order."""
    root = Path(root)
    if fmt not in FORMATS:
        raise FastKDError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if fmt not in manifest["params"].get("formats", FORMATS):
        raise FastKDError(f"{root}: packed without the {fmt} format (formats: "
                          f"{', '.join(manifest['params']['formats'])}); re-pack with --formats {fmt}")
    if split not in manifest["splits"]:
        raise FastKDError(f"{root}: no split {split!r} in the manifest")
    if fmt == "ffcv":
        prefix, suffix = f"ffcv/{split}.beton", ""
        paths = [e["path"] for e in manifest["files"] if e["path"] == prefix]
    else:
        prefix, suffix = f"dali/{split}/shard-", ".tar"
        paths = sorted(e["path"] for e in manifest["files"]
                       if e["path"].startswith(prefix) and e["path"].endswith(suffix))
    if not paths:
        raise FastKDError(f"{root / MANIFEST_NAME}: lists no {fmt} files for split {split!r}")
    return [root / p for p in paths]
