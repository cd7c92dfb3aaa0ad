"""Tables and path lines printed the same way whatever the terminal's width.

    print_table(table)                 # a rich Table at its natural width, on stdout
    print_table(table, file=sys.stderr)

Rich fits a table to the console's width (80 columns without a terminal, or $COLUMNS) by
wrapping cells and cutting them with '…'. A cut number or path is lost, and what a test or a
log sees then depends on the machine. So a table is printed at the width its cells need;
a terminal narrower than that folds the lines itself, losing nothing. Long values (paths)
are kept out of cells and titles: they go whole on their own line, printed with plain print()
(which never wraps), above or below the table.
"""

from __future__ import annotations

import io
from typing import IO

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

_UNBOUNDED = 100_000  # columns available while measuring: nothing is squeezed


def natural_width(table: Table) -> int:
    """The columns the table takes when no cell is wrapped."""
    console = Console(width=_UNBOUNDED, file=io.StringIO())  # measures only, prints nothing
    return Measurement.get(console, console.options, table).maximum


def print_table(table: Table, file: IO[str] | None = None) -> None:
    """Print the table at its natural width to `file` (default: sys.stdout at the time of printing)."""
    Console(file=file, width=natural_width(table)).print(table)

