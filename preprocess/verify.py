"""Re-hash a packed directory against its manifest; any difference is reported and fails.

    fastkd verify packed/in100                 # every file: size and full sha256
    fastkd verify packed/in100 --formats dali  # only the DALI shards and indexes

Exit status 0 when every file listed in OUT/manifest.json is present with its recorded size and
sha256; 1 with a table of the differences otherwise (a single flipped byte is caught).
"""

from __future__ import annotations

import argparse
import time

from fastkd.errors import FastKDError
from fastkd.packformat import FORMATS, check_outputs, load_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="a folder written by `fastkd pack`")
    parser.add_argument("--formats", default=None, help="limit to ffcv or dali (default: all packed formats)")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    formats = None
    if args.formats:
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise FastKDError(f"--formats {args.formats}: expected one or both of {','.join(FORMATS)}")
    manifest = load_manifest(args.out)
    t0 = time.perf_counter()
    problems = check_outputs(args.out, manifest, full_hash=True, formats=formats)
    checked = [e for e in manifest["files"] if formats is None or e["path"].split("/", 1)[0] in formats]
    seconds = time.perf_counter() - t0
    console = Console()
    nbytes = sum(e["size"] for e in checked)
    if not problems:
        console.print(f"OK: {len(checked)} files, {nbytes:,} bytes match {args.out}/manifest.json "
                      f"({seconds:.1f} s)")
        return 0
    table = Table(title=f"{len(problems)} of {len(checked)} files differ from {args.out}/manifest.json")
    table.add_column("file")
    table.add_column("difference")
    for message in problems:
        path, _, what = message.partition(": ")
        table.add_row(path, what)
    console.print(table)
    return 1
