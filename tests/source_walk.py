"""The package's own source files, and their syntax trees, for tests that read code rather than
run it."""

from __future__ import annotations

import ast
from pathlib import Path

from fastkd.gc_paused import gc_paused

REPO = Path(__file__).resolve().parent.parent
# the folders that install as the fastkd package: fastkd/, and preprocess/ and kernels/ beside it
# as fastkd.preprocess and fastkd.kernels (folder -> installed name)
SOURCE_FOLDERS = {"fastkd": "fastkd", "preprocess": "fastkd.preprocess", "kernels": "fastkd.kernels"}


def source_files() -> list[Path]:
    """Every Python file of the installed package, sorted."""
    return sorted(path for folder in SOURCE_FOLDERS for path in (REPO / folder).rglob("*.py"))


def parse_files(paths: list[Path]) -> dict[Path, ast.Module]:
    """path -> its syntax tree, parsed with the collector paused (fastkd.gc_paused says why)."""
    with gc_paused():
        return {path: ast.parse(path.read_text(), filename=str(path)) for path in paths}
