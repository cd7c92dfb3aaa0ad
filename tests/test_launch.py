"""`fastkd train --gpus N` as a launcher: a stop signal sent to the launcher's PID alone (`kill`,
`docker stop`, a scheduler) reaches every rank, the ranks save the agreed checkpoint, the
launcher exits 128 + signal and leaves no rank and no temporary launch folder behind; a second
signal kills at once. Plus the rank -> CUDA index mapping of `--run.device cuda:N`.

The end-to-end runs use two gloo ranks on CPU (the digits pack of test_train_cli.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastkd.checkpoint import load_last
from fastkd.distributed import local_device_index
from fastkd.errors import FastKDError
from test_train_cli import COMMON, packed  # noqa: F401 (fixture)

# ------------------------------------------------------------------ rank -> CUDA index


def test_local_rank_maps_to_its_own_device():
    assert [local_device_index(r, None) for r in range(4)] == [0, 1, 2, 3]  # --run.device cuda / auto
    assert [local_device_index(r, 2, device_count=4) for r in range(2)] == [2, 3]  # cuda:2, --gpus 2
    assert local_device_index(0, 5) == 5  # device count unknown: no check


def test_device_index_past_the_last_gpu_names_the_flags():
    with pytest.raises(FastKDError, match=r"--run.device cuda:3 with --gpus.*cuda:4.*2 CUDA"):
        local_device_index(1, 3, device_count=2)
    with pytest.raises(FastKDError, match=r"^--gpus: local rank 2 needs cuda:2"):
        local_device_index(2, None, device_count=2)
    with pytest.raises(ValueError):
        local_device_index(-1, None)


# ------------------------------------------------------------------ signals end to end

# ranks take a step every fraction of a second; the stop is agreed at the next one (log_every 1)
ARGS = [*COMMON, "--batch-size", "8", "--run.log_every", "1", "--method", "ce", "--students",
        "mobilenet_v3_small", "--epochs", "2", "--data.num_workers", "0"]  # fmt: skip


def processes_under(root: Path) -> dict[int, str]:
    """pid -> command line of live processes whose command line names a path under `root` (the
    launcher by --out, torchrun and the ranks by --config in TMPDIR)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline:
            found[int(name)] = cmdline
    return found


def ranks_under(root: Path) -> dict[int, str]:
    """The rank processes: `python -m fastkd.cli train --config TMPDIR/fastkd-launch-*/...`."""
    return {p: c for p, c in processes_under(root).items()
            if "fastkd.cli train --config" in c and "fastkd.torchrun" not in c}  # fmt: skip


@pytest.fixture
def launch(packed, tmp_path):  # noqa: F811 (the imported fixture)
    """Start `fastkd train --gpus 2` in a session of its own with TMPDIR under tmp_path; yields
    (process, run dir, TMPDIR, log file). Whatever is left running is killed afterwards."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "run"
    log = tmp_path / "launcher.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "fastkd.cli", "train", "--gpus", "2", "--data", str(packed), *ARGS,
           "--out", str(out)]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield proc, out, tmp, log
    finally:
        for pid in processes_under(tmp_path):  # a failed test must not leave trainers running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def wait_for_training(proc, out: Path, log: Path, timeout: float = 150) -> None:
    """Until rank 0 has logged a step (the ranks' stop handlers are installed by then)."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if metrics.exists() and any(json.loads(r)["kind"] == "step" for r in metrics.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no training step within {timeout} s\n{log.read_text()[-3000:]}")


def assert_nothing_left(tmp_path: Path, tmp: Path) -> None:
    assert processes_under(tmp_path) == {}  # launcher, torchrun, ranks: all gone
    assert list(tmp.glob("fastkd-launch-*")) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143)])  # SIGINT -> 130: the test below
def test_stop_signal_to_launcher_saves_agreed_checkpoint(launch, tmp_path, signum, code):
    proc, out, tmp, log = launch
    wait_for_training(proc, out, log)
    ranks = ranks_under(tmp_path)
    assert len(ranks) == 2, ranks
    os.kill(proc.pid, signum)  # the launcher alone, as `kill`, `docker stop` or a scheduler does
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == code, text[-3000:]
    assert_nothing_left(tmp_path, tmp)
    ckpt = load_last(out / "checkpoints/last.pt")
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] > 0  # stopped inside the first epoch
    assert len(ckpt["rng"]) == 2  # both ranks took part in the agreed save
    assert f"{signal.Signals(signum).name}: the ranks stop at their next metric read" in text
    assert "Traceback" not in text and "SignalException" not in text, text[-3000:]  # one line per event
    assert text.count("stopped; resume with") == 1, text[-3000:]  # from rank 0 only


@pytest.mark.slow
def test_second_signal_kills_at_once(launch, tmp_path):
    """Ctrl-C twice: the first asks for the graceful stop, the second kills; still exit 130."""
    proc, out, tmp, log = launch
    wait_for_training(proc, out, log)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    start = time.monotonic()
    rc = proc.wait(timeout=30)
    assert rc == 130, log.read_text()[-3000:]
    assert time.monotonic() - start < 10  # killed, not a graceful 300 s wait
    assert "killing torchrun and the ranks now" in log.read_text()
    assert_nothing_left(tmp_path, tmp)


