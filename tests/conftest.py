"""Shared pytest set-up: `gpu` tests are skipped where CUDA is absent (CI), never silently passed;
the longest files run first, so that `pytest -n 2 --dist loadfile` (scripts/test.sh) does not
end with one worker alone on the quickstart's five minutes."""

import os

import pytest
import torch

LONGEST_FIRST = ("test_quickstart.py", "test_train_cli.py")  # then every other file with a `slow` test


def cores_per_worker() -> int:
    """This process's share of the cores: all of them, or an equal part under pytest-xdist (two
    workers with two intra-op threads each on two cores spin-wait on each other: the quickstart
    test took three times as long)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))


def pytest_configure(config):
    """Under pytest-xdist: torch's threads, and those of the subprocesses tests start (through
    OMP_NUM_THREADS, unless a test sets its own), limited to this worker's share of the cores."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        share = cores_per_worker()
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


def pytest_collection_modifyitems(config, items):
    rank = {}
    for item in items:  # a file's rank: its place in LONGEST_FIRST, else 2 with a slow test, else 3
        name = item.path.name
        here = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else 2 if "slow" in item.keywords else 3
        rank[name] = min(rank.get(name, 3), here)
    items.sort(key=lambda item: rank[item.path.name])  # stable: each file keeps its own order
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
