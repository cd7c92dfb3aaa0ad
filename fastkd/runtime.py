"""Process-wide run-time choices of a training run: device, precision, compilation, seeding.

    device = resolve_device("cuda:2", local_rank=1)   # -> cuda:3 (each rank its own GPU)
    dtype = amp_dtype("auto", device)                 # bf16 on CUDA, None (fp32) on CPU
    name = amp_mode("auto", device)                   # its name: "bf16" on CUDA, "fp32" on CPU
    mode, note = resolve_compile_mode("auto", device) # reduce-overhead on CUDA, none on CPU
    net = compile_fn(net, "cudagraphs")               # Triton-free torch.compile
    seed_all(0); set_determinism(True)
    torch.manual_seed(step_seed(seed, rank, epoch, step))   # the step's dropout masks

Kept apart from the trainer so the benchmarks and `fastkd eval` make the same choices.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from typing import Literal

import numpy as np
import torch

from fastkd.distributed import local_device_index
from fastkd.errors import FastKDError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
AMP_MODES = ("auto", *AMP_DTYPES)  # precision.amp: auto = bf16 on CUDA, fp32 on CPU (amp_dtype)
COMPILE_MODES = ("auto", "none", "inductor", "reduce-overhead", "cudagraphs")
# for typed configs (PrecisionConfig.amp, CompileConfig.mode): the config's help and checks read them
AmpMode = Literal[AMP_MODES]
CompileMode = Literal[COMPILE_MODES]
# torch.compile arguments of each compile.mode. dynamic=False: one static graph per input shape
# (each resolution of a progressive-resizing run), which is what CUDA graphs and inductor's
# shape-specialised kernels need; the number of graphs is bounded by `allow_graphs`.
COMPILE_ARGS = {
    "inductor": {"dynamic": False},
    "reduce-overhead": {"dynamic": False, "mode": "reduce-overhead"},  # inductor + CUDA graph trees
    "cudagraphs": {"dynamic": False, "backend": "cudagraphs"},  # CUDA graphs of the FX graph, no Triton
}
CUDA_ONLY_MODES = ("reduce-overhead", "cudagraphs")


def resolve_device(name: str, local_rank: int = 0, flag: str = "--run.device") -> torch.device:
    """The device of the rank with LOCAL_RANK `local_rank`.

    auto -> cuda when available, else cpu. `cuda` -> cuda:<local_rank>. `cuda:N` -> cuda:<N +
    local_rank>: N is the first GPU of this node's ranks, so 8 ranks with cuda:0 use GPUs 0..7
    and 2 ranks with cuda:2 use GPUs 2 and 3 (never every rank on one GPU). `flag` is how the
    user spelled the setting, for the error messages.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FastKDError(f"{flag} {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise FastKDError(f"{flag} {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise FastKDError(f"{flag} {name}: CUDA is not available here; use {flag} cpu")
    index = local_device_index(local_rank, device.index)
    count = torch.cuda.device_count()
    if index >= count:
        first = device.index or 0
        raise FastKDError(
            f"{flag} {name}: local rank {local_rank} would use cuda:{index}, but this node has {count} "
            f"GPU(s) (cuda:0..cuda:{count - 1}); with cuda:{first} at most {count - first} ranks fit"
        )
    return torch.device("cuda", index)


def base_index(name: str) -> int | None:
    """N of a `cuda:N` device setting (the first GPU of this node's ranks), else None."""
    return torch.device(name).index if name.startswith("cuda:") else None


def amp_mode(amp: str, device: torch.device) -> str:
    """The AMP_DTYPES key `precision.amp` means on `device`: auto is bf16 on CUDA, fp32 elsewhere
    (CPU autocast to bf16 is slower than fp32 on most hosts)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return amp


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision.amp` on `device` (None: no autocast, fp32)."""
    return AMP_DTYPES[amp_mode(amp, device)]


def input_dtype(amp: str, device: torch.device) -> torch.dtype:
    """dtype of the images a loader hands the step: the autocast dtype on CUDA (half the bytes
    to move and normalise), float32 on CPU (CPU autocast casts per operator)."""
    if device.type != "cuda":
        return torch.float32
    return amp_dtype(amp, device) or torch.float32


def triton_available() -> bool:
    """Whether inductor can generate GPU kernels here (Triton imports)."""
    try:
        import triton  # noqa: F401

        return True
    except Exception:  # not installed, or a broken install: either way inductor cannot use it
        return False


def resolve_compile_mode(mode: str, device: torch.device, ddp: bool = False) -> tuple[str, str | None]:
    """(the compile.mode a run uses, a one-line note saying why when `auto` did not pick the
    fastest step, else None). An explicit mode is kept as given (refused on CPU elsewhere when
    it needs CUDA). `auto`:
    - CPU (or any device but CUDA): none. Compiling costs more than it saves on a CPU step.
    - CUDA: the whole step with CUDA graphs, reduce-overhead (inductor + CUDA graph trees), or
      cudagraphs where Triton does not import. On an H200 this ran the three-network step at
      2.1x the eager step: the eager step is bound by its ~55 ms of Python and kernel launches,
      and only graphs remove them (inductor without graphs gained 4 %).
    - CUDA with DDP (several ranks): none, with a note. The graph step has not been verified
      under DDP's gradient hooks (torch.compile splits the graph at DDP's buckets, and CUDA
      graphs with DDP have open upstream failures); `--compile reduce-overhead` opts in."""
    if mode != "auto":
        return mode, None
    if device.type != "cuda":
        return "none", None
    if ddp:
        return "none", ("compile auto: eager step under DDP (CUDA graphs of the step are not verified with "
                        "several ranks); --compile reduce-overhead opts in")
    if triton_available():
        return "reduce-overhead", None
    return "cudagraphs", "compile auto: Triton does not import, so CUDA graphs without inductor (cudagraphs)"


def compile_fn(fn, mode: str):
    """`fn` (a module or a function) itself (mode none), or its torch.compile wrapper with the
    arguments of COMPILE_ARGS[mode]."""
    if mode == "none":
        return fn
    if mode == "auto":
        raise ValueError("compile.mode auto must be resolved first (resolve_compile_mode)")
    if mode not in COMPILE_ARGS:
        raise FastKDError(f"compile.mode {mode!r}: use {', '.join(COMPILE_MODES)}")
    return torch.compile(fn, **COMPILE_ARGS[mode])


def allow_graphs(count: int) -> None:
    """Let torch.compile keep `count` graphs per compiled function (one per resolution and step
    variant) before it gives up and runs the function eagerly, which it does silently at its
    default limit of 8: a 96 -> 256 px ramp in steps of 16 has 11 resolutions. Only raises the
    limit, never lowers it."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and the one torch 2.x had
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < count:
            setattr(dynamo_config, name, count)


def seed_all(seed: int) -> None:
    """Python, NumPy and torch (CPU and every CUDA device) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, epoch: int, step_in_epoch: int) -> int:
    """Seed of the global torch generator for one training step (dropout masks, stochastic
    depth): a pure function of the run seed, the rank and the step's position, so a run resumed
    mid-epoch draws exactly the masks the uninterrupted run would have drawn, whatever else
    (loader threads, evaluation, compilation) used the generator in between."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), int(epoch), int(step_in_epoch)])
    return int(state.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def set_determinism(on: bool) -> None:
    """Process-wide switches, set both ways so a later run in the same process is not affected."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on


@contextlib.contextmanager
def stop_signals(on_signal):
    """SIGINT and SIGTERM call `on_signal(signum)` inside the block instead of ending the process
    (main thread only; elsewhere nothing changes); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, frame: on_signal(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