# ------------------------------------------------------------------ a torchrun that dies

FAKE_TORCHRUN = """
import subprocess, sys, time
for rank in range(2):  # like torchrun: each rank in a session of its own
    subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], str(rank)], start_new_session=True)
time.sleep(600)
"""
RANK = """
import os, signal, sys, time
out, rank = sys.argv[1], sys.argv[2]
def stop(signum, frame):
    time.sleep(1)  # agree and save
    open(os.path.join(out, f"saved{rank}"), "w").write(str(signum))
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(out, f"ready{rank}"), "w").close()
time.sleep(600)
"""


def test_ranks_left_by_a_killed_torchrun_are_stopped_and_waited_for(tmp_path):
    """torchrun SIGKILLed (OOM killer, a stray kill -9): the launcher finds the ranks it
    recorded, asks them to stop (SIGTERM), waits for their save, and returns 128 + 9."""
    from fastkd.distributed import _Launch

    proc = subprocess.Popen([sys.executable, "-c", FAKE_TORCHRUN, RANK, str(tmp_path)])
    launch = _Launch(proc, grace_s=60)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("ready*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    launch.record_ranks()
    ranks = list(launch.ranks)
    assert len(ranks) == 2
    proc.kill()
    try:
        assert launch.supervise() == 128 + signal.SIGKILL
        assert sorted(p.name for p in tmp_path.glob("saved*")) == ["saved0", "saved1"]
        assert launch.alive_ranks() == []
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------ one line per event

STOPPING_RANK = """
import os, signal, sys, time
def stop(signum, frame):  # as the trainer does: rank 0 says where it saved, every rank exits 143
    if os.environ["RANK"] == "0":
        print("fastkd train: stopped; resume with --resume last.pt", file=sys.stderr, flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(sys.argv[1], "ready" + os.environ["RANK"]), "w").close()
time.sleep(120)
"""


def _torchrun(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOGLEVEL", None)
    cmd = [sys.executable, "-m", "fastkd.torchrun", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


def test_stopped_torchrun_prints_no_traceback(tmp_path):
    """SIGTERM to torchrun (as the launcher sends it): rank 0's line, no SignalException dump."""
    script = tmp_path / "rank.py"
    script.write_text(STOPPING_RANK)
    proc = _torchrun(tmp_path, str(script), str(tmp_path))
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready*"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert out.strip().splitlines() == ["fastkd train: stopped; resume with --resume last.pt"], out


def test_refused_multi_rank_run_says_it_once_without_a_dump(tmp_path):
    """A FastKDError on every rank (here: a missing config): rank 0's one line, exit 2."""
    proc = _torchrun(tmp_path, "-m", "fastkd.cli", "train", "--config", str(tmp_path / "nope.yaml"))
    out, _ = proc.communicate(timeout=120)
    lines = out.strip().splitlines()
    assert proc.returncode == 2, out
    assert len(lines) == 1 and lines[0].startswith("fastkd train: error:") and "nope.yaml" in lines[0], out


def test_a_failure_rank_0_did_not_report_is_one_line(tmp_path):
    """Rank 1 alone fails (its own FastKDError, written to its error file): one line names it."""
    script = tmp_path / "rank.py"
    script.write_text("import os, sys, time\nfrom fastkd.torchrun import report_error\n"
                      "if os.environ['RANK'] == '1':\n    report_error('fastkd train: error: --gpus: no cuda:1')\n"
                      "    sys.exit(2)\ntime.sleep(120)\n")  # fmt: skip
    out, _ = _torchrun(tmp_path, str(script)).communicate(timeout=120)
    lines = out.strip().splitlines()
    assert lines == ["fastkd train: rank 1 failed (exit code 2): fastkd train: error: --gpus: no cuda:1"], out


def test_an_error_rank_0_printed_is_not_said_again_when_another_rank_exited_first(tmp_path):
    """Both ranks refuse the run; rank 1 exits first, so torchrun stops rank 0 (after it printed)
    with a signal: the launcher adds no second line, and exits with rank 1's code."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from fastkd.torchrun import failure_line

    def failure(rank, exitcode, data):
        path = tmp_path / f"error-{rank}-{len(list(tmp_path.iterdir()))}.json"  # a new file each time
        if data is not None:
            path.write_text(json.dumps(data))
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(path))

    said = {"message": "fastkd train: error: nope", "timestamp": 1, "printed": True}
    one = {"message": "fastkd train: error: nope", "timestamp": 1, "printed": False}
    assert failure_line({0: failure(0, -15, said), 1: failure(1, 2, one)}) == (2, None)
    code, line = failure_line({0: failure(0, -15, None), 1: failure(1, 2, one)})  # rank 0 said nothing
    assert code == 2 and line == "fastkd train: rank 1 failed (exit code 2): fastkd train: error: nope"
