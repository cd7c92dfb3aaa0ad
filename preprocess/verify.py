"""Re-hash a packed directory against its manifest; any difference is reported and fails.

    fastkd verify packed/in100                 # every file: size and full sha256
    fastkd verify packed/in100 --formats dali  # only the DALI shards and indexes

Exit status 0 when every file listed in OUT/manifest.json is present with its recorded size and
sha256; 1 with a line per difference otherwise (a single flipped byte is caught). The
manifest's own digest is checked first (an edited manifest: exit 2); a manifest without one
(older fastkd) is said so and its files are still checked. A teacher cache folder (`fastkd
teacher-cache`) is verified too: every array's size and sha256 against its manifest.
"""

from __future__ import annotations

import argparse
import time

from fastkd.errors import FastKDError
from fastkd.notes import say, show
from fastkd.teacher_cache import TeacherCache, is_teacher_cache
from fastkd.packformat import FORMATS, check_outputs, digest_state, load_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="a folder written by `fastkd pack` or `fastkd teacher-cache`")
    parser.add_argument("--formats", default=None, help="limit to ffcv or dali (default: all packed formats)")


def run(args) -> int:
    formats = None
    if args.formats:
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise FastKDError(f"--formats {args.formats}: expected one or both of {','.join(FORMATS)}")
    if is_teacher_cache(args.out):
        return _verify_cache(args.out)
    manifest = load_manifest(args.out)  # refuses a manifest whose digest does not match
    if digest_state(manifest) == "absent":
        say(f"note: {args.out}/manifest.json has no digest (written by an older fastkd): its own content "
            "cannot be checked, only the files it lists", err=False)
    t0 = time.perf_counter()
    problems = check_outputs(args.out, manifest, full_hash=True, formats=formats)
    checked = [e for e in manifest["files"] if formats is None or e["path"].split("/", 1)[0] in formats]
    seconds = time.perf_counter() - t0
    return print_outcome(args.out, problems, checked, seconds)


def print_outcome(out, problems: list[str], checked: list[dict], seconds: float) -> int:
    """OK with the counts (exit status 0), or one line per file that differs (1), on stdout
    (fastkd.notes.show: the command's output). Plain lines, not a table: a path stays whole on
    its line whatever the terminal's width."""
    if not problems:
        nbytes = sum(e["size"] for e in checked)
        show(f"OK: {len(checked)} files, {nbytes:,} bytes match {out}/manifest.json ({seconds:.1f} s)")
        return 0
    show(f"{len(problems)} of {len(checked)} files differ from {out}/manifest.json:")
    for message in problems:  # "<file in the pack>: <difference>"
        show(f"  {message}")
    return 1


def _verify_cache(root: str) -> int:
    """A teacher cache: its manifest's identity, every array's size, shape and sha256, and every
    chunk's rows against their checksums (TeacherCache.open with verify=True)."""
    t0 = time.perf_counter()
    try:
        cache = TeacherCache.open(root, verify=True)
    except FastKDError as error:
        show(f"FAILED: {error}")
        return 1
    arrays = cache.manifest["arrays"].values()
    chunks = len((cache.manifest.get("chunks") or {}).get("sha256", []))
    how = f"{chunks} chunk checksums" if chunks else "no chunk checksums (a cache made by an older fastkd)"
    show(f"OK: teacher cache {root}: {len(arrays)} arrays, {sum(e['size'] for e in arrays):,} bytes and {how} "
         f"match its manifest.json ({time.perf_counter() - t0:.1f} s)")
    return 0
