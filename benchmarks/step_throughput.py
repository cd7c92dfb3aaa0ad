"""Throughput of fastkd's three-network training step on synthetic data already on the device.

    # GPU (budgeted at about 2.5 minutes on an H100, compile included; not yet run on one):
    python benchmarks/step_throughput.py --json step.json
    python benchmarks/step_throughput.py --max-seconds 200 --json step.json   # hard cap on new work
    # CPU smoke run (tiny shapes, no compile):
    python benchmarks/step_throughput.py --res 32 --batch 4 --steps 1 --windows 2 --warmup 1 \
        --variants fp32_nchw,bf16_cl,bf16_cl_fused

What one step is: teacher ResNet-50 forward (eval mode, under torch.inference_mode), students
ResNet-18 and MobileNetV2 forward + backward (train mode), the uncertainty-aware dual-student
loss (`fastkd.losses.distillation_loss`, method uadkd, T=4, 100 classes), one SGD step
(momentum 0.9, Nesterov) over both students. Images and labels are made once on the device
(random normal / random labels), so nothing here waits for data: this is the compute ceiling
that e2e_throughput.py compares the loaders against.

Variants, each measured in the same run at every resolution x batch size:

    fp32_nchw               fp32, NCHW, eager, reference loss: the baseline a user writes
    bf16_cl                 bf16 autocast, channels_last, eager, reference loss
    bf16_cl_fused           + the fused loss op torch.ops.fastkd.dual_kd_loss (fused=True)
    bf16_cl_fused_compiled  + torch.compile of the three networks (inductor when Triton is
                            importable or on CPU, else backend="cudagraphs"), at --compile-shapes
                            only (compiling costs about a minute per shape on a GPU)

Library defaults are left as a user finds them (cuDNN's TF32 for fp32 convolutions is on by
default in PyTorch, so the fp32 baseline already uses TF32 convolutions); cudnn.benchmark is on
for every variant. What is timed: `--windows` windows of `--steps` steps each, after `--warmup`
untimed steps (and, for the compiled variant, after compilation, whose time is reported apart);
CUDA events bracket each window, no host sync inside; images/s is taken from the median window.
FLOPs per step are counted once per shape (every variant does the same maths) with
torch.utils.flop_counter.FlopCounterMode on each network's forward: teacher forward + 3 x each
student's forward (forward + backward), since FlopCounterMode over-counts depthwise-convolution
backward (see count_flops); achieved TFLOP/s = FLOPs per step / median step time. `ratio` is
images/s over the fp32_nchw baseline at the same resolution and batch size, in this run.
`spread` is (max-min)/median over the windows: a ratio difference smaller than it is noise.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32_nchw": dict(amp=False, channels_last=False, fused=False, compile=False,
                      label="fp32 NCHW eager"),
    "bf16_cl": dict(amp=True, channels_last=True, fused=False, compile=False,
                    label="bf16 channels_last eager"),
    "bf16_cl_fused": dict(amp=True, channels_last=True, fused=True, compile=False,
                          label="+ fused loss"),
    "bf16_cl_fused_compiled": dict(amp=True, channels_last=True, fused=True, compile=True,
                                   label="+ torch.compile"),
}
BASELINE = "fp32_nchw"
NETS = ("resnet50", "resnet18", "mobilenet_v2")  # teacher, student A, student B


# ----------------------------------------------------------------------------- loss


def _plain_reference_loss(t, students, y, temperature=4.0, label_smoothing=0.1):
    """DESIGN.md's uadkd loss in plain PyTorch; used only while fastkd.losses is not importable."""
    T = temperature
    t = t.float()
    p_t = F.softmax(t / T, dim=1)
    log_p = F.log_softmax(t, dim=1)
    w = 1.0 + (log_p.exp() * log_p).sum(1) / torch.log(torch.tensor(float(t.shape[1])))
    w = w.detach()
    total = 0.0
    for i, s in enumerate(students):
        s = s.float()
        log_p_s = F.log_softmax(s / T, dim=1)
        ce = F.cross_entropy(s, y, label_smoothing=label_smoothing, reduction="none")
        kd = (p_t * (torch.log(p_t.clamp_min(1e-30)) - log_p_s)).sum(1)
        q = students[1 - i].detach().float() if len(students) == 2 else None
        peer = 0.0
        if q is not None:
            p_q = F.softmax(q / T, dim=1)
            peer = (p_q * (torch.log(p_q.clamp_min(1e-30)) - log_p_s)).sum(1)
        total = total + ce + w * T * T * kd + T * T * peer
    return {"loss": total.mean()}


