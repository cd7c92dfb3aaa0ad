"""The package's own source files, and their syntax trees, for tests that read code rather than
run it."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the folders that install as the fastkd package: fastkd/, and preprocess/ and kernels/ beside it
# as fastkd.preprocess and fastkd.kernels (folder -> installed name)
SOURCE_FOLDERS = {"fastkd": "fastkd", "preprocess": "fastkd.preprocess", "kernels": "fastkd.kernels"}


def source_files() -> list[Path]:
    """Every Python file of the installed package, sorted."""
    return sorted(path for folder in SOURCE_FOLDERS for path in (REPO / folder).rglob("*.py"))


def parse_files(paths: list[Path]) -> dict[Path, ast.Module]:
    """path -> its syntax tree. Garbage collection is off while parsing: a finalizer raising
    inside ast.parse (numba's, of dispatchers that earlier tests left) makes CPython 3.11 fail
    the parse with "AST constructor recursion depth mismatch". One collection first, not one per
    file: in a worker that has run other tests a full collection costs ~0.2 s."""
    gc.collect()
    gc.disable()
    try:
        return {path: ast.parse(path.read_text(), filename=str(path)) for path in paths}
    finally:
        gc.enable()
