"""The two on-disk formats, written sample by sample in pack order from the same JPEG bytes.

    beton = BetonWriter(OUT / "ffcv/train.beton", capacity=len(items))
    shards = ShardWriter(OUT / "dali/train", shard_size=1000)
    for jpeg, width, height, label in samples:          # pack order
        beton.add(jpeg, width, height, label)
        shards.add(jpeg, label)
    beton.close(); shards.close()

FFCV: the layout `DatasetWriter(path, {'image': RGBImageField(write_mode='jpg'), 'label':
IntField()})` produces (ffcv 1.0.2, file version 2): header, field descriptors (type ids of
RGBImageField and IntField, so FFCV's `Reader`/`Loader` map them back to those fields and their
decoders), one metadata row per sample (mode=jpg, width, height, data_ptr | label), the JPEG
bytes, and the allocation table. The record types (fastkd.packformat) restate FFCV's (`ffcv.types`,
`RGBImageField.metadata_type`, `IntField.metadata_type`); tests/test_pack.py asserts they are
equal, so a format change in FFCV fails the tests. Restating them keeps `fastkd pack` free of
FFCV's heavy import (torch, numba, OpenCV: 10+ s on a small machine) and usable without FFCV. FFCV's own writer only takes pixel
arrays and encodes them itself; writing the records ourselves is what lets the .beton hold the
exact bytes the shards hold, and lets one sequential pass feed both files. No sample's bytes
cross a page boundary (FFCV's process cache reads whole pages).

DALI: WebDataset tar shards (`NNNNNNNN.jpg` + `NNNNNNNN.cls`, key = sample index in the split,
`.cls` = ASCII decimal label) with the index file `fn.readers.webdataset(index_paths=...)`
reads (`wds2idx` format v1.2: one line per sample, `ext offset size name` per member). Tar
headers are deterministic (mtime 0, uid 0), so the same input gives the same bytes.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np

# the record layout lives with the rest of the format (fastkd.packformat)
from fastkd.packformat import (ALLOC_TABLE_TYPE, FFCV_JPG_MODE, FFCV_VERSION, FIELD_DESC_TYPE, FIELDS,
                               HEADER_TYPE, INDEX_VERSION, PAGE_SIZE, SAMPLE_METADATA, TAR_BLOCK)


class SampleTooLarge(Exception):
    """The encoded image does not fit in one FFCV page."""


class BetonWriter:
    def __init__(self, path: Path, capacity: int, page_size: int = PAGE_SIZE):
        self.path = Path(path)
        self.page_size = page_size
        self._header = np.zeros(1, dtype=HEADER_TYPE)
        self._header["version"] = FFCV_VERSION
        self._header["num_fields"] = len(FIELDS)
        self._header["page_size"] = page_size
        descriptors = np.zeros(len(FIELDS), dtype=FIELD_DESC_TYPE)  # arguments: all zero for both
        for i, (name, type_id) in enumerate(FIELDS):
            descriptors[i]["type_id"] = type_id
            descriptors[i]["name"][: len(name)] = np.frombuffer(name.encode("ascii"), dtype="<u1")
        self._descriptors = descriptors
        # metadata rows are reserved for every candidate sample; only `count` are valid at the end
        self.metadata = np.zeros(capacity, dtype=SAMPLE_METADATA)
        self._image_field, self._label_field = self.metadata.dtype.names
        self.metadata_start = HEADER_TYPE.itemsize + descriptors.nbytes
        self.count = 0
        self._allocations: list[tuple[int, int, int]] = []  # (sample_id, ptr, size)
        self._f = open(self.path, "wb")
        self._pos = self.metadata_start + self.metadata.nbytes
        self._f.seek(self._pos)

    def add(self, jpeg: bytes, width: int, height: int, label: int) -> None:
        size = len(jpeg)
        if size > self.page_size:
            raise SampleTooLarge(f"encoded JPEG of {size} bytes exceeds FFCV's {self.page_size}-byte page")
        page_end = (self._pos // self.page_size + 1) * self.page_size
        if self._pos + size > page_end:  # would straddle two pages: start on the next one
            self._f.seek(page_end)
            self._pos = page_end
        i = self.count
        image = self.metadata[self._image_field]  # views into the structured array
        image["mode"][i] = FFCV_JPG_MODE
        image["width"][i], image["height"][i] = width, height
        image["data_ptr"][i] = self._pos
        self.metadata[self._label_field][i] = label
        self._allocations.append((self.count, self._pos, size))
        self._f.write(jpeg)
        self._pos += size
        self.count += 1

    def close(self) -> None:
        alloc_table = np.array(self._allocations, dtype=ALLOC_TABLE_TYPE)
        self._header["num_samples"] = self.count
        self._header["alloc_table_ptr"] = self._pos
        self._f.seek(self._pos)
        self._f.write(alloc_table.tobytes())
        self._f.seek(0)
        self._f.write(self._header.tobytes())
        self._f.write(self._descriptors.tobytes())
        self._f.write(self.metadata.tobytes())
        self._f.close()

    def abort(self) -> None:
        """Close without finishing; never raises (a full disk fails the flush too: the caller
        deletes the file anyway and reports the first error)."""
        try:
            self._f.close()
        except OSError:
            pass


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


class ShardWriter:
    """Consecutive samples into `shard-%06d.tar` files of `shard_size` samples, each with a DALI index."""

    def __init__(self, folder: Path, shard_size: int = 1000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.count = 0
        self.files: list[tuple[Path, int, str]] = []  # (path, size, sha256) of closed tars and indexes
        self._f = None
        self._hash = None
        self._pos = 0
        self._index: list[str] = []
        self._shard = -1

    @property
    def shards(self) -> int:
        return self._shard + 1

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._hash.update(data)
        self._pos += len(data)

    def _member(self, name: str, data: bytes) -> tuple[int, int]:
        self._write(_tar_header(name, len(data)))
        offset = self._pos
        self._write(data)
        pad = -len(data) % TAR_BLOCK
        if pad:
            self._write(b"\0" * pad)
        return offset, len(data)

    def _open_next(self) -> None:
        self._shard += 1
        self._f = open(self.folder / f"shard-{self._shard:06d}.tar", "wb")
        self._hash = hashlib.sha256()
        self._pos = 0
        self._index = []

    def _close_current(self) -> None:
        if self._f is None:
            return
        self._write(b"\0" * (2 * TAR_BLOCK))  # end-of-archive marker
        tar_path = Path(self._f.name)
        self._f.close()
        self.files.append((tar_path, self._pos, self._hash.hexdigest()))
        index = f"{INDEX_VERSION} {len(self._index)}\n" + "".join(line + "\n" for line in self._index)
        index_bytes = index.encode("ascii")
        index_path = tar_path.with_suffix(".idx")
        index_path.write_bytes(index_bytes)
        self.files.append((index_path, len(index_bytes), hashlib.sha256(index_bytes).hexdigest()))
        self._f = None

    def add(self, jpeg: bytes, label: int) -> None:
        if self.count % self.shard_size == 0:
            self._close_current()
            self._open_next()
        key = f"{self.count:08d}"
        members = []
        for ext, data in (("jpg", jpeg), ("cls", str(int(label)).encode("ascii"))):
            offset, size = self._member(f"{key}.{ext}", data)
            members.append(f"{ext} {offset} {size} {key}.{ext}")
        self._index.append(" ".join(members))
        self.count += 1

    def close(self) -> None:
        self._close_current()

    def abort(self) -> None:
        """Close without finishing; never raises (see BetonWriter.abort)."""
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
