"""Shared pytest set-up: `gpu` tests are skipped where CUDA is absent (CI), never silently passed;
the longest files run first, so that `pytest -n 2 --dist loadfile` (scripts/test.sh) does not
end with one worker alone on the quickstart's five minutes."""

import pytest
import torch

LONGEST_FIRST = ("test_quickstart.py", "test_train_cli.py")  # then every other file with a `slow` test


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
