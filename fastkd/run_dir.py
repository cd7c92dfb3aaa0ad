"""The rules of a run directory (`--out`), applied by every training (Trainer.fit: `fastkd train`
and `fastkd.fit` alike) before it writes anything:

    with claim(out, resumed_at=None, overwrite=False):   # RunLock + prepare_fresh, or on resume
        ... train ...                                     # truncate_metrics past the checkpoint

    with RunLock(out):                          # one training per run dir at a time
        if resuming:
            truncate_metrics(out / "metrics.jsonl", ckpt_global_step, ckpt_epoch)  # fastkd.metrics
        else:
            prepare_fresh(out, overwrite)         # refuse to mix two runs in one dir

classify(out) says what a dir holds: "empty" (nothing of a run; unrelated files allowed),
"run" (config.yaml, metrics.jsonl or checkpoints/last.pt of a previous run) or "finished"
(report.json says the run completed all its epochs).

Every refusal is a FastKDError naming the dir and the flag that resolves it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastkd.errors import FastKDError
from fastkd.metrics import read_metrics, truncate_metrics
from fastkd.notes import say
from fastkd.run_layout import CHECKPOINTS_DIR, CONFIG, LAST, METRICS, PLOTS_DIR, REPORT_JSON, REPORT_MD, RunLayout, best_name

LOCK_NAME = ".lock"
# set by a process that holds a run dir's lock (fastkd train --gpus N) for the ranks it launches
LOCK_ENV = "FASTKD_RUN_LOCK_HELD"
TRASH_PREFIX = ".old-"  # RUN/.old-<pid>: a replaced run on its way out (see prepare_fresh)

# What a fastkd run writes into its dir; --overwrite removes these and nothing else. Order
# matters: the markers of a finished run (report.json) and of a resumable run (checkpoints/) go
# first, so a crash halfway leaves at worst an unfinished, checkpoint-less run, which a fresh
# run refuses again rather than mixing with it. In checkpoints/ and plots/ only the files the run
# names are its own (`_owned_in`); the logger folders are written whole by TensorBoard / W&B.
RUN_FILES = (REPORT_JSON, CHECKPOINTS_DIR, REPORT_MD, PLOTS_DIR, "tensorboard", "tb", "wandb", METRICS, CONFIG)
SHARED_DIRS = (CHECKPOINTS_DIR, PLOTS_DIR)  # may hold a user's own files next to the run's
# the plots fastkd.report_plots.render_plots draws (it imports matplotlib, so the names are
# restated here; tests/test_run_dir.py checks that the two agree)
PLOT_NAMES = ("loss", "accuracy", "w_hist", "reliability")
RUN_MARKERS = (CONFIG, METRICS, f"{CHECKPOINTS_DIR}/{LAST}")

# run dirs this process holds: a POSIX lock is per process, so a second RunLock of the same dir
# in this process would "succeed" and its close would drop the first one's lock
_HELD: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_holder(fd: int) -> dict:
    """{"pid", "host", "started"} written by the lock's last holder, {} if none/unreadable.

    Read through the lock's own fd: opening and closing the file again would drop this
    process's POSIX lock on it."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    pid = holder.get("pid", "?")
    host = holder.get("host")
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    started = f" (started {holder['started']})" if holder.get("started") else ""
    return f"PID {pid}{where}{started}"


