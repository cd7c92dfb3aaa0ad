r"""Process groups: relaunch under torch.distributed.run, or join the one torchrun started.

    fastkd train --gpus 8 ...        ->  python -m torch.distributed.run --standalone
                                          --nproc_per_node 8 -m fastkd.cli train --config RESOLVED
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint HOST:29500 --nproc-per-node 8 \
        -m fastkd.cli train ...      ->  each rank reads RANK / WORLD_SIZE / LOCAL_RANK and joins

NCCL on CUDA, gloo on CPU. Only rank 0 writes files; metric sums are all-reduced before logging.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def relaunch(nproc: int, cli_args: list[str]) -> int:
    """Run `fastkd <cli_args>` as `nproc` local ranks through torch.distributed.run; its exit code."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "-m", "fastkd.cli", *cli_args,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd)
    interrupted = False
    while True:
        try:
            code = proc.wait()
            return 130 if interrupted else code
        except KeyboardInterrupt:  # torchrun got the same Ctrl-C: its ranks save and exit; wait
            interrupted = True


def init(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (no-op for a single process)."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
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
