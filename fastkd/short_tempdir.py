"""Keep multiprocessing's socket directory short enough for AF_UNIX socket paths.

Why: Python's multiprocessing creates its listener sockets (the resource_sharer's, which sends
file descriptors to other processes; the forkserver's; a Manager's) as
`<get_temp_dir()>/listener-XXXXXXXX`, where get_temp_dir() is `mkdtemp(prefix="pymp-")` under
tempfile.gettempdir(), i.e. under $TMPDIR. An AF_UNIX path holds at most 108 bytes on Linux (104
on BSD and macOS), so once $TMPDIR is about 76 characters or longer, bind() fails with "AF_UNIX
path too long". torch DataLoader workers send every batch's tensors with the file_descriptor
sharing strategy (torch's default on Linux), which passes each storage's fd through the
resource_sharer. The error is raised in the worker's queue feeder thread, which prints it and
drops the batch. The worker stays alive, so the main process waits for that batch forever: a
hang, not an error. (The file_system strategy does not help: torch_shm_manager puts its socket
under $TMPDIR too, and then fails with "Invalid argument".)

The fix: ensure() gives multiprocessing (through `current_process()._config["tempdir"]`, which
is what get_temp_dir() reads and what every process forked afterwards inherits) a short
`pymp-XXXXXXXX` directory under /tmp (or /var/tmp, /dev/shm). It is removed at exit the way
multiprocessing removes its own (util.Finalize, run by multiprocessing's atexit hook; forked
children clear the inherited finalizers, so only the process that created it removes it).
fastkd/__init__.py calls ensure() on import, so it runs before any loader or Pool starts, also
in spawned workers that unpickle a fastkd object. When no temp-dir variable is long it only
reads the environment and imports nothing.
"""

from __future__ import annotations

import os
import sys

# sizeof(sockaddr_un.sun_path): Linux 108; BSD and macOS 104 (92 is the POSIX-portable minimum).
SUN_PATH_MAX = 108 if sys.platform.startswith("linux") else 104
# what multiprocessing appends to tempfile.gettempdir(): "/pymp-" + 8 random characters, then
# "/listener-" + 8 (tempfile's random names are 8 characters long)
_PYMP = len("/pymp-") + 8
_LISTENER = len("/listener-") + 8
SHORT_BASES = ("/tmp", "/var/tmp", "/dev/shm", "/usr/tmp")


def fits(directory: str, tail: int) -> bool:
    """Does a socket path of `directory` + `tail` more bytes fit in sun_path (with its NUL)?"""
    return len(os.fsencode(directory)) + tail < SUN_PATH_MAX


def ensure() -> str | None:
    """Before any worker process starts: if multiprocessing's temp directory, whether already
    made or still to be made under tempfile.gettempdir(), is too long for its socket paths, give
    it a short one. Returns the new directory, or None if nothing was changed (the usual case).
    Safe to call more than once."""
    if os.name == "nt":  # Windows: named pipes, no AF_UNIX sockets
        return None
    made = sys.modules.get("multiprocessing.process")
    current = made.current_process()._config.get("tempdir") if made else None
    if current is None and all(fits(os.environ.get(v, ""), _PYMP + _LISTENER) for v in ("TMPDIR", "TEMP", "TMP")):
        return None  # fast path: tempfile picks one of those or /tmp, all short enough
    if current is not None and fits(current, _LISTENER):
        return None
    import tempfile
    from multiprocessing import process, util

    if current is None and fits(tempfile.gettempdir(), _PYMP + _LISTENER):
        return None
    for base in SHORT_BASES:
        try:
            tempdir = tempfile.mkdtemp(prefix="pymp-", dir=base)
        except OSError:
            continue
        if fits(tempdir, _LISTENER):
            break
        os.rmdir(tempdir)
    else:
        return None  # no short writable directory: leave multiprocessing as it is
    import shutil

    util.info("created temp directory %s (the default one is too long for AF_UNIX socket paths)", tempdir)
    # like util.get_temp_dir(): a strong reference to shutil.rmtree, as the finalizer can run late
    remove = getattr(util, "_remove_temp_dir", None)
    if remove is not None:
        util.Finalize(None, remove, args=(shutil.rmtree, tempdir), exitpriority=-100)
    else:
        util.Finalize(None, shutil.rmtree, args=(tempdir, True), exitpriority=-100)
    process.current_process()._config["tempdir"] = tempdir
    return tempdir
