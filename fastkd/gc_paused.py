"""Parse Python source without the garbage collector running inside the parser.

Why: on CPython 3.11, a collection that runs inside `ast.parse` (the parse allocates enough to
start one) can call a finalizer that raises. When a Python-level sys.unraisablehook formats that
error's traceback (pytest's hook does; 3.11's traceback module parses the source line to draw
its carets), the nested parse upsets the outer one's depth count and the outer parse fails with
"SystemError: AST constructor recursion depth mismatch" (CPython gh-106905; seen on 3.11.7).
numba's dispatcher finalizer raises KeyError when FFCV's jitted pipeline functions are
collected, so once an FFCV loader has lived in the process, a parse can fail at random. fastkd
parses source in one place: tyro reads the config dataclasses' field comments for `fastkd
train`'s flags and help (inspect.getsource -> ast.parse). The tests that read the package's own
code parse source too.

    with gc_paused():
        tree = ast.parse(text)
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """No automatic collection inside the block; the collector is left as it was found after it
    (off stays off). Objects freed by their reference count still go at once."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