def make_loss(fused: bool, temperature: float, device: str = "cpu") -> tuple[Callable, str]:
    """(loss_fn(t, [sa, sb], y) -> dict with "loss", description). Raises RuntimeError if the
    fused op is asked for and not available. On CUDA the description says whether the op runs
    the CUDA kernel or (extension unavailable) its PyTorch-maths fallback."""
    try:
        from fastkd.losses import LossConfig, distillation_loss
    except ImportError as error:
        if fused:
            raise RuntimeError(f"fastkd.losses not importable ({error})") from error
        return (lambda t, s, y: _plain_reference_loss(t, s, y, temperature),
                "benchmark-local plain PyTorch (fastkd.losses missing)")
    cfg = LossConfig.from_method("uadkd", temperature=temperature)
    if fused and not hasattr(torch.ops.fastkd, "dual_kd_loss"):
        raise RuntimeError("torch.ops.fastkd.dual_kd_loss is not registered")
    desc = "fastkd.losses reference (fused=False)"
    if fused:
        desc = "fastkd.losses fused op"
        if str(device).startswith("cuda"):
            try:
                from fastkd.kernels.build import load_extension

                load_extension()
                desc += " (CUDA kernel)"
            except Exception as error:  # the op then runs its PyTorch maths: say so in the result
                desc += f" (CUDA extension unavailable, PyTorch-maths fallback: {str(error)[:120]})"
        else:
            desc += " (CPU implementation)"
    return (lambda t, s, y: distillation_loss(t, s, y, cfg, fused=fused), desc)


# ----------------------------------------------------------------------------- networks and step


def build_nets(num_classes: int, device: str, channels_last: bool, seed: int):
    import torchvision

    torch.manual_seed(seed)
    nets = [torchvision.models.get_model(name, weights=None, num_classes=num_classes).to(device)
            for name in NETS]
    if channels_last:
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    teacher, sa, sb = nets
    teacher.eval().requires_grad_(False)
    sa.train()
    sb.train()
    return teacher, sa, sb


def make_optimizer(sa, sb, lr: float):
    return torch.optim.SGD([*sa.parameters(), *sb.parameters()], lr=lr, momentum=0.9,
                           nesterov=True, weight_decay=5e-5)


