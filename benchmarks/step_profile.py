"""Where the trainer's step spends its GPU time: the top kernels and the time of each part.

    python benchmarks/step_profile.py --json profile.json             # GPU: 160 px x 256
    python benchmarks/step_profile.py --res 32 --batch 4 --steps 2    # CPU smoke run

Two profiles (torch.profiler, after warm-up steps, over --steps steps):
- parts: the step built from the default config but eager (compile.mode none), so that each
  part is a range of its own: the teacher's forward, the students' forward, the loss, the
  optimizer update; each part's device time is the sum of the kernels launched inside its
  range, per step, and the backward is the rest of the step's kernel time (autograd launches
  it from its own thread, outside any range of the step's).
- kernels: the trainer's default step itself (compile.mode auto: on one GPU the whole step in
  CUDA graphs, replayed), the top kernels by total device time per step, and the sum of all of
  them against the step's wall time: the share of the step the GPU is busy (near 100 %: the GPU
  is the limit; well below: the host is). --no-default skips it (it compiles, ~1.5 min).
Rows (benchmarks/common.py schema): name = part or kernel, case "<res>px b<batch>", value = ms
of device time per step, unit "ms".
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import step_throughput as st  # noqa: E402

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from fastkd.config import resolve_config  # noqa: E402
from fastkd.runtime import resolve_compile_mode  # noqa: E402
from fastkd.step import build_step  # noqa: E402

PARTS = ("teacher forward", "students forward", "loss", "backward", "optimizer")


def config(compile_mode: str | None):
    keys = {"model.teacher": st.TEACHER, "model.students": ",".join(st.STUDENTS)}
    if compile_mode:
        keys["compile.mode"] = compile_mode
    return resolve_config(None, keys)


@contextlib.contextmanager
def annotated(step):
    """The eager step's pieces wrapped in profiler ranges for the block (a compiled step is one
    graph: ranges would break it, so nothing stays patched after the block)."""
    import fastkd.step as step_module

    def ranged(name, fn):
        def call(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return call

    scale = step.scaler.scale

    class Scaled:  # `scaler.scale(loss).backward()` inside a range
        def __init__(self, loss):
            self.loss = loss

        def backward(self):
            with record_function("backward"):
                scale(self.loss).backward()

    saved = (step.teacher, step.model, step_module.distillation_loss, step.optimizer.step)
    step.teacher = ranged("teacher forward", step.teacher)
    step.model = ranged("students forward", step.model)
    step_module.distillation_loss = ranged("loss", step_module.distillation_loss)
    step.optimizer.step = ranged("optimizer", step.optimizer.step)
    step.scaler.scale = Scaled
    try:
        yield step
    finally:
        step.teacher, step.model, step_module.distillation_loss, step.optimizer.step = saved
        step.scaler.scale = scale


def kernels(prof) -> list:
    """The GPU kernels of a profile (not the CPU ops that launched them)."""
    return [e for e in prof.key_averages() if getattr(e, "device_type", None) == DeviceType.CUDA]


def device_ms(event) -> float:
    return getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / 1e3


def run_profile(step, x, y, steps: int, activities):
    for _ in range(3):
        step.meter.add(step(x, y), y.shape[0])
    common.synchronize(str(x.device))
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step.meter.add(step(x, y), y.shape[0])
        common.synchronize(str(x.device))
    return prof, (time.perf_counter() - t0) / steps


def run(args) -> dict[str, Any]:
    device = common.pick_device(args.device)
    on_gpu = device.startswith("cuda")
    res = args.res or (160 if on_gpu else 32)
    batch = args.batch or (256 if on_gpu else 4)
    case = f"{res}px b{batch}"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    torch.backends.cudnn.benchmark = True
    machine = common.machine_info(device)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 100, (batch,), generator=gen).to(device)

    def images(cfg):
        x = torch.randn(batch, 3, res, res, generator=gen).to(device, st.input_dtype(cfg, device))
        return x.contiguous(memory_format=torch.channels_last)

    cfg = config("none")
    torch.manual_seed(0)
    step = build_step(cfg, 100, torch.device(device), lr=1e-3)
    with annotated(step):
        prof, wall = run_profile(step, images(cfg), y, args.steps, activities)
    events = {e.key: e for e in prof.key_averages()}
    total = sum(device_ms(e) for e in kernels(prof)) / args.steps
    ranged = {p: device_ms(events[p]) / args.steps if p in events else 0.0 for p in PARTS}
    # autograd runs the backward's kernels from its own thread, outside the "backward" range:
    # what no forward/loss/optimizer range holds is the backward
    ranged["backward"] = total - sum(v for p, v in ranged.items() if p != "backward")
    for part in PARTS:
        e = events.get(part)
        ms = ranged[part] if on_gpu else None
        cpu_ms = e.cpu_time_total / 1e3 / args.steps if e is not None else None
        rows.append(common.row(part, case=case, unit="ms", value=ms, status="ok" if ms is not None else "skipped",
                               profile="parts (eager)", host_ms=cpu_ms, **({} if on_gpu else {"error": "no GPU"})))
    print(f"eager step: {wall * 1e3:.1f} ms wall, GPU busy {total:.1f} ms per step", flush=True)

    mode, _ = resolve_compile_mode("auto", torch.device(device))
    if args.no_default or not on_gpu:
        why = "--no-default" if args.no_default else "no GPU: the default step is eager here"
        rows.append(common.row("default step: kernels", case=case, unit="ms", status="skipped", error=why))
    else:
        cfg = config(None)
        torch.manual_seed(0)
        step = build_step(cfg, 100, torch.device(device), lr=1e-3)
        step.warm(batch, res, st.input_dtype(cfg, device), cfg.precision.channels_last)
        prof, wall = run_profile(step, images(cfg), y, args.steps, activities)
        graph_kernels = kernels(prof)
        busy = sum(device_ms(e) for e in graph_kernels) / args.steps
        rows.append(common.row("default step: GPU busy", case=case, unit="ms", value=busy, profile=f"kernels ({mode})",
                               wall_ms=wall * 1e3, busy_share=busy / (wall * 1e3)))
        for e in sorted(graph_kernels, key=device_ms, reverse=True)[: args.top]:
            rows.append(common.row(f"kernel: {e.key[:60]}", case=case, unit="ms", value=device_ms(e) / args.steps,
                                   profile=f"kernels ({mode})", calls=e.count // args.steps))
        print(f"default step ({mode}): {wall * 1e3:.1f} ms wall, GPU busy {busy:.1f} ms per step", flush=True)
    common.print_table(rows, [("name", "part / kernel"), ("value", "GPU ms"), ("host_ms", "host ms"),
                              ("status", "status")],
                       title=f"where the step's GPU time goes, {case}")
    params = dict(device=device, res=res, batch=batch, steps=args.steps, default_mode=mode)
    return common.write_result(args.json, "step_profile", rows, machine=machine, params=params)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--res", type=int, default=None, help="resolution (default 160 on GPU, 32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 256 on GPU, 4 on CPU)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--top", type=int, default=15, help="kernels listed")
    p.add_argument("--no-default", action="store_true", help="profile only the eager parts (no compile)")
    p.add_argument("--json", default=None)
    return p


main = common.cli_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
