"""fastkd.gc_paused: source parsed while garbage with a raising finalizer is collected.

On CPython 3.11, a collection inside ast.parse whose finalizer raises, with a Python-level
sys.unraisablehook that formats the traceback (pytest installs one; 3.11's traceback module
parses the source line to draw its carets), fails the outer parse with "AST constructor
recursion depth mismatch". numba's dispatcher finalizer raises KeyError once FFCV's jitted
functions are collected, and that turned `fastkd train` red inside the suite. Each check runs in
a fresh interpreter: the garbage supply and the hook must not leak into pytest's process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# After every collection, new cyclic garbage whose finalizer raises, so that any collection,
# wherever it runs, calls a raising finalizer; a low threshold makes one run inside each parse.
GARBAGE_SUPPLY = """
import gc, sys, traceback, weakref

class Cycle:
    def __init__(self):
        self.me = self

def raising_finalizer(d):
    return d["missing"] + d["other"]  # KeyError, on a line with carets to draw

def refill(phase, info):
    if phase == "stop":
        for _ in range(5):
            weakref.finalize(Cycle(), raising_finalizer, {}).atexit = False

def supply_garbage():
    sys.unraisablehook = lambda u: traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)
    gc.callbacks.append(refill)
    gc.set_threshold(20)
    refill("stop", None)
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", GARBAGE_SUPPLY + code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="shown on CPython 3.11 (gh-106905)")
def test_a_collection_inside_a_parse_breaks_it_on_python_3_11():
    """The failure gc_paused exists for, shown without it: the check below can fail."""
    result = run_python("import ast, inspect\nsrc = inspect.getsource(ast)\nsupply_garbage()\nast.parse(src)\n")
    assert result.returncode == 1 and "AST constructor recursion depth mismatch" in result.stderr


def test_gc_paused_keeps_the_parse_whole_and_the_collector_as_it_was():
    result = run_python(
        "import ast, inspect\nfrom fastkd.gc_paused import gc_paused\nsrc = inspect.getsource(ast)\n"
        "supply_garbage()\n"
        "for _ in range(3):\n    with gc_paused():\n        ast.parse(src)\n"
        "assert gc.isenabled()\n"
        "gc.disable()\nwith gc_paused():\n    pass\nassert not gc.isenabled()  # off stays off\n"
        "print('parsed')\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "parsed"


def test_fastkd_train_parses_its_flags_while_finalizers_raise():
    """tyro reads the config's source for the help: `fastkd train` must not fail on it."""
    result = run_python(
        "from fastkd.config_cli import parse_train_argv  # torch's own import parses source too\n"
        "supply_garbage()\n"
        "print(parse_train_argv(['--lr', '0.1', '--run.live', 'false']).overrides)\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "{'optim.lr': 0.1, 'run.live': False}"
