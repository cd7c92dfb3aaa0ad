"""What `fastkd pack` checks so that it never deletes or fills up anything it should not.

    check_no_overlap(SRC, OUT)           # FastKDError: same folder, or either inside the other
    check_replaceable(OUT)               # FastKDError unless OUT is empty or a pack of ours only
    removed = remove_stale_temporaries(OUT.parent)   # `.NAME.packing-PID` of dead PIDs
    if is_disk_full(error): raise FastKDError(disk_full_message(...))

A pack writes into OUT.parent/.{OUT.name}.packing-{pid} (TMP_MARK) and renames it to OUT at the end.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from fastkd.errors import FastKDError
from fastkd.packformat import FORMATS, MANIFEST_NAME, is_pack_folder

TMP_MARK = ".packing-"  # hidden temporary folder: OUT.parent/.{OUT.name}.packing-{pid}
# what a pack folder (OUT or a temporary folder) may hold: anything else is not ours to delete
PACK_ENTRIES = frozenset({MANIFEST_NAME, *FORMATS})
DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def own_entry(name: str) -> bool:
    """An entry a pack folder may hold: the formats' folders, the manifest, its atomic temporary."""
    return name in PACK_ENTRIES or (name.startswith(f".{MANIFEST_NAME}.") and name.endswith(".tmp"))


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Remove `.NAME.packing-PID` folders in `parent` whose process is gone (kill -9, power loss),
    whatever NAME. Folders of live PIDs, links, and folders holding anything a pack does not
    write are left alone. Returns the folders removed."""
    removed = []
    for candidate in sorted(Path(parent).glob(f".*{TMP_MARK}*")):
        pid = candidate.name.rsplit(TMP_MARK, 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if candidate.is_symlink() or not candidate.is_dir():
            continue
        try:
            with os.scandir(candidate) as entries:
                if not all(own_entry(e.name) for e in entries):
                    continue
        except OSError:
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def check_no_overlap(src: Path, out: Path) -> None:
    """SRC and OUT must be disjoint trees (symlinks resolved): a pack writes, and --overwrite
    deletes, all of OUT."""
    src_real, out_real = Path(src).resolve(), Path(out).resolve()
    if src_real == out_real:
        how = "are the same folder"
    elif src_real in out_real.parents:
        how = "overlap: OUT is inside SRC"
    elif out_real in src_real.parents:
        how = "overlap: SRC is inside OUT (--overwrite would delete the source)"
    else:
        return
    shown = "" if (src_real, out_real) == (Path(src), Path(out)) else f" (resolved: {src_real} and {out_real})"
    raise FastKDError(f"source {src} and output {out} {how}{shown}; choose an OUT outside the source folder")


def check_replaceable(out: Path) -> None:
    """--overwrite deletes OUT only if it is empty, or a fastkd pack (a manifest.json of ours) that
    holds nothing but the pack's own files. FastKDError naming OUT otherwise; nothing is deleted."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        return  # a dangling link: replacing it removes only the link
    if not out.is_dir():
        raise FastKDError(f"{out} exists and is not a folder; --overwrite replaces only a folder written by "
                          "`fastkd pack` (or an empty one): nothing was deleted; remove it yourself or "
                          "choose another OUT")
    try:
        with os.scandir(out) as entries:
            names = sorted(e.name for e in entries)
    except OSError as error:
        raise FastKDError(f"{out}: cannot read the folder to replace ({error.strerror or error})") from None
    if not names:
        return
    if not is_pack_folder(out):
        raise FastKDError(f"{out} is not a fastkd pack (no {MANIFEST_NAME} of ours) and is not empty; "
                          "--overwrite replaces only a folder written by `fastkd pack`: nothing was deleted; "
                          "remove it yourself or choose another OUT")
    foreign = [n for n in names if not own_entry(n)]
    if foreign:
        raise FastKDError(f"{out} holds a fastkd pack but also {', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}, which `fastkd pack` did not write and "
                          "--overwrite would delete: nothing was deleted; move them out or choose another OUT")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


def tree_bytes(folder: Path) -> int:
    """Sum of the file sizes under `folder` (0 where unreadable)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def what_is_left(out: Path) -> str:
    """After a failed pack (its temporary folder removed): what the user still has at OUT."""
    out = Path(out)
    if is_pack_folder(out):
        return f"the earlier pack at {out} is kept as it was"
    if out.is_dir() and any(out.iterdir()):
        return f"{out} is as it was"
    return f"nothing was left at {out}"


def disk_full_message(error: OSError, out: Path, written: int, done: int, sources: list, n_formats: int) -> str:
    """One line: what failed, the space the whole pack needs and the space free now.

    The need is estimated as written / fraction done (`done` of `len(sources)` images), or,
    before any image was written, as the sources' total size x `n_formats` (an upper bound
    unless --max-side 0 grows them)."""
    total = len(sources)
    if done > 0 and written > 0:
        needed = int(written * total / done)
        how = f"estimated from {_size(written)} written for {done:,} of {total:,} images"
    else:
        source_bytes = 0
        for path in sources:
            try:
                source_bytes += os.stat(path).st_size
            except OSError:
                pass
        needed = source_bytes * n_formats
        how = f"at most the source's {_size(source_bytes)} x {n_formats} format(s)"
    try:
        free = f"{_size(shutil.disk_usage(Path(out).parent).free)} free there now"
    except OSError:
        free = "free space unknown"
    what = "disk quota exceeded" if error.errno == getattr(errno, "EDQUOT", None) else "disk full"
    return (f"{what} while packing into {Path(out).parent} ({error.strerror or error}): the pack needs about "
            f"{_size(needed)} ({how}), {free}; the partial pack was removed and {what_is_left(out)}. "
            "Free some space or choose an OUT on another disk")
