"""A long $TMPDIR must not hang DataLoader workers (fastkd.short_tempdir).

multiprocessing's listener sockets live under $TMPDIR; once that path is too long for an
AF_UNIX socket, the workers' batches (tensors sent by file descriptor) are dropped and the main
process waits forever. Each check runs in a fresh interpreter, as the temp directory is chosen
once per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKERS = """
import fastkd  # noqa: F401  (the import gives multiprocessing a short temp dir)
import multiprocessing.util, torch
from torch.utils.data import DataLoader, TensorDataset
data = TensorDataset(torch.arange(64.0).view(16, 4), torch.arange(16))
# timeout: a dropped batch raises after 15 s here instead of hanging
seen = [int(y) for _, labels in DataLoader(data, batch_size=4, num_workers=2, timeout=15) for y in labels]
assert sorted(seen) == list(range(16)), seen
print(multiprocessing.util.get_temp_dir())
"""


def long_tmpdir(tmp_path: Path) -> Path:
    """A writable directory whose socket paths would not fit in sun_path (108 bytes)."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    return deep


def run(code: str, tmpdir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_loader_workers_finish_under_a_long_tmpdir(tmp_path):
    deep = long_tmpdir(tmp_path)
    done = run(WORKERS, deep)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AF_UNIX path too long" not in done.stderr
    used = done.stdout.strip().splitlines()[-1]
    assert len(os.fsencode(used)) + len("/listener-XXXXXXXX") < 108, used
    assert not os.path.exists(used), f"{used} left behind at exit"


def test_short_tmpdir_left_alone(tmp_path):
    short = tmp_path if len(str(tmp_path)) < 60 else Path("/tmp")
    code = ("import fastkd; from multiprocessing import process\n"
            "print(process.current_process()._config.get('tempdir'))")
    done = run(code, short)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "None"  # multiprocessing keeps choosing its own, under $TMPDIR
