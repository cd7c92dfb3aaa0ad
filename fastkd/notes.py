"""How a message reaches the user: every note and every line of a command's output in fastkd
goes through `say` or `show`, and nothing else in fastkd calls print() (tests/test_notes.py).

    say(f"fastkd: {name} is not installed: ...")           # a note: stderr, rank 0 only
    say(f"fastkd: loader backend auto -> {b}", once=True)  # ... and once per process
    say("[quickstart] reusing ...", err=False)             # a note that belongs on stdout
    show(f"OK: {n} files ...")                             # the command's output: stdout
    show(table)                                            # a rich Table at its natural width

  - `say` is for notes: status and warning lines, each worded whole by its caller, prefix
    included ("fastkd <command>: ..."). `show` is for what the command was run for: result
    tables, verify's report, a summary. Text goes out as is (no markup, never wrapped: a path
    stays whole), flushed line by line so notes and output keep their order in a log.
  - Rank 0 only: a process that is not rank 0 of a torch.distributed job (the group's rank once
    it is up, else RANK as torchrun sets it) says and shows nothing; say(rank=) overrides.
  - once=True: said the first time only in this process (once="key": the first message under
    that key). A rank other than 0 does not use up the key.
  - Streams: notes on stderr (err=False: stdout), output on stdout (err=True: stderr; file=).
  - Live displays: a rich Progress draws on `console(err)`, the shared Console of its stream (or
    one of its own) inside `with drawing(console):` (fastkd.live, pack, teacher-cache). Meanwhile
    a message for that console's file, or for a terminal while it draws on one, is printed
    through that console, above the bar, not into its redraws.
  - Light: stdlib at import, rich on first use, torch never (read from sys.modules if imported).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import IO, Any, Iterator

_said: set[str] = set()  # the once= keys said in this process
_drawing: list[Any] = []  # consoles a live display draws on now, innermost last
_consoles: dict[bool, Any] = {}  # err -> the shared Console of that stream


def current_rank() -> int:
    """This process's rank: torch.distributed's once its group is up, else $RANK, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    rank = os.environ.get("RANK", "").strip()
    return int(rank) if rank.isdigit() else 0


def console(err: bool = False):
    """The shared rich Console of stdout (err: stderr), as sys.stdout/stderr are at each print."""
    if err not in _consoles:
        from rich.console import Console

        _consoles[err] = Console(stderr=err)
    return _consoles[err]


@contextlib.contextmanager
def drawing(live_console) -> Iterator[Any]:
    """While a live display draws on `live_console`, say and show print above it."""
    _drawing.append(live_console)
    try:
        yield live_console
    finally:
        _drawing.remove(live_console)


def say(message: str, *, err: bool = True, once: bool | str = False, rank: int | None = None) -> bool:
    """A note for the user (see the module docstring); True where it was printed."""
    if (current_rank() if rank is None else rank) != 0:
        return False
    if once:
        key = message if once is True else once
        if key in _said:
            return False
        _said.add(key)
    _write(message, sys.stderr if err else sys.stdout)
    return True


def show(what: Any, *, err: bool = False, file: IO[str] | None = None) -> None:
    """The command's output: a line of text, or a rich renderable (a Table) at its natural width."""
    if current_rank() == 0:
        _write(what, file if file is not None else sys.stderr if err else sys.stdout)


def _write(what: Any, file: IO[str]) -> None:
    real = getattr(file, "rich_proxied_file", file)  # sys.stdout/err as a rich Live redirects them
    tty = getattr(real, "isatty", lambda: False)()
    live = next((c for c in reversed(_drawing) if c.file is real or (tty and c.is_terminal)), None)
    if isinstance(what, str) and live is None:
        return print(what, file=file, flush=True)
    if isinstance(what, str):
        return live.print(what, markup=False, highlight=False, emoji=False, soft_wrap=True)
    from rich.console import Console
    from rich.measure import Measurement

    probe = Console(width=100_000, file=io.StringIO())  # measures only: no cell squeezed or cut
    width = Measurement.get(probe, probe.options, what).maximum
    (live or Console(file=file, width=width)).print(what, width=width)
