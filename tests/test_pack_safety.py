"""fastkd pack never loses a user's data: SRC/OUT overlap, what --overwrite may delete, a full disk,
and temporary folders left by dead packs. Inputs are tiny generated folders; DALI format only."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastkd import cli
from fastkd.errors import FastKDError
from fastkd.packformat import load_manifest
from fastkd.preprocess import writers
from fastkd.preprocess.pack import pack
from fastkd.resources import imagenet100_wnids

WNIDS = list(imagenet100_wnids())[:2]


def make_src(root: Path, per_class: int = 3, side: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                noise = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)  # incompressible
                buf = io.BytesIO()
                Image.fromarray(noise).save(buf, format="JPEG", quality=95)
                (root / split / wnid / f"{i}.JPEG").write_bytes(buf.getvalue())
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- SRC / OUT overlap


def test_src_inside_out_refused_even_with_overwrite(tmp_path, capsys):
    parent = tmp_path / "parent"
    src = make_src(parent / "src")
    before = files_of(src)
    with pytest.raises(FastKDError, match=f"source {src} and output {parent} overlap: SRC is inside OUT"):
        pack(src, parent, classes="all", formats=("dali",), workers=1, overwrite=True)
    code = cli.main(["pack", str(src), str(parent), "--classes", "all", "--overwrite", "--quiet",
                     "--formats", "dali", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and str(src) in err and str(parent) in err
    assert files_of(src) == before  # the source is untouched


def test_overlap_through_symlinks_and_same_folder(tmp_path):
    src = make_src(tmp_path / "data" / "src")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "data")  # OUT is the source's parent, under another name
    with pytest.raises(FastKDError, match=r"SRC is inside OUT.*resolved"):
        pack(src, link, classes="all", formats=("dali",), workers=1, overwrite=True)
    with pytest.raises(FastKDError, match="are the same folder"):
        pack(src, link / "src", classes="all", formats=("dali",), workers=1, overwrite=True)
    with pytest.raises(FastKDError, match="OUT is inside SRC"):
        pack(src, src / "train" / "packed", classes="all", formats=("dali",), workers=1)
    assert (src / "train" / WNIDS[0] / "0.JPEG").is_file() and not (src / "train" / "packed").exists()


# ----------------------------------------------------------------------------- what --overwrite deletes


def test_overwrite_refuses_folders_that_are_not_a_pack(tmp_path):
    src = make_src(tmp_path / "src")
    photos = tmp_path / "photos"
    (photos / "2024").mkdir(parents=True)
    (photos / "2024" / "me.jpg").write_bytes(b"precious")
    (photos / "manifest.json").write_text('{"name": "someone else\'s manifest"}')
    with pytest.raises(FastKDError, match=f"{photos} is not a fastkd pack.*nothing was deleted"):
        pack(src, photos, classes="all", formats=("dali",), workers=1, overwrite=True)
    assert (photos / "2024" / "me.jpg").read_bytes() == b"precious"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(FastKDError, match=f"{a_file} exists and is not a folder"):
        pack(src, a_file, classes="all", formats=("dali",), workers=1, overwrite=True)
    assert a_file.read_text() == "mine"

    out = tmp_path / "out"
    pack(src, out, classes="all", formats=("dali",), workers=1)
    (out / "my_notes.md").write_text("results")  # the user's own file inside an earlier pack
    with pytest.raises(FastKDError, match=f"{out} holds a fastkd pack but also my_notes.md"):
        pack(src, out, classes="all", formats=("dali",), workers=1, overwrite=True)
    assert (out / "my_notes.md").read_text() == "results" and load_manifest(out)
    (out / "my_notes.md").unlink()
    pack(src, out, classes="all", formats=("dali",), workers=1, overwrite=True, max_side=32)
    assert load_manifest(out)["params"]["max_side"] == 32


# ----------------------------------------------------------------------------- disk full


class SmallDisk:
    """`open` for writers.py on a disk with `capacity` bytes: writes past it fail with ENOSPC,
    and so does close() of a file holding unwritten bytes, as buffered I/O on a full disk does."""

    def __init__(self, capacity: int, code: int = errno.ENOSPC):
        self.capacity, self.used, self.code = capacity, 0, code

    def __call__(self, path, mode="r", *args, **kwargs):
        disk, real = self, open(path, mode, *args, **kwargs)

        class File:
            name = real.name
            pending = False

            def write(self, data):
                if disk.used + len(data) > disk.capacity:
                    self.pending = True
                    raise OSError(disk.code, os.strerror(disk.code))
                disk.used += len(data)
                return real.write(data)

            def seek(self, *a):
                return real.seek(*a)

            def close(self):
                real.close()
                if self.pending:
                    raise OSError(disk.code, os.strerror(disk.code))

        return File()


@pytest.mark.parametrize("code", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)])
def test_disk_full_removes_partial_pack_and_says_how_much_space(tmp_path, monkeypatch, capsys, code):
    src = make_src(tmp_path / "src", per_class=8)
    out = tmp_path / "out"
    monkeypatch.setattr(writers, "open", SmallDisk(40_000, code), raising=False)
    with pytest.raises(FastKDError) as info:
        pack(src, out, classes="all", workers=1, shard_size=4)
    message = str(info.value)
    what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
    assert message.startswith(f"{what} while packing into {tmp_path}")
    assert "the pack needs about" in message and "written for" in message and "free there now" in message
    assert "\n" not in message
    assert not out.exists() and not list(tmp_path.glob(".out.packing-*"))  # temporary folder removed

    code_ = cli.main(["pack", str(src), str(out), "--classes", "all", "--quiet", "--workers", "1"])
    err = capsys.readouterr().err
    assert code_ == 2 and "Traceback" not in err and err.count("\n") == 1 and what in err
    assert not list(tmp_path.glob(".out.packing-*"))


def test_disk_full_before_any_image_estimates_from_source(tmp_path, monkeypatch):
    src = make_src(tmp_path / "src")
    monkeypatch.setattr(writers, "open", SmallDisk(0), raising=False)
    with pytest.raises(FastKDError, match=r"disk full.*needs about .*at most the source's .* x 2 format"):
        pack(src, tmp_path / "out", classes="all", workers=1)
    assert not list(tmp_path.glob(".out.packing-*"))


# ----------------------------------------------------------------------------- stale temporaries


def test_stale_temporaries_of_dead_packs_removed_live_ones_kept(tmp_path, capsys):
    src = make_src(tmp_path / "src")
    parent = tmp_path / "packs"
    dead = parent / f".other.packing-{dead_pid()}"  # another OUT's pack, killed with -9
    (dead / "dali" / "train").mkdir(parents=True)
    (dead / "dali" / "train" / "shard-000000.tar").write_bytes(b"\0" * 1024)
    live = parent / ".busy.packing-1"  # a running pack (PID 1 is always alive)
    (live / "dali").mkdir(parents=True)
    foreign = parent / f".mine.packing-{dead_pid()}"  # a dead PID, but not a pack's contents
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep")
    pack(src, parent / "out", classes="all", formats=("dali",), workers=1)
    assert not dead.exists() and live.is_dir() and (foreign / "thesis.tex").read_text() == "keep"
    lines = [line for line in capsys.readouterr().err.splitlines() if "temporary folder" in line]
    assert lines == [f"removed 1 temporary folder(s) of earlier packs that did not finish (process gone) "
                     f"in {parent}: {dead.name}"]


# ----------------------------------------------------------------------------- manifest digest, kept packs


def test_edited_manifest_is_caught_and_old_ones_are_read(tmp_path, capsys):
    import json

    out = tmp_path / "out"
    pack(make_src(tmp_path / "src"), out, classes="all", formats=("dali",), workers=1)
    assert cli.main(["verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["val"]["count"] += 1  # 6 -> 7: no file changed
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastKDError, match="does not match its digest"):
        load_manifest(out)  # every loader reads the manifest through it
    assert cli.main(["verify", str(out)]) == 2 and "digest" in capsys.readouterr().err
    del manifest["digest"]  # a manifest from before digests: read, and said so
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["verify", str(out)]) == 0 and "has no digest" in capsys.readouterr().out


def test_failed_overwrite_says_the_earlier_pack_is_kept(tmp_path, monkeypatch):
    src = make_src(tmp_path / "src", per_class=8)
    out = tmp_path / "out"
    pack(src, out, classes="all", workers=1, shard_size=4)
    before = files_of(out)
    monkeypatch.setattr(writers, "open", SmallDisk(40_000), raising=False)
    with pytest.raises(FastKDError, match=f"the earlier pack at {out} is kept as it was") as info:
        pack(src, out, classes="all", workers=1, shard_size=4, overwrite=True)
    assert "nothing was left" not in str(info.value)
    assert files_of(out) == before


def test_a_failed_pack_stops_its_workers_without_killing_them(monkeypatch):
    """stop_pool never kills a worker (a worker killed mid-send keeps the result queue's lock and
    hangs Pool.terminate): the queued jobs return at once, the workers exit on their own."""
    import multiprocessing
    import time as time_

    from fastkd.preprocess import pack as pack_module

    def slow(path, *job):  # each job takes 0.2 s: 60 queued jobs would take 12 s
        time_.sleep(0.2)
        raise pack_module._encode.BadImage("not an image")

    monkeypatch.setattr(pack_module._encode, "encode_file", slow)  # the forked workers inherit it
    ctx = multiprocessing.get_context("fork")
    abort = ctx.Event()
    pool = ctx.Pool(2, initializer=pack_module._init_worker, initargs=(64, 90, abort))
    workers = list(pool._pool)
    results = pool.imap(pack_module._encode_job, [f"img{i}.jpg" for i in range(60)], chunksize=1)
    assert next(results) == "not an image"
    t0 = time_.perf_counter()
    pack_module.stop_pool(pool, abort)
    assert time_.perf_counter() - t0 < 3  # about one job, not the 59 still queued
    assert [w.exitcode for w in workers] == [0, 0]  # exited, not killed
    assert "pack stopped" in list(results)  # the queued jobs were skipped
