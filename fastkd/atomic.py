"""Whole-or-nothing file writes: a temporary name in the same folder, fsync, rename, fsync the folder.

A reader (or a resumed run) sees either the old file or the complete new one, never a
half-written file, even after kill -9, power loss or a full disk.

The file gets the permissions a plain `open(path, "w")` would give it: an existing file keeps
its mode; a new one gets 0o666 minus the umask (and any default ACL of the folder), because the
temporary file is created by the kernel with mode 0o666 exactly as open() does (not mkstemp's
0o600). So a manifest, checkpoint or report is as readable to the group as the shards beside it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file `.NAME.XXXXXXXX.tmp` beside `path`, mode 0o666 & ~umask like open() gives."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _CREATE, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable; skipped quietly where the platform cannot
    (Windows cannot open a folder; some file systems refuse fsync on one)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(f) on a binary file at a temporary name beside `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        keep_mode = stat.S_IMODE(os.stat(path).st_mode)  # open("w") on an existing file keeps its mode
    except OSError:
        keep_mode = None
    fd, tmp = _create_temporary(path)
    try:
        if keep_mode is not None:
            os.chmod(tmp, keep_mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """atomic_write of a bytes object."""
    return atomic_write(path, lambda f: f.write(data))
