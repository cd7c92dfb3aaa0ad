"""Tables printed the same way whatever the terminal's width.

    print_table(table)                 # a rich Table at its natural width, on stdout
    print_table(table, file=sys.stderr)

Rich fits a table to the console's width (80 columns without a terminal, or $COLUMNS) by
wrapping cells and cutting them with '…'. A cut number or path is lost, and what a test or a
log sees then depends on the machine. So a table is printed at the width its cells need
(fastkd.notes.show measures it); a terminal narrower than that folds the lines itself, losing
nothing. Long values (paths) are kept out of cells and titles: they go whole on their own line,
as plain text through fastkd.notes.show (which never wraps), above or below the table.
"""

from __future__ import annotations

from typing import IO

from rich.table import Table

from fastkd.notes import show


def print_table(table: Table, file: IO[str] | None = None) -> None:
    """fastkd.notes.show(table): at its natural width, to `file` (default: sys.stdout at the time
    of printing), rank 0 only."""
    show(table, file=file)
