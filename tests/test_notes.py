"""fastkd.notes: the one way a note or a command's output reaches the user (rank 0, once, its
stream, above a live display), and no other fastkd module printing on its own."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import types

import pytest
from rich.console import Console
from rich.table import Table

from fastkd import notes
from fastkd.live import LiveDisplay
from fastkd.notes import say, show
from source_walk import REPO, parse_files, source_files



@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(notes, "_said", set())


def bare_prints(tree: ast.Module) -> list[int]:
    """Lines where the module calls print() or hands the builtin print on (note=print)."""
    return sorted({n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "print"})


def test_only_the_notes_module_prints():
    trees = parse_files(source_files())
    found = {path.relative_to(REPO).as_posix(): lines for path, tree in trees.items() if (lines := bare_prints(tree))}
    assert found.pop("fastkd/notes.py", None), "the notes module is where printing happens"
    assert not found, f"print outside fastkd/notes.py (file: lines): {found}"


def test_the_check_sees_a_print():
    assert bare_prints(ast.parse("def f(x):\n    g(x, note=print)\n    print(x)\n    obj.print(x)\n")) == [2, 3]


def test_streams(capsys):
    assert say("fastkd: a note")
    say("[quickstart] a note for stdout", err=False)
    show("OK: the output")
    show("output on stderr", err=True)
    buf = io.StringIO()
    show("into a file", file=buf)
    out, err = capsys.readouterr()
    assert out == "[quickstart] a note for stdout\nOK: the output\n"
    assert err == "fastkd: a note\noutput on stderr\n"
    assert buf.getvalue() == "into a file\n"


def test_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert notes.current_rank() == 1
    assert not say("fastkd: from rank 1")
    show("rank 1's output")
    assert capsys.readouterr() == ("", "")
    assert say("fastkd: the caller knows it is rank 0", rank=0)
    monkeypatch.setenv("RANK", "0")
    assert not say("fastkd: the caller knows it is rank 3", rank=3)
    assert say("fastkd: rank 0")
    assert capsys.readouterr().err == "fastkd: the caller knows it is rank 0\nfastkd: rank 0\n"


def test_rank_of_an_initialised_process_group(monkeypatch, capsys):
    """Where torch.distributed's group is up its rank counts, without notes importing torch."""
    group = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_rank=lambda: 2)
    monkeypatch.setitem(sys.modules, "torch.distributed", group)
    assert notes.current_rank() == 2 and not say("fastkd: rank 2")
    group.get_rank = lambda: 0
    assert say("fastkd: rank 0")
    assert capsys.readouterr().err == "fastkd: rank 0\n"


def test_once(capsys):
    assert say("fastkd: loader backend auto -> torch", once=True)
    assert not say("fastkd: loader backend auto -> torch", once=True)
    assert say("fastkd: loader backend auto -> torch")  # without once: every time
    assert not say("fastkd: rank 1 first", once="key", rank=1)  # not said: the key stays free
    assert say("fastkd: keyed", once="key") and not say("fastkd: keyed, other words", once="key")
    assert capsys.readouterr().err.splitlines() == ["fastkd: loader backend auto -> torch"] * 2 + ["fastkd: keyed"]


def test_text_goes_out_as_is_through_a_live_console(capsys):
    """While a display draws on a console, a message for its file goes through it: no markup,
    no emoji codes, no wrapping at its width. A message for another (non-terminal) file does not."""
    buf = io.StringIO()
    live = Console(file=buf, width=40)
    text = "fastkd: [bold]kept[/bold] :smile: " + "/a/very/long/path" * 6
    with notes.drawing(live):
        show(text, file=buf)
        say("fastkd: to stderr, not the display")
    assert notes._drawing == []
    assert buf.getvalue() == text + "\n"
    assert capsys.readouterr().err == "fastkd: to stderr, not the display\n"


def test_notes_go_above_the_live_bar(monkeypatch):
    """A note said during a training's rich bar comes out through the bar's console, whole."""
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)  # the bar and the note share the terminal
    console = Console(file=buf, force_terminal=True, width=60)
    path = "/runs/" + "x" * 80 + "/checkpoints/last.pt"
    with LiveDisplay(enabled=True, total_epochs=1, console=console) as live:
        live.start_epoch(0, 4)
        live.update(1, {"loss": 1.0}, images_per_s=10.0)
        say(f"fastkd train: interrupted at epoch 1 step 1: saved {path}")
    assert notes._drawing == []
    assert f"saved {path}" in buf.getvalue()


def test_a_table_at_its_natural_width(capsys):
    table = Table()
    for column in ("network", "top-1 %", "path"):
        table.add_column(column)
    table.add_row("resnet18", "71.23", "/" + "d" * 150 + "/best-resnet18.pt")
    show(table)
    out = capsys.readouterr().out
    assert "d" * 150 in out and "…" not in out


def test_importing_notes_loads_neither_torch_nor_rich():
    code = "import sys, fastkd.notes; print(sorted(m for m in ('torch', 'rich') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
