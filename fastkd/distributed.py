r"""Process groups: relaunch under torch.distributed.run, or join the one torchrun started.

    fastkd train --gpus 8 ...        ->  python -m fastkd.torchrun (torch.distributed.run) --standalone
                                          --nproc_per_node 8 -m fastkd.cli train --config RESOLVED
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint HOST:29500 --nproc-per-node 8 \
        -m fastkd.cli train ...      ->  each rank reads RANK / WORLD_SIZE / LOCAL_RANK and joins

NCCL on CUDA, gloo on CPU. Only rank 0 writes files; metric sums are all-reduced before logging.
Rank r runs on cuda:r, or on cuda:(N + r) with `--run.device cuda:N` (`local_device_index`).

Stopping a relaunched run (`relaunch`). Process tree and sessions:

    fastkd train (launcher, the terminal's job)
      `- torchrun               own session: a terminal Ctrl-C reaches the launcher only
           |- rank 0 ... N-1    torchrun puts each in a session of its own (recent torch) or
                                keeps them in its own; never in the terminal's group

  * First SIGINT / SIGTERM / SIGHUP to the launcher (Ctrl-C, `kill PID`, `docker stop`, a
    scheduler): the launcher sends SIGTERM to torchrun, which forwards it to every rank. A
    rank's SIGTERM only asks its loop to stop (idempotent, unlike a second SIGINT), so the
    ranks agree on a stop at their next metric read, rank 0 saves checkpoints/last.pt and
    they exit. The launcher waits for that and exits 128 + signal: 130 (SIGINT), 143
    (SIGTERM), 129 (SIGHUP). torchrun runs under fastkd.torchrun, which turns its
    SignalException and ChildFailedError dumps into exit codes (rank 0 has said what happened).
  * torchrun SIGKILLs ranks that are still running `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds
    after forwarding (its default is 30). The launcher sets it to `grace_s` (300) unless the
    environment already sets it; torch releases without that setting always wait 30 s.
  * A second signal stops at once: SIGKILL to torchrun, every rank and their process groups
    (data loader workers included); nothing more is saved. The launcher still returns (so
    the caller's temporary launch folder is removed) with the code of the first signal.
  * Ranks left behind by a torchrun that died some other way (OOM killer, SIGKILL) are found
    by the PIDs the launcher recorded, asked to stop with SIGTERM and waited for (up to
    `grace_s`, or until a second signal), then killed.
  * SIGKILL to the launcher alone cannot be forwarded: torchrun and its ranks keep running
    (a container stop or a scheduler's cgroup kill ends them all).

A terminal Ctrl-C therefore reaches every rank exactly once, through the launcher; sending a
signal to torchrun or to the ranks directly is handled by torchrun and the trainer as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastkd.errors import FastKDError
from fastkd.notes import say


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


GRACE_S = 300  # seconds the ranks get, after a stop signal, to agree on a step and save last.pt
_GRACE_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torchrun's wait before it SIGKILLs its ranks
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
_POLL_S = 0.5


def relaunch(nproc: int, cli_args: list[str], grace_s: int = GRACE_S) -> int:
    """Run `fastkd <cli_args>` as `nproc` local ranks through torch.distributed.run. Returns its
    exit code (128 + n when it died of signal n), or 128 + the first stop signal the launcher
    got (130 SIGINT, 143 SIGTERM, 129 SIGHUP) once the ranks have saved and exited. Always
    returns, also after a second signal, and leaves no rank running (module docstring)."""
    cmd = [
        sys.executable, "-m", "fastkd.torchrun", "--standalone",  # torchrun, one line per event
        "--nproc_per_node", str(nproc), "-m", "fastkd.cli", *cli_args,
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault(_GRACE_ENV, str(grace_s))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # terminal signals reach us only
    return _Launch(proc, grace_s).supervise()


class _Launch:
    """torchrun's process and the ranks it started, stopped as the module docstring says."""

    def __init__(self, proc: subprocess.Popen, grace_s: float):
        self.proc, self.grace_s = proc, grace_s
        self.first: int | None = None  # the first stop signal received
        self.hard = False  # a second signal arrived: kill everything now
        self.ranks: dict[int, tuple[str, bool]] = {}  # pid -> (/proc start time, leads its group)

    def supervise(self) -> int:
        with _handled(_STOP_SIGNALS, self.on_signal):
            while True:
                try:
                    code = self.proc.wait(timeout=_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    self.record_ranks()
            self.stop_leftovers()
        if self.first is not None:
            return 128 + self.first
        return 128 - code if code < 0 else code

    def on_signal(self, signum: int, frame) -> None:
        if self.first is None:
            self.first = signum
            say(f"fastkd train: {signal.Signals(signum).name}: the ranks stop at their next metric read and save "
                f"checkpoints/last.pt (up to {self.grace_s} s); signal again to kill them now", rank=0)  # fmt: skip
            if self.proc.returncode is None:
                _signal(self.proc.pid, signal.SIGTERM, group=False)  # torchrun forwards it to every rank
            return
        if not self.hard:
            say("fastkd train: second signal: killing torchrun and the ranks now (nothing more is saved)", rank=0)
        self.hard = True
        self.kill_all()

    def record_ranks(self) -> None:
        """Remember torchrun's children (pid, start time), to find them should torchrun die."""
        if self.proc.returncode is not None:
            return
        for pid in _children(self.proc.pid):
            start = _start_time(pid)
            if pid not in self.ranks and start is not None:
                try:
                    self.ranks[pid] = (start, os.getpgid(pid) == pid)
                except OSError:
                    pass

    def alive_ranks(self) -> list[int]:
        return [pid for pid, (start, _) in self.ranks.items() if _start_time(pid) == start]

    def kill_all(self) -> None:
        """SIGKILL torchrun's process group and every recorded rank with its process group."""
        self.record_ranks()
        if self.proc.returncode is None:
            _signal(self.proc.pid, signal.SIGKILL, group=True)
        for pid in self.alive_ranks():
            _signal(pid, signal.SIGKILL, group=self.ranks[pid][1])

    def stop_leftovers(self) -> None:
        """torchrun is gone; ranks it left (it was killed) get SIGTERM and grace_s, then SIGKILL."""
        if not self.alive_ranks():
            return
        if not self.hard:
            say("fastkd train: torchrun exited with ranks still running: asking them to stop and save", rank=0)
            for pid in self.alive_ranks():
                _signal(pid, signal.SIGTERM, group=False)
            deadline = time.monotonic() + self.grace_s
            while self.alive_ranks() and not self.hard and time.monotonic() < deadline:
                time.sleep(_POLL_S)
        self.kill_all()


@contextlib.contextmanager
def _handled(signums: tuple[int, ...], handler):
    """`handler` for `signums` inside the block (main thread only; elsewhere nothing changes)."""
    previous = {}
    try:
        for s in signums:
            previous[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: signals stay the caller's business
        pass
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _signal(pid: int, signum: int, group: bool) -> None:
    """Send `signum` to `pid` (and to its process group when it leads one); gone is fine."""
    targets = [(os.killpg, pid)] if group else []
    for send, target in [*targets, (os.kill, pid)]:
        try:
            send(target, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _start_time(pid: int) -> str | None:
    """The process's start time from /proc/PID/stat (tells a PID apart from a reused one);
    None when it is gone, a zombie, or /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # state, starttime (stat fields 3, 22)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (Linux /proc; [] elsewhere)."""
    task = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task)
    except OSError:
        return []
    if os.path.exists(f"{task}/{pid}/children"):
        out = []
        for tid in tids:
            try:
                with open(f"{task}/{tid}/children") as f:
                    out += [int(c) for c in f.read().split()]
            except OSError:  # the thread ended
                pass
        return out
    out = []  # kernel without CONFIG_PROC_CHILDREN: scan every process's parent
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def local_device_index(local_rank: int, base_index: int | None, device_count: int | None = None) -> int:
    """The CUDA index of the rank with LOCAL_RANK `local_rank`: base_index + local_rank with
    `--run.device cuda:N` (base_index N), else local_rank. `device_count` (visible CUDA
    devices, None when unknown) turns an index past the last device into a FastKDError."""
    if local_rank < 0 or (base_index is not None and base_index < 0):
        raise ValueError(f"local_rank {local_rank} and base_index {base_index} must be >= 0")
    index = local_rank if base_index is None else base_index + local_rank
    if device_count is not None and index >= device_count:
        flag = f"--run.device cuda:{base_index} with " if base_index is not None else ""
        raise FastKDError(
            f"{flag}--gpus: local rank {local_rank} needs cuda:{index}, but only {device_count} CUDA "
            f"device(s) are visible (cuda:0..cuda:{device_count - 1}); lower --gpus"
            + (" or the cuda:N index" if base_index is not None else "")
        )
    return index

def init(device_type: str, base_index: int | None = None) -> DistInfo:
    """Join the process group torchrun describes (no-op for a single process). On CUDA the rank
    selects cuda:local_device_index(LOCAL_RANK, base_index) (base_index: N of `cuda:N`)."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(local_device_index(info.local_rank, base_index, torch.cuda.device_count()))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (identity for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] for one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
