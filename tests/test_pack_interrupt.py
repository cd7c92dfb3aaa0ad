"""An interrupted `fastkd pack` (kill -9, Ctrl-C) leaves nothing at OUT that looks complete, and a
rerun succeeds. The pack runs as a real subprocess on a folder big enough to take a few seconds
with one worker (one 1200x900 JPEG copied many times: cheap to make, slow to re-encode)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastkd.packformat import check_outputs, load_manifest
from fastkd.preprocess.pack import pack
from fastkd.resources import imagenet100_wnids

WNIDS = list(imagenet100_wnids())[:2]
PER_CLASS = 150


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("big") / "src"
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((1200, 900), Image.BICUBIC), dtype=np.int16)
    photo = np.clip(smooth + rng.normal(0, 8, size=smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    for split, n in (("train", PER_CLASS), ("val", 2)):
        for wnid in WNIDS:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i:05d}.JPEG").write_bytes(data)
    return root


def start_pack(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fastkd.cli", "pack", str(src), str(out), "--classes", "all",
         "--workers", "1", "--quiet", "--shard-size", "50"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_progress(out: Path, proc: subprocess.Popen, timeout: float = 60.0) -> Path:
    """Return the temporary folder once the pack has written some shard bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        for tmp in out.parent.glob(f".{out.name}.packing-*"):
            shards = list(tmp.glob("dali/train/*.tar"))
            if shards and sum(s.stat().st_size for s in shards) > 100_000:
                return tmp
        time.sleep(0.05)
    raise AssertionError("pack made no progress")


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.parametrize("how", ["kill9", "ctrl_c"])
def test_interrupted_pack_leaves_no_manifest_and_rerun_succeeds(big_src, tmp_path, how):
    out = tmp_path / "out"
    proc = start_pack(big_src, out)
    tmp = wait_for_progress(out, proc)
    workers = children_of(proc.pid)
    if how == "kill9":
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    else:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert "interrupted" in proc.stderr.read().decode()
        assert not tmp.exists()  # cleaned up on Ctrl-C
    assert not out.exists() and not (out / "manifest.json").exists()
    assert not list(tmp_path.rglob("manifest.json"))
    # pool workers die with their parent (PR_SET_PDEATHSIG)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in _state(w)]

    result = pack(big_src, out, classes="all", workers=2, max_side=64, formats=("dali",))
    assert result.manifest["splits"]["train"]["count"] == 2 * PER_CLASS
    assert check_outputs(out, load_manifest(out), full_hash=True) == []
    assert not list(tmp_path.glob(".out.packing-*"))  # the stale temporary folder was removed


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