class RunLock:
    """An exclusive lock on a run dir for the whole training; a context manager.

    RUN/.lock carries a POSIX lock (fcntl.lockf) and the holder's {"pid", "host", "started"} as
    JSON. A POSIX lock belongs to the process: the kernel drops it when the process dies (even by
    kill -9), and unlike flock it is not inherited by forked DataLoader workers, which would keep
    a dead trainer's lock alive. Where the file system has no locks (ENOLCK), the PID written in
    the file decides: a live PID on this host holds the dir. A lock file naming a process that is
    gone is taken over with a one-line note (`note`, default fastkd.notes.say: stderr).

    Take it in the one process that lives for the whole training (rank 0 / the launcher), not
    in every rank, and never open RUN/.lock elsewhere in that process (closing any fd of the file
    drops a POSIX lock). Release clears the file (it stays, empty, so no two processes ever lock two
    different files of one name).
    """

    def __init__(self, run_dir: str | os.PathLike, note: Callable[[str], None] = say):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.note = note
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        key = self.run_dir.resolve()
        if key in _HELD:
            raise FastKDError(f"run dir {self.run_dir} is in use by this process (PID {os.getpid()}); "
                              "use another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            locked = True
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise FastKDError(f"run dir {self.run_dir} is in use by {_describe(_read_holder(fd))}; "
                                      "use another --out") from None
                if error.errno != errno.ENOLCK:
                    raise
                locked = False  # no locks on this file system: the PID in the file decides
            previous = _read_holder(fd)
            if previous:
                same_host = previous.get("host") == socket.gethostname()
                pid = previous.get("pid")
                if not locked and same_host and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
                    raise FastKDError(f"run dir {self.run_dir} is in use by {_describe(previous)}; use another --out")
                dead = same_host and isinstance(pid, int) and not _pid_alive(pid)
                gone = "is no longer running" if dead else "no longer holds it"
                self.note(f"fastkd: run dir {self.run_dir}: taking over the lock left by {_describe(previous)}, "
                          f"which {gone}")
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(key)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no holder to take over from
        finally:
            os.close(self._fd)  # drops the lock
            self._fd = None
            _HELD.discard(self.run_dir.resolve())

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _report(run_dir: Path) -> dict | None:
    try:
        report = json.loads(RunLayout(run_dir).report_json.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _finished(report: dict | None) -> bool:
    """report.json says the run completed: "finished": true, or "epochs" >= "total_epochs"."""
    if not report:
        return False
    if report.get("finished") is True:
        return True
    epochs, total = report.get("epochs"), report.get("total_epochs")
    return isinstance(epochs, int) and isinstance(total, int) and total > 0 and epochs >= total


def classify(run_dir: str | os.PathLike) -> str:
    """"empty" | "run" | "finished": what `run_dir` holds (a missing dir is "empty").

    "finished": report.json says the run completed its epochs ("finished": true, or "epochs" >=
    "total_epochs"); "run": config.yaml, metrics.jsonl, checkpoints/last.pt or report.json of a
    run that is not known to be finished; "empty": none of these (other files do not count).
    """
    run_dir = Path(run_dir)
    report = _report(run_dir)
    if _finished(report):
        return "finished"
    if RunLayout(run_dir).report_json.exists() or any((run_dir / m).exists() for m in RUN_MARKERS):
        return "run"
    return "empty"


def describe_run(run_dir: str | os.PathLike) -> str:
    """'N epochs, last step S' of the run in run_dir, from report.json or metrics.jsonl.

    N counts finished epochs: report.json's "epochs" when present, else the epochs with an eval
    record or followed by steps of a later epoch (an epoch without eval, at most one, may be
    counted as unfinished when eval_every > 1)."""
    run_dir = Path(run_dir)
    records = read_metrics(RunLayout(run_dir).metrics)
    steps = [r for r in records if r.get("kind") == "step" and isinstance(r.get("step"), int)]
    evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get("epoch"), int)]
    report = _report(run_dir) or {}
    epochs = report.get("epochs")
    if not isinstance(epochs, int):
        epochs = max([r["epoch"] + 1 for r in evals] +
                     [r["epoch"] for r in steps if isinstance(r.get("epoch"), int)] + [0])
    last_step = max((r["step"] for r in steps), default=None)
    if last_step is None:
        return f"{epochs} epochs, no step logged"
    return f"{epochs} epochs, last step {last_step}"


def _networks(run_dir: Path) -> set[str]:
    """Names of the networks the run in run_dir evaluated (best-<name>.pt is saved right after
    its eval record): keys of its eval records and of report.json's "networks" (+ their -ema)."""
    names = set()
    for record in read_metrics(RunLayout(run_dir).metrics):
        if record.get("kind") == "eval":
            names |= {k for k, v in record.items() if isinstance(v, dict) and "top1" in v}
    networks = (_report(run_dir) or {}).get("networks")
    if isinstance(networks, dict):
        names |= set(networks) | {f"{name}-ema" for name in networks}
    return names - {"teacher"}


def _own_names(run_dir: Path, folder: str) -> set[str]:
    """File names the run lists as its own in checkpoints/ or plots/."""
    if folder == CHECKPOINTS_DIR:
        return {LAST} | {best_name(name) for name in _networks(run_dir)}
    plots = (_report(run_dir) or {}).get("plots")
    listed = {Path(p).name for p in plots if isinstance(p, str)} if isinstance(plots, list) else set()
    return listed | {f"{name}.png" for name in PLOT_NAMES}


def _is_own(name: str, own: set[str]) -> bool:
    """One of `own`, or an atomic-write temporary of one (.last.pt.<random>.tmp)."""
    return name in own or (name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in own))


def _owned_in(run_dir: Path, folder: str) -> tuple[list[Path], list[Path]]:
    """(the run's files in run_dir/folder, last.pt first; the files it did not write)."""
    own = _own_names(run_dir, folder)
    children = sorted((run_dir / folder).iterdir(), key=lambda p: (p.name != LAST, p.name))
    mine = [c for c in children if c.is_file() and _is_own(c.name, own)]
    return mine, [c for c in children if c not in mine]


