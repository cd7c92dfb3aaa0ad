"""fastkd.run_dir: the run dir lock, what a dir holds, and refusing/replacing a previous run."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from fastkd import run_dir as rd
from fastkd.errors import FastKDError
from fastkd.metrics import MetricsLog
from fastkd.run_dir import RunLock, classify, prepare_fresh

HOLDER = textwrap.dedent("""
    import sys
    from fastkd.run_dir import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold the lock until the test says so
    print("released", flush=True)
""")


@pytest.fixture
def holder(tmp_path):
    """A second process holding RunLock(tmp_path/run) until its stdin gets a line."""
    procs = []

    def start(run):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_second_training_into_a_locked_dir_is_refused(tmp_path, holder):
    run = tmp_path / "run"
    proc = holder(run)
    holder_info = json.loads((run / ".lock").read_text())
    assert holder_info["pid"] == proc.pid and holder_info["host"] == socket.gethostname()
    with pytest.raises(FastKDError) as info:
        RunLock(run).acquire()
    message = str(info.value)
    assert f"run dir {run} is in use by PID {proc.pid} (started " in message
    assert message.endswith("use another --out")

    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released"
    proc.wait()
    notes = []
    with RunLock(run, note=notes.append):  # released cleanly: no takeover note
        pass
    assert notes == []
    assert (run / ".lock").read_text() == ""


def test_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path, holder):
    run = tmp_path / "run"
    proc = holder(run)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    notes = []
    with RunLock(run, note=notes.append):
        with pytest.raises(FastKDError, match="in use by this process"):
            RunLock(run).acquire()  # a POSIX lock would not stop this process; the registry does
    assert len(notes) == 1
    assert f"taking over the lock left by PID {proc.pid}" in notes[0] and "no longer running" in notes[0]
    with RunLock(run, note=notes.append):  # released: the same process may lock it again
        pass


def test_without_file_locks_a_live_pid_holds_the_dir(tmp_path, holder, monkeypatch):
    """On a file system without locks (ENOLCK) the PID written in RUN/.lock decides."""
    run = tmp_path / "run"
    proc = holder(run)  # alive and named in the lock file

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rd.fcntl, "lockf", no_locks)
    with pytest.raises(FastKDError, match=f"in use by PID {proc.pid}"):
        RunLock(run).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    notes = []
    with RunLock(run, note=notes.append):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and "no longer running" in notes[0]


def write_run(run, epochs=2, steps_per_epoch=3, report=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("loss:\n  method: ce\n")
    with MetricsLog(run / "metrics.jsonl", enabled=True) as log:
        for epoch in range(epochs):
            for s in range(1, steps_per_epoch + 1):
                log.write({"kind": "step", "epoch": epoch, "step": epoch * steps_per_epoch + s, "loss": 1.0})
            log.write({"kind": "eval", "epoch": epoch, "step": (epoch + 1) * steps_per_epoch,
                       "resnet18": {"top1": 50.0}})
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"weights")
    (run / "checkpoints" / "best-resnet18.pt").write_bytes(b"weights")
    (run / "plots").mkdir(exist_ok=True)
    (run / "plots" / "loss.png").write_bytes(b"png")
    if report is not None:
        (run / "report.json").write_text(json.dumps(report))
        (run / "report.md").write_text("# report\n")


def test_classify(tmp_path):
    assert classify(tmp_path / "missing") == "empty"
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / ".lock").write_text("")
    assert classify(run) == "empty"
    (run / "config.yaml").write_text("{}")
    assert classify(run) == "run"
    for marker in ("metrics.jsonl", "checkpoints/last.pt"):
        other = tmp_path / marker.replace("/", "_")
        (other / marker).parent.mkdir(parents=True)
        (other / marker).write_text("")
        assert classify(other) == "run", marker

    write_run(run, report={"method": "ce", "finished": True})
    assert classify(run) == "finished"
    write_run(run, report={"method": "ce", "epochs": 2, "total_epochs": 2})
    assert classify(run) == "finished"
    write_run(run, report={"method": "ce", "epochs": 1, "total_epochs": 2})  # split with stop_after
    assert classify(run) == "run"
    write_run(run, report={"method": "ce"})  # no word on finishing: a run, not known finished
    assert classify(run) == "run"
    (run / "report.json").write_text('{"finished": tr')  # cut off
    assert classify(run) == "run"


def test_fresh_run_into_a_previous_run_is_refused(tmp_path):
    run = tmp_path / "run"
    write_run(run, epochs=2, steps_per_epoch=3)
    with MetricsLog(run / "metrics.jsonl", enabled=True) as log:  # killed inside epoch 3
        log.write({"kind": "step", "epoch": 2, "step": 7, "loss": 1.0})
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(FastKDError) as info:
        prepare_fresh(run, overwrite=False)
    assert str(info.value) == (
        f"run dir {run} already holds a run (2 epochs, last step 7); continue it with --resume auto, "
        "replace it with --overwrite, or choose another --out (fastkd.fit: config keys run.resume, run.overwrite, "
        "run.out)")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    done = tmp_path / "done"
    write_run(done, epochs=3, report={"finished": True, "epochs": 3, "total_epochs": 3})
    with pytest.raises(FastKDError, match=r"already holds a finished run \(3 epochs, last step 9\)"):
        prepare_fresh(done, overwrite=False)


def test_fresh_run_into_an_empty_or_missing_dir(tmp_path):
    prepare_fresh(tmp_path / "new" / "run", overwrite=False)
    assert (tmp_path / "new" / "run").is_dir()
    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    (mine / "plots" / "old.png").write_bytes(b"x")  # not a run: left alone even with no flag
    prepare_fresh(mine, overwrite=False)
    assert (mine / "plots" / "old.png").exists()


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    run = tmp_path / "run"
    write_run(run, report={"finished": True})
    for name in ("tensorboard/events", "events.out.tfevents.123.host", ".report.json.abc123.tmp"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    (run / "data" / "train.txt").write_text("mine")
    (run / ".old-999999999").mkdir()  # left by a crashed --overwrite of a process that is gone
    (run / ".old-999999999" / "config.yaml").write_text("{}")
    with RunLock(run):
        prepare_fresh(run, overwrite=True)
        left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == [".lock", "data", "data/train.txt", "notes.txt"]
    assert classify(run) == "empty"
    prepare_fresh(run, overwrite=False)  # now a fresh run may start


def test_overwrite_keeps_files_the_run_did_not_write(tmp_path, capsys):
    """Only last.pt, best-<net>.pt of the networks the run evaluated and the plots its report lists
    go; a backup, a look-alike best-*.pt and the user's figure stay, and are named."""
    run = tmp_path / "run"
    write_run(run, report={"finished": True, "plots": ["plots/loss.png"], "networks": {"resnet18": {}}})
    (run / "checkpoints" / "best-resnet18-ema.pt").write_bytes(b"ema")  # the EMA of a network the report lists
    (run / "plots" / "reliability.png").write_bytes(b"png")  # a plot fastkd draws
    strangers = ["checkpoints/my_backup.pt", "checkpoints/best-resnet18-keep.pt", "plots/my_figure.png"]
    for name in strangers:
        (run / name).write_bytes(b"mine")
    with RunLock(run):
        prepare_fresh(run, overwrite=True)
        left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == [".lock", *sorted(strangers)]
    err = capsys.readouterr().err
    assert all(name in err for name in strangers)
    assert classify(run) == "empty"