def make_step(teacher, sa, sb, opt, loss_fn, amp: bool, device_type: str):
    """One training step; returns the loss tensor (no host sync)."""

    def step(x, y):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            with torch.inference_mode():
                t = teacher(x)  # (B, C), inference tensor
            logits_a, logits_b = sa(x), sb(x)  # (B, C) each
        t = t.clone()  # an inference tensor may not be saved for backward; a (B, C) copy is cheap
        out = loss_fn(t, [logits_a, logits_b], y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out["loss"]

    return step


def compile_backend(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    if not device.startswith("cuda"):
        return "inductor"  # CPU inductor needs a C++ compiler, not Triton
    try:
        import triton  # noqa: F401

        return "inductor"
    except Exception:  # no usable Triton: the Triton-free path
        return "cudagraphs"


def count_flops(teacher, sa, sb, x) -> dict[str, int]:
    """FLOPs of one step: FlopCounterMode on each network's forward; students x 3 (forward +
    backward = grad input + grad weight, each about one forward).

    Not FlopCounterMode around the whole step: its convolution_backward formula ignores groups
    and over-counts MobileNetV2's depthwise backward about 20x (seen with torch 2.14: a 64-group
    3x3 conv counted 469.6 MFLOP backward for a 7.2 MFLOP forward), which would inflate TFLOP/s
    by half. For the ResNets both ways agree within 1 %. The loss and optimizer are negligible.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name, net in zip(NETS, (teacher, sa, sb)):
        was_training = net.training
        net.eval()  # batch statistics do not change the count; eval keeps running stats intact
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(x)
        net.train(was_training)
        counts[name] = int(counter.get_total_flops())
    counts["step"] = counts[NETS[0]] + 3 * (counts[NETS[1]] + counts[NETS[2]])
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
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    on_gpu = device_type == "cuda"
    res_list = common.parse_int_list(args.res or ("160 192 224" if on_gpu else "64"))
    batch_list = common.parse_int_list(args.batch or ("128 256" if on_gpu else "8"))
    compile_shapes = parse_shapes(args.compile_shapes or f"{res_list[0]}x{batch_list[-1]}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    backend = compile_backend(args.compile_backend, device)
    machine = common.machine_info(device)
    print(f"step_throughput: {machine.get('gpu') or machine['cpu']} | torch {machine['torch']} | "
          f"device {device} | res {res_list} | batch {batch_list} | variants {variants} | "
          f"compile {backend} at {sorted(compile_shapes)}", flush=True)

    # Two copies of the networks: NCHW for the baseline, channels_last for the rest.
    nets: dict[bool, tuple] = {}
    compiled: dict[str, Any] = {}
    loss_desc: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    flops_cache: dict[tuple, dict[str, int]] = {}
    t_start = time.perf_counter()

    for res in res_list:
        for batch in batch_list:
            gen = torch.Generator(device="cpu").manual_seed(res * 1000 + batch)
            x32 = torch.randn(batch, 3, res, res, generator=gen).to(device)
            y = torch.randint(0, args.num_classes, (batch,), generator=gen).to(device)
            for name in variants:
                spec = VARIANTS[name]
                row: dict[str, Any] = dict(variant=name, label=spec["label"], res=res, batch=batch)
                if spec["compile"] and (res, batch) not in compile_shapes:
                    continue  # compiled only where asked: each shape costs a compile
                if args.max_seconds and time.perf_counter() - t_start > args.max_seconds:
                    row.update(status="skipped", error=f"--max-seconds {args.max_seconds:g} reached")
                    rows.append(row)
                    continue
                try:
                    loss_fn, desc = make_loss(spec["fused"], args.temperature, device)
                except RuntimeError as error:
                    row.update(status="skipped", error=str(error))
                    rows.append(row)
                    print(f"  {name:24s} {res}px b{batch}: skipped ({error})", flush=True)
                    continue
                loss_desc[name] = desc
                cl = spec["channels_last"]
                if cl not in nets:
                    nets[cl] = build_nets(args.num_classes, device, cl, args.seed)
                teacher, sa, sb = nets[cl]
                if spec["compile"]:
                    if "nets" not in compiled:
                        compiled["nets"] = tuple(torch.compile(n, backend=backend, dynamic=False)
                                                 for n in (teacher, sa, sb))
                    teacher, sa, sb = compiled["nets"]
                opt = make_optimizer(*nets[cl][1:], lr=args.lr)
                step = make_step(teacher, sa, sb, opt, loss_fn, spec["amp"], device_type)
                x = x32.to(memory_format=torch.channels_last, dtype=torch.bfloat16) if cl else x32
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    if (res, batch) not in flops_cache:  # same maths in every variant: count once
                        flops_cache[(res, batch)] = count_flops(*nets[cl], x.float())
                    flops = flops_cache[(res, batch)]["step"]
                    if spec["compile"]:
                        common.synchronize(device)
                        t0 = time.perf_counter()
                        step(x, y)
                        common.synchronize(device)
                        row["compile_s"] = round(time.perf_counter() - t0, 1)
                        row["compile_backend"] = backend
                    windows = common.time_windows(lambda: step(x, y), device, warmup=args.warmup,
                                                  windows=args.windows, steps=args.steps)
                except torch.cuda.OutOfMemoryError:
                    row.update(status="oom", error="CUDA out of memory")
                    rows.append(row)
                    print(f"  {name:24s} {res}px b{batch}: out of memory", flush=True)
                    del step, opt
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                step_s = common.median(windows) / args.steps
                row.update(
                    status="ok",
                    images_per_s=batch / step_s,
                    step_ms=step_s * 1e3,
                    gflop_per_image=flops / batch / 1e9,
                    tflops=flops / step_s / 1e12,
                    spread=common.spread(windows),
                    windows_s=[round(w, 6) for w in windows],
                    loss_impl=desc,
                )
                if on_gpu:
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                rows.append(row)
                print(f"  {name:24s} {res}px b{batch}: {row['images_per_s']:10,.1f} img/s  "
                      f"{row['tflops']:7.2f} TFLOP/s  spread {row['spread']:.2f}"
                      + (f"  (compile {row['compile_s']} s)" if "compile_s" in row else ""),
                      flush=True)
                del step, opt
            del x32, y
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            finish(args, rows, loss_desc, machine, device, backend, variants, res_list, batch_list,
                   compile_shapes, time.perf_counter() - t_start, final=False)

    return finish(args, rows, loss_desc, machine, device, backend, variants, res_list, batch_list,
                  compile_shapes, time.perf_counter() - t_start, final=True)


def finish(args, rows, loss_desc, machine, device, backend, variants, res_list, batch_list,
           compile_shapes, wall_s: float, final: bool) -> dict[str, Any]:
    """Ratios, headline and notes from the rows so far; writes the JSON (also after each shape,
    so a run stopped by a timeout still leaves what it measured). Prints the table when final."""
    base = {(r["res"], r["batch"]): r["images_per_s"] for r in rows
            if r["variant"] == BASELINE and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") == "ok" and (r["res"], r["batch"]) in base:
            r["ratio"] = r["images_per_s"] / base[(r["res"], r["batch"])]

    # Headline: each variant at the smallest resolution and largest batch (the goal shape).
    goal_res, goal_batch = min(res_list), max(batch_list)
    headline = [dict(label=f"step {r['variant']} {goal_res}px b{goal_batch}",
                     value=r["images_per_s"], unit="img/s", ratio=r.get("ratio"))
                for r in rows if r.get("status") == "ok" and r["res"] == goal_res
                and r["batch"] == goal_batch]
    notes = []
    fast = [r for r in rows if r.get("status") == "ok" and r["variant"] != BASELINE
            and r["res"] == goal_res and r["batch"] == goal_batch]
    if fast:
        best = max(fast, key=lambda r: r["images_per_s"])
        notes.append(f"goal (H100): >= 6,000 img/s at 160 px bf16 channels_last and >= 4x fp32 NCHW; "
                     f"best here at {goal_res} px b{goal_batch}: {best['variant']} "
                     f"{best['images_per_s']:,.0f} img/s, "
                     + (f"{best['ratio']:.2f}x" if best.get("ratio") is not None else "no fp32 baseline in this run"))
    notes.append("loss: " + "; ".join(f"{k}: {v}" for k, v in loss_desc.items()))
    notes.append(f"total wall time {wall_s:.0f} s" + ("" if final else " (partial: run still going)"))

    if final:
        columns = [("label", "variant"), ("res", "px"), ("batch", "batch"), ("images_per_s", "img/s"),
                   ("step_ms", "ms/step"), ("tflops", "TFLOP/s"), ("ratio", "x fp32"),
                   ("spread", "spread"), ("compile_s", "compile s"), ("status", "status")]
        common.print_table(rows, columns, title=f"three-network step, {machine.get('gpu') or machine['cpu']}")
        for n in notes:
            print(n)
    params = dict(device=device, res=res_list, batch=batch_list, variants=variants,
                  compile_backend=backend, compile_shapes=sorted(compile_shapes),
                  steps=args.steps, windows=args.windows, warmup=args.warmup,
                  num_classes=args.num_classes, nets=list(NETS), temperature=args.temperature,
                  max_seconds=args.max_seconds, complete=final)
    return common.write_result(args.json, "step_throughput", rows, machine=machine, params=params,
                               headline=headline, notes=notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--res", default=None, help="resolutions (default: 160,192,224 on GPU; 64 on CPU)")
    p.add_argument("--batch", default=None, help="batch sizes (default: 128,256 on GPU; 8 on CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--compile-shapes", default=None,
                   help="RESxBATCH list where the compiled variant runs (default: first res x last batch)")
    p.add_argument("--compile-backend", default="auto", help="auto | inductor | cudagraphs | eager | ...")
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


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