def _run_entries(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(what a fastkd run wrote into run_dir, in removal order; what it did not write inside the
    folders it shares). RUN_FILES (checkpoints/ and plots/ whole when nothing else is in them,
    else only the run's files), TensorBoard event files and atomic-write temporaries of those
    names (.report.json.<random>.tmp)."""
    entries, strangers = [], []
    for name in RUN_FILES:
        path = run_dir / name
        if name in SHARED_DIRS and path.is_dir():
            mine, others = _owned_in(run_dir, name)
            entries += mine if others else [path]
            strangers += others
        elif path.exists():
            entries.append(path)
    if run_dir.is_dir():
        for child in sorted(run_dir.iterdir()):
            temporary = child.name.endswith(".tmp") and _is_own(child.name, set(RUN_FILES))
            if child.name.startswith("events.out.tfevents.") or temporary:
                entries.append(child)
    return entries, strangers


def _remove_stale_trash(run_dir: Path) -> None:
    """Delete RUN/.old-<pid> folders a crashed --overwrite left (their process is gone)."""
    if not run_dir.is_dir():
        return
    for child in run_dir.iterdir():
        if child.is_dir() and child.name.startswith(TRASH_PREFIX):
            pid = child.name[len(TRASH_PREFIX):]
            if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                shutil.rmtree(child, ignore_errors=True)


def prepare_fresh(run_dir: str | os.PathLike, overwrite: bool) -> None:
    """Make run_dir ready for a fresh (not resumed) run; creates it when missing.

    A dir that holds a run ("run" or "finished") is refused unless `overwrite`:
    FastKDError "run dir X already holds a run (N epochs, last step S); continue it with
    --resume auto, replace it with --overwrite, or choose another --out". With overwrite, only
    what a fastkd run writes goes (config.yaml, metrics.jsonl, report.json/.md, tensorboard/, tb/,
    events.out.tfevents.*, and in checkpoints/ and plots/ exactly the files the run names: last.pt,
    best-<net>.pt of the networks it evaluated, the plots it draws or report.json lists); other files stay,
    and the ones inside checkpoints/ or plots/ are named on stderr. The entries are first
    renamed into RUN/.old-<pid> (one rename each, markers of a finished or resumable run first)
    and then deleted, so a crash never leaves a half-deleted checkpoint or report; a later call
    deletes such a leftover folder. Call it while holding the RunLock.
    """
    run_dir = Path(run_dir)
    _remove_stale_trash(run_dir)
    state = classify(run_dir)
    if state != "empty" and not overwrite:
        what = "a finished run" if state == "finished" else "a run"
        raise FastKDError(f"run dir {run_dir} already holds {what} ({describe_run(run_dir)}); continue it "
                          "with --resume auto, replace it with --overwrite, or choose another --out (fastkd.fit: "
                          "config keys run.resume, run.overwrite, run.out)")
    run_dir.mkdir(parents=True, exist_ok=True)
    entries, strangers = _run_entries(run_dir) if overwrite else ([], [])  # without a run, leftovers stay
    if strangers:
        say(f"fastkd: --overwrite of {run_dir} keeps {len(strangers)} file(s) the run did not write: "
            + ", ".join(str(p.relative_to(run_dir)) for p in strangers[:10]))
    if not entries:
        return
    trash = run_dir / f"{TRASH_PREFIX}{os.getpid()}"
    trash.mkdir(exist_ok=True)
    for i, entry in enumerate(entries):  # numbered: checkpoints/x and plots/x never collide
        os.replace(entry, trash / f"{i:03d}-{entry.name}")
    shutil.rmtree(trash)


def _held_for_us(run_dir: Path) -> bool:
    """This process holds run_dir's lock already, or the launcher that started it does."""
    held = os.environ.get(LOCK_ENV)
    return run_dir.resolve() in _HELD or (held is not None and Path(held).resolve() == run_dir.resolve())


def _remove_if_bare(run_dir: Path) -> None:
    """Remove run_dir when it holds nothing but an empty .lock (made by a call that then failed)."""
    try:
        if [p.name for p in run_dir.iterdir()] == [LOCK_NAME] and (run_dir / LOCK_NAME).stat().st_size == 0:
            (run_dir / LOCK_NAME).unlink()
        run_dir.rmdir()  # fails, harmlessly, when anything else is in it
    except OSError:
        pass


@contextmanager
def claim(run_dir: str | os.PathLike, *, resumed_at: tuple[int, int] | None, overwrite: bool,
          enabled: bool = True) -> Iterator[None]:  # fmt: skip
    """Hold run_dir for one training: RunLock, then prepare_fresh (a fresh run) or drop the
    metrics.jsonl records past `resumed_at` = (global_step, epoch) of the checkpoint resumed.
    Nothing when not `enabled` (ranks > 0) or when the lock is already held for this process
    (`fastkd train --gpus N` takes it before it starts the ranks). A dir this call created is
    removed again when the training fails before writing anything into it."""
    run_dir = Path(run_dir)
    if not enabled or _held_for_us(run_dir):
        yield
        return
    created = not run_dir.exists()
    try:
        with RunLock(run_dir):
            if resumed_at is None:
                prepare_fresh(run_dir, overwrite)
            else:
                truncate_metrics(RunLayout(run_dir).metrics, *resumed_at)
            yield
    except BaseException:
        if created:
            _remove_if_bare(run_dir)
        raise
