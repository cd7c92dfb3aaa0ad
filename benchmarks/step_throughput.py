"""Throughput of fastkd's training step (the trainer's own, `fastkd.step.build_step`) on synthetic data.

    # GPU (budgeted at about 3 minutes on an H100/H200, compiles included):
    python benchmarks/step_throughput.py --json step.json
    python benchmarks/step_throughput.py --max-seconds 200 --json step.json   # hard cap on new work
    # CPU smoke run (tiny shapes; the compiled variant through the Triton-free cudagraphs mode,
    # which on CPU is dynamo + AOT autograd without CUDA graphs, about 40 s to compile):
    python benchmarks/step_throughput.py --res 32 --batch 4 --steps 1 --windows 2 --warmup 1 \
        --variants fp32_nchw,bf16_cl,bf16_cl_fused,bf16_cl_compiled --compile-mode cudagraphs

What one timed step is: exactly what `fastkd train` runs each iteration, built from a config by
`fastkd.step.build_step`: `parts = step(images, labels)` then `step.meter.add(parts, B)`, i.e.
teacher ResNet-50 forward (eval mode, inference_mode, logits cast to fp32), students ResNet-18
and MobileNetV2 forward (train mode, autocast) and backward, the uncertainty-aware dual-student
loss (`fastkd.losses.distillation_loss`, method uadkd, T=4, 100 classes) on fp32 logits, one SGD
step (momentum 0.9, Nesterov, weight decay on conv/linear weights only) through the GradScaler
(enabled for fp16 only), the per-student correct counts and the meter's device-side sums. No
host sync inside (the trainer syncs every run.log_every steps, in meter.read; here once after
the windows, whose loss is recorded as a sanity figure). Images and labels are made once on
the device (random normal / random labels; images in the dtype the trainer's loader gives:
the autocast dtype on CUDA, fp32 on CPU), so nothing here waits for data: this is the compute
ceiling that e2e_throughput.py compares the loaders against.

Variants, each a set of config keys (see VARIANTS), measured in the same run at every
resolution x batch size:

    fp32_nchw               precision.amp fp32, channels_last false, loss.fused false,
                            compile.mode none: the baseline a user writes
    bf16_cl                 bf16 autocast, channels_last, eager, reference loss
    bf16_cl_fused           + the fused loss op torch.ops.fastkd.dual_kd_loss (loss.fused true)
    bf16_cl_compiled        bf16, channels_last, reference loss, compile.mode (below): with
                            bf16_cl_fused_compiled, the fused op's share of a compiled step
    bf16_cl_fused_compiled  + compile.mode: inductor where it can run (Triton importable, or on
                            CPU), else cudagraphs (--compile-mode overrides), compile.scope step:
                            teacher + students + loss as one graph (the trainer's default)
    bf16_cl_fused_compiled_nets  the same with compile.scope networks (each network compiled
                            alone, the loss eager between them): what whole-step compiling adds
    bf16_cl_fused_graphs    the whole step compiled with CUDA graphs: compile.mode reduce-overhead
                            where Triton imports, else cudagraphs (skipped without CUDA), the
                            teacher as it is (BN not folded, fp32 weights)
    default                 what `fastkd train` runs with no flags (every key at its default:
                            compile.mode auto = the step in CUDA graphs on one GPU, eager on CPU;
                            bf16 channels_last, fused loss, teacher BN folded, bf16 weights)
    default_unfolded        the default step with model.fold_teacher_bn false: what folding buys
Compiled variants run at --compile-shapes only (a compile costs about a minute per shape on a
GPU) and are recorded as skipped elsewhere. Their compile time (`TrainStep.warm`, as the
trainer does before its first step, then one step) is the row's compile_s, never in img/s.

Library defaults are left as a user finds them (cuDNN's TF32 for fp32 convolutions is on by
default in PyTorch, so the fp32 baseline already uses TF32 convolutions); cudnn.benchmark is on
for every variant. What is timed: `--windows` windows of `--steps` steps each, after `--warmup`
untimed steps (and, for compiled variants, after the warm and the first step, whose time, the
compile, is reported apart); CUDA events bracket each window, no host sync inside; images/s is taken from
the median window. FLOPs per step are counted once per shape (every variant does the same maths)
with torch.utils.flop_counter.FlopCounterMode on each network's forward (step.teacher,
step.students.nets): teacher forward + 3 x each student's forward (forward + backward), since
FlopCounterMode over-counts depthwise-convolution backward (see count_flops); achieved TFLOP/s =
FLOPs per step / median step time. Rows follow benchmarks/common.py's schema: name = variant,
case = "<res>px b<batch>", value = images/s, baseline fp32_nchw in the same case, ratio = value
over the baseline's. `spread` is (max-min)/median over the windows: a ratio difference smaller
than it is noise.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

from fastkd.config import TrainConfig, resolve_config  # noqa: E402
from fastkd.runtime import input_dtype as runtime_input_dtype  # noqa: E402
from fastkd.runtime import COMPILE_MODES, resolve_compile_mode, triton_available  # noqa: E402
from fastkd.step import TrainStep, build_step  # noqa: E402

# Config keys of each variant; "compile.mode": "auto" is resolved by compile_mode().
_EAGER = {"compile.mode": "none"}
_BF16_CL = {"precision.amp": "bf16", "precision.channels_last": "true"}
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32_nchw": dict(label="fp32 NCHW eager, reference loss",
                      config={"precision.amp": "fp32", "precision.channels_last": "false",
                              "loss.fused": "false", **_EAGER}),
    "bf16_cl": dict(label="bf16 channels_last eager, reference loss",
                    config={**_BF16_CL, "loss.fused": "false", **_EAGER}),
    "bf16_cl_fused": dict(label="bf16 channels_last eager, fused loss",
                          config={**_BF16_CL, "loss.fused": "true", **_EAGER}),
    "bf16_cl_compiled": dict(label="bf16 channels_last compiled, reference loss",
                             config={**_BF16_CL, "loss.fused": "false", "compile.mode": "auto"}),
    "bf16_cl_fused_compiled": dict(label="bf16 channels_last compiled, fused loss",
                                   config={**_BF16_CL, "loss.fused": "true", "compile.mode": "auto"}),
    "bf16_cl_fused_compiled_nets": dict(label="bf16 channels_last, each network compiled alone, fused loss",
                                        config={**_BF16_CL, "loss.fused": "true", "compile.mode": "auto",
                                                "compile.scope": "networks"}),
    "bf16_cl_fused_graphs": dict(label="bf16 channels_last compiled + CUDA graphs, fused loss",
                                 config={**_BF16_CL, "loss.fused": "true", "compile.mode": "auto-graphs",
                                         "model.fold_teacher_bn": "false"}),
    # what `fastkd train` runs with no flags: every key at its default (compile.mode auto, resolved
    # by fastkd.runtime: the whole step in CUDA graphs on one GPU; the teacher BN-folded in bf16)
    "default": dict(label="the trainer's default step", config={}),
    "default_unfolded": dict(label="the default step, teacher BatchNorm not folded",
                             config={"model.fold_teacher_bn": "false"}),
}
BASELINE = "fp32_nchw"
TEACHER, STUDENTS = "resnet50", ("resnet18", "mobilenet_v2")


def compile_mode(requested: str, device: str, graphs: bool = False) -> str:
    """compile.mode of the compiled variants: `requested` unless auto; auto = inductor on CPU (a
    C++ compiler, no Triton) or where Triton imports, else the Triton-free cudagraphs. graphs=True
    (the CUDA-graph variant): reduce-overhead where Triton imports, else cudagraphs."""
    if requested != "auto":
        return requested
    if graphs:
        return "reduce-overhead" if triton_available() else "cudagraphs"
    if not device.startswith("cuda"):
        return "inductor"
    return "inductor" if triton_available() else "cudagraphs"


def variant_config(name: str, *, mode: str, temperature: float, method: str = "uadkd",
                   graphs_mode: str = "cudagraphs") -> TrainConfig:
    """The TrainConfig of variant `name` (the trainer's own config type, validated as `fastkd
    train` validates it)."""
    keys = dict(VARIANTS[name]["config"])
    if keys.get("compile.mode") == "auto":
        keys["compile.mode"] = mode
    elif keys.get("compile.mode") == "auto-graphs":
        keys["compile.mode"] = graphs_mode
    keys.update({"model.teacher": TEACHER, "model.students": ",".join(STUDENTS), "loss.method": method,
                 "loss.temperature": str(temperature)})
    return resolve_config(None, keys)


def loss_impl(cfg: TrainConfig, device: str) -> str:
    """What `distillation_loss` runs in this step, for the row: the reference, or the fused op's
    CUDA kernel / CPU implementation / PyTorch-maths fallback (CUDA extension not built)."""
    if not cfg.loss.fused:
        return "fastkd.losses reference (loss.fused false)"
    desc = "fastkd.losses fused op torch.ops.fastkd.dual_kd_loss"
    if not device.startswith("cuda"):
        return desc + " (CPU implementation)"
    try:
        from fastkd.kernels import load_extension

        load_extension()
        return desc + " (CUDA kernel)"
    except Exception as error:  # the op then runs its PyTorch maths: say so in the result
        return desc + f" (CUDA extension unavailable, PyTorch-maths fallback: {str(error)[:120]})"


def input_dtype(cfg: TrainConfig, device: str) -> torch.dtype:
    """The dtype the trainer's loader hands the step (fastkd.runtime.input_dtype)."""
    return runtime_input_dtype(cfg.precision.amp, torch.device(device))


def timed_step(step: TrainStep, x: torch.Tensor, y: torch.Tensor):
    """One trainer iteration, as fastkd/train.py runs it: the step, then the meter."""
    batch = int(y.shape[0])

    def run() -> None:
        parts = step(x, y)
        step.meter.add(parts, batch)

    return run


def count_flops(step: TrainStep, x: torch.Tensor) -> dict[str, int]:
    """FLOPs of one step: FlopCounterMode on each network's forward (the plain modules, not their
    compiled wrappers); students x 3 (forward + backward = grad input + grad weight, each about one
    forward).

    Not FlopCounterMode around the whole step: its convolution_backward formula ignores groups
    and over-counts MobileNetV2's depthwise backward about 20x (seen with torch 2.14: a 64-group
    3x3 conv counted 469.6 MFLOP backward for a 7.2 MFLOP forward), which would inflate TFLOP/s
    by half. For the ResNets both ways agree within 1 %. The loss and optimizer are negligible.
    """
    from torch.utils.flop_counter import FlopCounterMode

    teacher = getattr(step.teacher, "_orig_mod", step.teacher)  # torch.compile wrapper -> module
    nets = ([("teacher", teacher)] if teacher is not None else []) + \
        [(f"student{i}", n) for i, n in enumerate(step.students.nets)]
    counts = {}
    for name, net in nets:
        was_training = net.training
        net.eval()  # batch statistics do not change the count; eval keeps running stats intact
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(x)
        net.train(was_training)
        counts[name] = int(counter.get_total_flops())
    counts["step"] = counts.get("teacher", 0) + 3 * sum(v for k, v in counts.items() if k.startswith("student"))
    return counts


# ----------------------------------------------------------------------------- driver


def parse_shapes(text: str) -> set[tuple[int, int]]:
    shapes = set()
    for item in text.replace(",", " ").split():
        res, _, batch = item.partition("x")
        shapes.add((int(res), int(batch)))
    return shapes


def run(args) -> dict[str, Any]:
    device = common.pick_device(args.device)
    on_gpu = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    res_list = common.parse_int_list(args.res or ("160 192 224" if on_gpu else "64"))
    batch_list = common.parse_int_list(args.batch or ("128 256" if on_gpu else "8"))
    compile_shapes = parse_shapes(args.compile_shapes or f"{res_list[0]}x{batch_list[-1]}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    mode = compile_mode(args.compile_mode, device)
    graphs_mode = compile_mode(args.compile_mode, device, graphs=True)
    configs = {v: variant_config(v, mode=mode, temperature=args.temperature, graphs_mode=graphs_mode)
               for v in variants}
    machine = common.machine_info(device)
    print(f"step_throughput: {machine.get('gpu') or machine['cpu']} | torch {machine['torch']} | "
          f"device {device} | res {res_list} | batch {batch_list} | variants {variants} | "
          f"compile.mode {mode} at {sorted(compile_shapes)}", flush=True)

    steps: dict[str, TrainStep] = {}  # one trainer step per variant, reused across shapes
    rows: list[dict[str, Any]] = []
    flops_cache: dict[tuple, dict[str, int]] = {}
    t_start = time.perf_counter()
    run_info = dict(args=args, machine=machine, device=device, mode=mode, variants=variants,
                    res_list=res_list, batch_list=batch_list, compile_shapes=compile_shapes,
                    configs=configs, t_start=t_start)

    for res in res_list:
        for batch in batch_list:
            gen = torch.Generator(device="cpu").manual_seed(res * 1000 + batch)
            x32 = torch.randn(batch, 3, res, res, generator=gen)
            y = torch.randint(0, args.num_classes, (batch,), generator=gen).to(device)
            case = f"{res}px b{batch}"
            for name in variants:
                cfg = configs[name]
                ran_mode, _ = resolve_compile_mode(cfg.compile.mode, torch.device(device))
                extras = dict(label=VARIANTS[name]["label"], res=res, batch=batch,
                              config=dict(VARIANTS[name]["config"], **{"compile.mode": ran_mode}),
                              loss_impl=loss_impl(cfg, device))
                compiled = ran_mode != "none"

                def record(status: str, error: str = "", **more) -> None:
                    rows.append(common.row(name, case=case, unit="img/s", status=status, baseline=BASELINE,
                                           **extras, **({"error": error} if error else {}), **more))

                if compiled and (res, batch) not in compile_shapes:
                    record("skipped", "compiled only at --compile-shapes (a compile per shape)")
                    continue
                if VARIANTS[name]["config"].get("compile.mode") == "auto-graphs" and not on_gpu:
                    record("skipped", "CUDA graphs need a CUDA device")
                    continue
                if args.max_seconds and time.perf_counter() - t_start > args.max_seconds:
                    record("skipped", f"--max-seconds {args.max_seconds:g} reached")
                    continue
                step = None
                try:
                    if name not in steps:
                        torch.manual_seed(args.seed)  # same initial weights in every variant
                        steps[name] = build_step(cfg, args.num_classes, torch.device(device), lr=args.lr)
                    step = steps[name]
                    x = x32.to(device, input_dtype(cfg, device))
                    if cfg.precision.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    if on_gpu:
                        torch.cuda.reset_peak_memory_stats(device)
                    if (res, batch) not in flops_cache:  # same maths in every variant: count once
                        flops_cache[(res, batch)] = count_flops(step, x32.to(device))
                    flops = flops_cache[(res, batch)]["step"]
                    fn = timed_step(step, x, y)
                    more: dict[str, Any] = {}
                    if compiled:  # the trainer's warm (scope step), then a first step: compile time, apart
                        common.synchronize(device)
                        t0 = time.perf_counter()
                        step.warm(batch, res, x.dtype, cfg.precision.channels_last)
                        fn()
                        common.synchronize(device)
                        more["compile_s"] = round(time.perf_counter() - t0, 1)
                    step.meter.read()  # reset the sums: the window's loss below is the timed steps'
                    windows = common.time_windows(fn, device, warmup=args.warmup, windows=args.windows,
                                                  steps=args.steps)
                    window = step.meter.read()  # the trainer's one host sync, after the timing
                except torch.cuda.OutOfMemoryError:
                    record("oom", "CUDA out of memory")
                    print(f"  {name:24s} {case}: out of memory", flush=True)
                    steps.pop(name, None)
                    del step
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                except Exception as error:  # a variant that cannot run here is recorded, the rest go on
                    message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    record("failed", message)
                    print(f"  {name:24s} {case}: failed: {message}", flush=True)
                    steps.pop(name, None)
                    continue
                step_s = common.median(windows) / args.steps
                more.update(
                    value=batch / step_s,
                    step_ms=step_s * 1e3,
                    gflop_per_image=flops / batch / 1e9,
                    tflops=flops / step_s / 1e12,
                    spread=common.spread(windows),
                    windows_s=[round(w, 6) for w in windows],
                    loss=window["loss"],
                )
                if on_gpu:
                    more["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                record("ok", **more)
                r = rows[-1]
                print(f"  {name:24s} {case}: {r['value']:10,.1f} img/s  {r['tflops']:7.2f} TFLOP/s  "
                      f"spread {r['spread']:.2f}" + (f"  (compile {r['compile_s']} s)" if "compile_s" in r else ""),
                      flush=True)
            del x32, y
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            finish(rows, run_info, final=False)
    return finish(rows, run_info, final=True)


def goals(rows: list[dict[str, Any]], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """The step goals of benchmarks/README.md against this run's rows at 160 px (each goal is
    listed, measured or not)."""
    fast = [r for r in rows if r["status"] == "ok" and r["res"] == 160 and r["name"] != BASELINE]
    out = []
    text = "step >= 6,000 img/s at 160 px, bf16 channels_last"
    text_4x = "step >= 4x the fp32 NCHW eager baseline, same run"
    if not fast:
        out += [common.goal(text, "not measured at 160 px", None, machine),
                common.goal(text_4x, "not measured at 160 px", None, machine)]
    else:
        batch = max(r["batch"] for r in fast)
        best = max((r for r in fast if r["batch"] == batch), key=lambda r: r["value"])
        out.append(common.goal(text, f"{best['value']:,.0f} img/s ({best['name']}, b{batch})", best["value"] >= 6000,
                               machine))
        if best["ratio"] is None:
            out.append(common.goal(text_4x, "no fp32_nchw row at that shape", None, machine))
        else:
            out.append(common.goal(text_4x, f"{best['ratio']:.2f}x ({best['name']}, b{batch})", best["ratio"] >= 4,
                                   machine))
    # the trainer's default step at 160 px, batch 256, on one H100/H200
    default = [r for r in fast if r["batch"] == 256 and r["name"] == "default"]
    for floor, text in ((12000, "default step >= 12,000 img/s at 160 px b256"),
                        (15000, "stretch: default step >= 15,000 img/s at 160 px b256")):
        if not default:
            out.append(common.goal(text, "default step not measured at 160 px b256", None, machine))
            continue
        top = default[0]
        out.append(common.goal(text, f"{top['value']:,.0f} img/s", top["value"] >= floor, machine))
    return out


def finish(rows: list[dict[str, Any]], info: dict[str, Any], final: bool) -> dict[str, Any]:
    """Ratios, headline, goals and notes from the rows so far; writes the JSON (also after each
    shape, so a run stopped by a timeout still leaves what it measured). Prints the table when final."""
    args, machine = info["args"], info["machine"]
    common.fill_ratios(rows)
    # Headline: each variant at the smallest resolution and largest batch (the goal shape).
    goal_case = f"{min(info['res_list'])}px b{max(info['batch_list'])}"
    headline = [common.head(f"step {r['name']} {goal_case}", r["value"], "img/s", r["ratio"])
                for r in rows if r["status"] == "ok" and r["case"] == goal_case]
    impls = {r["name"]: r["loss_impl"] for r in rows}
    notes = ["loss: " + "; ".join(f"{k}: {v}" for k, v in impls.items()),
             f"total wall time {time.perf_counter() - info['t_start']:.0f} s"
             + ("" if final else " (partial: run still going)")]
    if final:
        columns = [("name", "variant"), ("case", "shape"), ("value", "img/s"), ("step_ms", "ms/step"),
                   ("tflops", "TFLOP/s"), ("ratio", "x fp32"), ("spread", "spread"), ("compile_s", "compile s"),
                   ("status", "status")]
        common.print_table(rows, columns, title=f"trainer step (fastkd.step), {machine.get('gpu') or machine['cpu']}")
        for n in notes:
            print(n)
    params = dict(device=info["device"], res=info["res_list"], batch=info["batch_list"], variants=info["variants"],
                  compile_mode=info["mode"], compile_shapes=sorted(info["compile_shapes"]),
                  steps=args.steps, windows=args.windows, warmup=args.warmup, num_classes=args.num_classes,
                  teacher=TEACHER, students=list(STUDENTS), method="uadkd", temperature=args.temperature,
                  lr=args.lr, max_seconds=args.max_seconds, complete=final)
    return common.write_result(args.json, "step_throughput", rows, machine=machine, params=params,
                               headline=headline, goals=goals(rows, machine), notes=notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--res", default=None, help="resolutions (default: 160,192,224 on GPU; 64 on CPU)")
    p.add_argument("--batch", default=None, help="batch sizes (default: 128,256 on GPU; 8 on CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--compile-shapes", default=None,
                   help="RESxBATCH list where the compiled variants run (default: first res x last batch)")
    # every compile.mode but none: the eager variants are the uncompiled rows
    p.add_argument("--compile-mode", default="auto", choices=[m for m in COMPILE_MODES if m != "none"],
                   help="compile.mode of the compiled variants (auto: inductor where it runs, else cudagraphs)")
    p.add_argument("--steps", type=int, default=4, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the windows")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=1e-3, help="small: synthetic data, keep weights finite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="start no new measurement after this many seconds (0: no limit); the rest is "
                        "recorded as skipped")
    p.add_argument("--json", default=None, help="write the result JSON here (also after each shape)")
    return p


main = common.cli_main(build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
