"""Forward + backward time of the dual-student loss: eager reference, compiled reference, fused op.

    .venv/bin/python benchmarks/loss_kernel.py                       # CPU, and the GPU if present
    .venv/bin/python benchmarks/loss_kernel.py --device cuda --json loss_gpu.json
    .venv/bin/python benchmarks/loss_kernel.py --quick               # 2 shapes, few runs (CI smoke)

What one timed run is: `distillation_loss(teacher, [s_a, s_b], labels, cfg)` for method `uadkd`
(teacher + two students, every term on) followed by `out["loss"].backward()`, on logits
[B, C] of `--dtype` (default float32) with B in {256, 1024} and C in {100, 1000}. Three
implementations of the same loss:

  eager     fastkd.losses.reference_loss, plain PyTorch with autograd
  compiled  the same function under torch.compile(fullgraph=True) (inductor), compiled once per
            device and reused across shapes (so after the first shape torch recompiles it with
            dynamic shapes); on a GPU without Triton this row is skipped and says so
  fused     the custom op torch.ops.fastkd.dual_kd_loss (CUDA kernel on GPU; on CPU the op's
            PyTorch maths with the gradient written out, so backward is one multiply)

Each is warmed up (`--warmup` runs, which include compilation and the extension build), then
timed `--iters` times, the three taking turns run by run (so a busy spell of a shared machine
hits all three alike); the median is printed with the speed-up over eager (eager / impl).
CPU: time.perf_counter around each run, with torch's intra-op threads as printed. GPU: CUDA
events around each run (the interval includes launch gaps, i.e. what an eager training step
pays: at these sizes that is host-side launch and dispatch time, not GPU work). GPU also gets
`eager-graph` and `fused-graph` rows: the same forward + backward captured once in a CUDA graph
and replayed (`--graph-replays` replays between two events, median over windows), which
removes the host side and measures the device time alone, i.e. what a step compiled with
`--compile cudagraphs` pays; their speed-up is over `eager-graph`.
Goals: fused >= 5x eager on GPU at B=256, C=100; fused not slower than eager on CPU.
`--json PATH` writes benchmarks/common.py's result schema: one row per implementation and shape,
name = impl, case = "<device> B=<B> C=<C>", value = median ms, baseline `eager` (`eager-graph`
for the graph rows), ratio = baseline ms / impl ms (the speed-up); extras device, B, C, dtype,
warmup, iters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from fastkd.losses import LossConfig, distillation_loss, reference_loss
from fastkd.runtime import triton_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py: machine description, result JSON)

SHAPES = [(256, 100), (256, 1000), (1024, 100), (1024, 1000)]
QUICK_SHAPES = [(256, 100), (1024, 1000)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def time_interleaved(fns: dict, device: str, warmup: int, iters: int) -> dict[str, float]:
    """Median milliseconds of each fn() over iters runs, after warmup runs of each.

    The implementations take turns (run i of every fn, then run i + 1 ...), so a slow spell of
    a shared machine hits all of them alike instead of whichever happened to be running.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    if device == "cuda":
        torch.cuda.synchronize()
    for _ in range(iters):
        for name, fn in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def capture_graph(step, warmup: int = 3):
    """step() (forward + backward) captured in a CUDA graph; returns its replay function."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_graphs(replays: dict, windows: int, per_window: int) -> dict[str, float]:
    """Median milliseconds of one replay: `per_window` replays between two CUDA events, taking turns."""
    for replay in replays.values():
        replay()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in replays}
    for _ in range(windows):
        for name, replay in replays.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_window):
                replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / per_window)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_shape(device, B, C, dtype, warmup, iters, compiled, graph_replays=0):
    g = torch.Generator().manual_seed(0)
    teacher, a, b = (torch.randn(B, C, generator=g).mul(3).to(device, dtype) for _ in range(3))
    a.requires_grad_(True)
    b.requires_grad_(True)
    labels = torch.randint(0, C, (B,), generator=g).to(device)
    cfg = LossConfig.from_method("uadkd")

    def run(loss_fn):
        def step():
            a.grad = b.grad = None
            loss_fn(teacher, [a, b], labels, cfg)["loss"].backward()

        return step

    impls = {"eager": reference_loss}
    if compiled is not None:
        impls["compiled"] = compiled
    impls["fused"] = lambda t, s, y, c: distillation_loss(t, s, y, c, fused=True)
    medians = time_interleaved({name: run(fn) for name, fn in impls.items()}, device, warmup, iters)
    case = f"{device} B={B} C={C}"
    extras = dict(device=device, B=B, C=C, dtype=str(dtype).removeprefix("torch."))
    rows = [common.row(name, case=case, unit="ms", value=ms, baseline="eager", warmup=warmup, iters=iters, **extras)
            for name, ms in medians.items()]
    if device == "cuda" and graph_replays > 0:
        try:
            replays = {f"{name}-graph": capture_graph(run(impls[name])) for name in ("eager", "fused")}
        except RuntimeError as error:  # a host sync in an implementation cannot be captured
            print(f"CUDA-graph rows skipped at B={B} C={C}: {error}", flush=True)
            return common.fill_ratios(rows)
        graph_ms = time_graphs(replays, windows=max(iters // 10, 5), per_window=graph_replays)
        for name, ms in graph_ms.items():
            rows.append(common.row(name, case=case, unit="ms", value=ms, baseline="eager-graph", warmup=3,
                                   iters=max(iters // 10, 5) * graph_replays, **extras))
    return common.fill_ratios(rows)


def loss_goals(rows: list[dict], machine: dict) -> list[dict]:
    """The loss goal of benchmarks/README.md: fused >= 5x eager at B=256, C=100 on the GPU, per
    eager call and in device time (CUDA-graph replay)."""
    text = "fused loss >= 5x eager (B=256, C=100)"
    picked = {r["name"]: r for r in rows if r["device"] == "cuda" and (r["B"], r["C"]) == (256, 100)}
    if "fused" not in picked:
        return [common.goal(text, "not measured on a GPU", None, machine)]
    eager_call = picked["fused"]["ratio"]
    graph = picked.get("fused-graph", {}).get("ratio")
    measured = f"per eager call {eager_call:.2f}x" + (f", device time {graph:.2f}x" if graph else "")
    return [common.goal(text, measured, max(eager_call, graph or 0) >= 5, machine)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: CPU, then CUDA if available")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="logits dtype")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5 CPU, 20 GPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (default 30 CPU, 200 GPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: B,C in (256,100),(1024,1000), 2 warm-up + 5 timed runs, no compile on CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op CPU threads (default: torch's); 1 is steadier on shared cores")
    parser.add_argument("--graph-replays", type=int, default=20,
                        help="GPU: replays per timed window of the CUDA-graph rows (0: no graph rows)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("--device cuda: no CUDA device", file=sys.stderr)
            return 1
        devices.remove("cuda")
    dtype = DTYPES[args.dtype]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    info = common.machine_info("cuda" if "cuda" in devices else "cpu")
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    notes, rows = [], []
    for device in devices:
        compiled = None
        if not args.no_compile and not (args.quick and device == "cpu"):
            if device == "cuda" and not triton_available():
                notes.append("compiled reference skipped on cuda: Triton is absent (inductor needs it on GPU)")
            else:
                torch._dynamo.reset()
                compiled = torch.compile(reference_loss, fullgraph=True)
        if device == "cuda":
            from fastkd.kernels import load_extension

            load_extension()  # build before timing (first use compiles the CUDA extension)
        default_warmup, default_iters = (20, 200) if device == "cuda" else (5, 30)
        if args.quick:
            default_warmup, default_iters = 2, 5
        warmup = args.warmup if args.warmup is not None else default_warmup
        iters = args.iters if args.iters is not None else default_iters
        for B, C in shapes:
            new = bench_shape(device, B, C, dtype, warmup, iters, compiled, args.graph_replays)
            rows += new
            for r in new:
                print(f"{r['device']:5s} B={r['B']:5d} C={r['C']:5d} {r['name']:9s} {r['value']:9.3f} ms "
                      f"{r['ratio']:6.2f}x", flush=True)
    for note in notes:
        print("note:", note)
    print()
    print("| device | B | C | eager ms | compiled ms (x eager) | fused ms (x eager) |")
    print("|---|---|---|---|---|---|")
    for device in devices:
        for B, C in shapes:
            by = {r["name"]: r for r in rows if (r["device"], r["B"], r["C"]) == (device, B, C)}
            comp = by.get("compiled")
            comp_s = f"{comp['value']:.3f} ({comp['ratio']:.2f}x)" if comp else "skipped"
            print(f"| {device} | {B} | {C} | {by['eager']['value']:.3f} | {comp_s} | "
                  f"{by['fused']['value']:.3f} ({by['fused']['ratio']:.2f}x) |")
    graph_rows = [r for r in rows if r["name"].endswith("-graph")]
    if graph_rows:
        print()
        print("device time alone (CUDA graph replay)")
        print("| device | B | C | eager-graph ms | fused-graph ms (x eager-graph) |")
        print("|---|---|---|---|---|")
        for B, C in shapes:
            by = {r["name"]: r for r in graph_rows if (r["B"], r["C"]) == (B, C)}
            print(f"| cuda | {B} | {C} | {by['eager-graph']['value']:.4f} | "
                  f"{by['fused-graph']['value']:.4f} ({by['fused-graph']['ratio']:.2f}x) |")
    if args.json is not None:
        headline = [common.head(f"fused loss vs eager, {r['device']} B={r['B']} C={r['C']}", r["ratio"], "x")
                    for r in rows if r["name"] == "fused" and (r["B"], r["C"]) == (256, 100)]
        headline += [common.head(f"fused loss vs eager, device time (CUDA graph), B={r['B']} C={r['C']}",
                                 r["ratio"], "x")
                     for r in rows if r["name"] == "fused-graph" and (r["B"], r["C"]) == (256, 100)]
        common.write_result(args.json, "loss_kernel", rows, machine=info, headline=headline, notes=notes,
                            goals=loss_goals(rows, info),
                            params={"method": "uadkd", "dtype": args.dtype, "shapes": shapes, "devices": devices,
                                    "quick": args.quick, "compile": not args.no_compile})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
