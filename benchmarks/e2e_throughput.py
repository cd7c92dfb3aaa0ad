"""End-to-end throughput: the trainer's step (fastkd.step) fed by each loader backend vs synthetic data.

    # GPU, on a packed directory (see benchmarks/README.md for the figures):
    python benchmarks/e2e_throughput.py --data PACKED --backends torch,dali,ffcv --json e2e.json
    # make a small synthetic packed set first (photo-sized JPEGs), then measure:
    python benchmarks/e2e_throughput.py --make-data /tmp/e2e-pack --json e2e.json
    # CPU smoke run:
    python benchmarks/e2e_throughput.py --make-data /tmp/e2e-pack --res 32 --batch 8 --steps 3 \
        --warmup 1 --backends torch,folder

What it measures: for each backend, `build_loader(data, "train", backend, ...)` (train
augmentation: RandomResizedCrop + flip, on the device where the backend decodes there) feeds
`--steps` timed iterations of the trainer's own step (`fastkd.step.build_step` from the config of
step_throughput.py's variant `--variant`, then `step.meter.add`: by default bf16 channels_last +
fused loss on GPU, fp32 NCHW on CPU; a compiled variant is compiled once by `TrainStep.warm`
before any timing, its seconds in params.compile_s), after `--warmup` untimed steps that absorb
loader start-up, JIT compilation and cuDNN autotuning. Then the same number of steps on one synthetic
batch already on the device. One step (one set of networks) serves every source. Rows follow
benchmarks/common.py's schema: name = the source (a backend or `synthetic`), unit img/s,
baseline `synthetic`, ratio = value / synthetic's. Extras per row:

    value          images through the step over wall time (host clock; one device sync at each end)
    wait_frac      host time blocked in next(iterator) (including re-creating the iterator at an
                   epoch end) over that wall time: the fraction of step time spent waiting for data
    wait_frac_steady  the same without the calls that started a new epoch (`epoch_starts` of
                   them): on a small benchmark set an epoch is a few batches, so its start-up
                   weighs far more than in a real epoch of thousands of batches
    ratio          value over the synthetic row's: 1.0 means data never held the step back
    workers        the loader's decode workers (threads or processes)
    imagenet100_epoch_min  126,689 (ImageNet-100's train images) / value / 60: the minutes an
                   epoch would take at this rate (a projection from this run, not a measured epoch)

The host clock is the right tool here, unlike in step_throughput.py: waiting for data is a host
event. Work a backend enqueues on the GPU (nvJPEG decode, augmentation) is not "waiting"; it
shows up as a lower ratio instead. A backend whose package is missing or that cannot run
on this machine is skipped with its message, and so is one build_loader replaced by another
(nvimgcodec without the GPU's JPEG engines falls back to torch). --backends also takes
loader_throughput.py's VARIANTS: nvimgcodec-gpu, nvimgcodec-cpu (host-core decode with
--workers threads, then the GPU resizes), torch-host (decode + crop + resize in the DataLoader
workers, pinned copy to the GPU), dali-reader, auto (extra `ran_as`: the backend chosen), and its
--workers rule: a list (`--workers 8,15`) gives the host-decode paths one row per count
(`torch-host w8`). benchmarks/decode_table.py tabulates these rows per decode path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import loader_throughput as lt  # noqa: E402
from decode_table import epoch_minutes  # noqa: E402
import step_throughput as st  # noqa: E402

import torch  # noqa: E402

from fastkd.data.spec import LOADERS  # noqa: E402
from fastkd.runtime import CUDA_ONLY_MODES  # noqa: E402
from fastkd.step import build_step  # noqa: E402

# every loader backend (fastkd.data.spec.LOADERS), torch first, where this script always had it
BACKENDS = ("torch", *(b for b in LOADERS if b != "torch"))


def make_packed(out: Path, *, classes: int, per_class: int, size: int, formats: str) -> Path:
    """Synthetic ImageNet-style folder -> `fastkd pack` into `out` (skipped if already packed)."""
    if (out / "manifest.json").exists():
        return out
    src = out.parent / (out.name + "-src")
    if not src.exists():
        common.make_synthetic_folder(src, classes=classes, train_per_class=per_class,
                                     val_per_class=max(2, per_class // 8), size=size)
    cmd = [sys.executable, "-m", "fastkd.cli", "pack", str(src), str(out), "--classes", "all",
           "--formats", formats]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def available_formats() -> str:
    """Both formats: fastkd pack writes the .beton itself, FFCV is only needed to read it."""
    return "ffcv,dali"


def measure(step, batches, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """Run warmup + steps steps pulling (x, y) from `batches()` (a callable returning the next
    batch) into `step(x, y)`; returns images/s and the fraction of wall time spent inside batches().

    `batches.epoch_starts` (when present) counts iterator re-creations at epoch ends; the waits of
    those calls are also reported apart (`wait_frac_steady` leaves them out), because on a small
    benchmark set an epoch is a few batches and its start-up cost weighs far more than in a real
    epoch of thousands of batches."""
    for _ in range(warmup):
        x, y = batches()
        step(x, y)
    common.synchronize(device)
    images, wait, boundary_wait = 0, 0.0, 0.0
    starts0 = getattr(batches, "epoch_starts", 0)
    t0 = time.perf_counter()
    for _ in range(steps):
        before = getattr(batches, "epoch_starts", 0)
        tw = time.perf_counter()
        x, y = batches()
        waited = time.perf_counter() - tw
        wait += waited
        if getattr(batches, "epoch_starts", 0) != before:
            boundary_wait += waited
        step(x, y)
        images += int(x.shape[0])
    common.synchronize(device)
    wall = time.perf_counter() - t0
    return dict(images=images, wall_s=wall, images_per_s=images / wall, wait_s=wait,
                wait_frac=wait / wall, wait_frac_steady=(wait - boundary_wait) / wall,
                epoch_starts=getattr(batches, "epoch_starts", 0) - starts0)


class LoaderBatches:
    """Callable returning the next batch of `loader`, starting a new epoch when one ends."""

    def __init__(self, loader):
        self.loader, self.epoch, self.epoch_starts = loader, 0, 0
        self.it = iter(loader)

    def __call__(self):
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            self.epoch_starts += 1
            self.loader.set_epoch(self.epoch)
            self.it = iter(self.loader)
            return next(self.it)


def trainer_iteration(step):
    """(x, y) -> one trainer iteration: the step, then the meter (as fastkd/train.py runs it)."""

    def run(x, y) -> None:
        step.meter.add(step(x, y), int(y.shape[0]))

    return run


def run(args) -> dict[str, Any]:
    device = common.pick_device(args.device)
    on_gpu = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    variant = args.variant or ("bf16_cl_fused" if on_gpu else "fp32_nchw")
    mode = st.compile_mode("auto", device)
    cfg = st.variant_config(variant, mode=mode, temperature=4.0,
                            graphs_mode=st.compile_mode("auto", device, graphs=True))
    if cfg.compile.mode in CUDA_ONLY_MODES and not on_gpu:
        raise SystemExit(f"--variant {variant}: CUDA graphs need a CUDA device")
    loss_desc = st.loss_impl(cfg, device)
    dtype = st.input_dtype(cfg, device)
    res = args.res or (160 if on_gpu else 64)
    batch = args.batch or (256 if on_gpu else 8)
    case = f"{res}px b{batch}"

    if args.make_data:
        data = make_packed(Path(args.make_data), classes=args.classes, per_class=args.per_class,
                           size=args.size, formats=available_formats())
    elif args.data:
        data = Path(args.data)
    else:
        raise SystemExit("give --data PACKED_DIR or --make-data DIR")

    from fastkd.data import build_loader  # after argument checks: a missing fastkd.data is an error here

    machine = common.machine_info(device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    print(f"e2e_throughput: {machine.get('gpu') or machine['cpu']} | device {device} | {variant} | "
          f"{case} | {args.steps} steps | data {data}", flush=True)

    rows: list[dict[str, Any]] = []
    step = None

    compile_s: list[float] = []  # a compiled variant: its one compile (warm), apart from every rate

    def make_step(num_classes: int):
        torch.manual_seed(args.seed)
        made = build_step(cfg, num_classes, torch.device(device), lr=1e-3)
        compile_s.append(made.warm(batch, res, dtype, cfg.precision.channels_last))
        return made

    for backend, path, workers in lt.runs(backends, args.workers):
        extras: dict[str, Any] = dict(res=res, batch=batch, variant=variant, workers=workers)
        try:
            name, opts = lt.resolve(path)
            loader = build_loader(str(data), "train", name, batch, res, device, dtype,
                                  num_workers=workers, drop_last=True, **opts)
            why = lt.substituted(path, loader, device)
            if why is not None:
                raise RuntimeError(why)
            extras["ran_as"], extras["workers"] = loader.backend, loader.spec.num_workers
            if step is None:
                step = make_step(loader.num_classes)
            extras.update(measure(trainer_iteration(step), LoaderBatches(loader), args.steps, args.warmup, device))
            del loader
        except Exception as error:  # any backend failure is reported and the others still run
            message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            rows.append(common.row(backend, case=case, unit="img/s", status="skipped", baseline="synthetic",
                                   error=message, **extras))
            print(f"  {backend:8s} skipped: {message}", flush=True)
            continue
        rate = extras.pop("images_per_s")
        rows.append(common.row(backend, case=case, unit="img/s", value=rate, baseline="synthetic",
                               imagenet100_epoch_min=epoch_minutes(rate), **extras))
        r = rows[-1]
        print(f"  {backend:8s} {r['value']:10,.1f} img/s  waiting {r['wait_frac']:.1%} "
              f"({r['wait_frac_steady']:.1%} in-epoch, {r['epoch_starts']} epoch starts)", flush=True)

    if step is None:  # no backend ran: still measure the synthetic ceiling
        step = make_step(args.classes)
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    if cfg.precision.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, _num_classes(step), (batch,), device=device)
    synth = measure(trainer_iteration(step), lambda: (x, y), args.steps, args.warmup, device)
    rate = synth.pop("images_per_s")
    rows.append(common.row("synthetic", case=case, unit="img/s", value=rate, baseline="synthetic", res=res,
                           batch=batch, variant=variant, imagenet100_epoch_min=epoch_minutes(rate), **synth))
    print(f"  {'synthetic':8s} {rows[-1]['value']:10,.1f} img/s", flush=True)
    common.fill_ratios(rows)

    columns = [("name", "data"), ("value", "img/s"), ("wait_frac", "waiting"),
               ("wait_frac_steady", "waiting in-epoch"), ("epoch_starts", "epoch starts"),
               ("ratio", "x synthetic"), ("imagenet100_epoch_min", "IN-100 epoch min"), ("status", "status"),
               ("error", "note")]
    pct = ("wait_frac", "wait_frac_steady")
    shown = [dict(r, **{k: (f"{r[k]:.1%}" if k in r else None) for k in pct}) for r in rows]
    common.print_table(shown, columns, title=f"end-to-end, {variant}, {case}, {args.steps} steps")
    headline = [common.head(f"e2e {r['name']} {case}", r["value"], "img/s", r["ratio"])
                for r in rows if r["status"] == "ok"]
    torch_row = next((r for r in rows if r["name"] == "torch" and r["status"] == "ok"), None)
    text = "data waiting <= 5 % of step time, torch backend"
    if torch_row is None:
        goals = [common.goal(text, "torch backend not measured", None, machine)]
    else:
        steady = torch_row["wait_frac_steady"]
        goals = [common.goal(text, f"{steady:.1%} in-epoch, {torch_row['wait_frac']:.1%} with "
                             f"{torch_row['epoch_starts']} epoch starts; {torch_row['ratio']:.2f}x synthetic",
                             steady <= 0.05, machine)]
    hw_row = next((r for r in rows if r["name"] == "nvimgcodec" and r["status"] == "ok"), None)
    text = "nvimgcodec (GPU JPEG engines) feeds the step at least as fast as torch (nvJPEG on the SMs)"
    if hw_row is not None and torch_row is not None:
        goals.append(common.goal(text, f"{hw_row['value']:,.0f} vs {torch_row['value']:,.0f} img/s",
                                 hw_row["value"] >= torch_row["value"], machine))
    else:
        goals.append(common.goal(text, "nvimgcodec or torch not measured", None, machine))
    fed = [r for r in rows if r["status"] == "ok" and r["name"] != "synthetic" and r.get("ratio") is not None]
    text = "best decode path >= 0.95x synthetic, waiting <= 2 %"
    if fed:
        best = max(fed, key=lambda r: r["ratio"])
        goals.append(common.goal(text, f"{best['name']}: {best['ratio']:.2f}x synthetic, waiting "
                                 f"{best['wait_frac_steady']:.1%} in-epoch ({variant})",
                                 best["ratio"] >= 0.95 and best["wait_frac_steady"] <= 0.02, machine))
    else:
        goals.append(common.goal(text, "no decode path measured", None, machine))
    params = dict(device=device, data=str(data), backends=backends, res=res, batch=batch,
                  steps=args.steps, warmup=args.warmup, variant=variant, workers=args.workers,
                  compile_mode=cfg.compile.mode, compile_s=compile_s[0] if compile_s else None)
    return common.write_result(args.json, "e2e_throughput", rows, machine=machine, params=params,
                               headline=headline, goals=goals, notes=[f"loss: {loss_desc}"])


def _num_classes(step) -> int:
    """Classes of the step's students: the out_features of the first student's last Linear."""
    last = [m for m in step.students.nets[0].modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--data", default=None, help="packed directory (fastkd pack output)")
    p.add_argument("--make-data", default=None, metavar="DIR",
                   help="pack a synthetic folder into DIR first (reused if DIR is already packed)")
    p.add_argument("--classes", type=int, default=8, help="--make-data: classes")
    p.add_argument("--per-class", type=int, default=96, help="--make-data: train images per class")
    p.add_argument("--size", type=int, default=400, help="--make-data: longer image side")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma list of " + ", ".join(BACKENDS + tuple(lt.VARIANTS)))
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", default=None, choices=list(st.VARIANTS),
                   help="step_throughput.py's variant (default bf16_cl_fused on GPU, fp32_nchw on CPU); a "
                        "compiled one is compiled once before timing")
    p.add_argument("--res", type=int, default=None, help="default 160 on GPU, 64 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 8 on CPU")
    p.add_argument("--steps", type=int, default=50, help="timed steps per source")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per source")
    p.add_argument("--workers", type=common.parse_int_list, default=[],
                   help="loader workers: one count for every source, or a list (8,15) swept over the "
                        "host-decode paths (default: each backend's)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


main = common.cli_main(build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