def test_overwrite_crash_halfway_leaves_no_half_finished_run(tmp_path, monkeypatch):
    """A crash after the first renames: the markers of a finished/resumable run are gone first,
    so what is left is refused again (no silent mix) and a later --overwrite cleans up."""
    run = tmp_path / "run"
    write_run(run, report={"finished": True})
    real_replace, calls = os.replace, []

    def crash_on_third(src, dst):
        calls.append(os.path.basename(src))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(rd.os, "replace", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_fresh(run, overwrite=True)
    monkeypatch.setattr(rd.os, "replace", real_replace)
    assert calls[:2] == ["report.json", "checkpoints"]
    assert not (run / "report.json").exists() and not (run / "checkpoints").exists()
    assert classify(run) == "run"
    with pytest.raises(FastKDError, match="already holds a run"):
        prepare_fresh(run, overwrite=False)
    prepare_fresh(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == []  # its own .old-<pid> folder went too


def test_plot_names_are_the_ones_the_report_draws():
    from fastkd.report_plots import render_plots
    from fastkd.run_dir import PLOT_NAMES

    evals = [{"kind": "eval", "epoch": e, "step": 2 * e + 2, "a": {"top1": 50.0 + e, "top5": 90.0}} for e in range(2)]
    steps = [{"kind": "step", "epoch": e, "step": 2 * e + 1, "loss": 1.0, "lr": 0.1} for e in range(2)]
    drawn = render_plots(steps + evals, {"method": "uadkd"})
    assert drawn and set(drawn) <= set(PLOT_NAMES)
