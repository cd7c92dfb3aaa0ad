"""End-to-end throughput: the three-network step fed by each loader backend vs synthetic data.

    # GPU, on a packed directory (see benchmarks/README.md for the figures):
    python benchmarks/e2e_throughput.py --data PACKED --backends torch,dali,ffcv --json e2e.json
    # make a small synthetic packed set first (photo-sized JPEGs), then measure:
    python benchmarks/e2e_throughput.py --make-data /tmp/e2e-pack --json e2e.json
    # CPU smoke run:
    python benchmarks/e2e_throughput.py --make-data /tmp/e2e-pack --res 32 --batch 8 --steps 3 \
        --warmup 1 --backends torch,folder

What it measures: for each backend, `build_loader(data, "train", backend, ...)` (train
augmentation: RandomResizedCrop + flip, on the device where the backend decodes there) feeds
`--steps` timed training steps (the step of step_throughput.py, variant `--variant`: by default
bf16 channels_last + fused loss on GPU, fp32 NCHW on CPU), after `--warmup` untimed steps that
absorb loader start-up, JIT compilation and cuDNN autotuning. Then the same number of steps on
one synthetic batch already on the device. Reported per row:

    images_per_s   images through the step over wall time (host clock; one device sync at each end)
    wait_frac      host time blocked in next(iterator) (including re-creating the iterator at an
                   epoch end) over that wall time: the fraction of step time spent waiting for data
    wait_frac_steady  the same without the calls that started a new epoch (`epoch_starts` of
                   them): on a small benchmark set an epoch is a few batches, so its start-up
                   weighs far more than in a real epoch of thousands of batches
    vs_synthetic   images_per_s over the synthetic row's: 1.0 means data never held the step back

The host clock is the right tool here, unlike in step_throughput.py: waiting for data is a host
event. Work a backend enqueues on the GPU (nvJPEG decode, augmentation) is not "waiting"; it
shows up as a lower vs_synthetic instead. A backend whose package is missing or that cannot run
on this machine is skipped with its message.
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
import step_throughput as st  # noqa: E402

import torch  # noqa: E402

BACKENDS = ("torch", "dali", "ffcv", "folder")


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
    batch); returns images/s and the fraction of wall time spent inside batches().

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


def run(args) -> dict[str, Any]:
    device = common.pick_device(args.device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    on_gpu = device_type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    variant = args.variant or ("bf16_cl_fused" if on_gpu else "fp32_nchw")
    spec = dict(st.VARIANTS[variant])
    if spec["compile"]:
        raise SystemExit("--variant: e2e uses an eager variant (compile would dominate a short run)")
    try:
        loss_fn, loss_desc = st.make_loss(spec["fused"], 4.0, device)
    except RuntimeError as error:  # fused op missing: fall back to the reference loss, and say so
        print(f"e2e_throughput: fused loss unavailable ({error}); using the reference loss")
        spec["fused"] = False
        loss_fn, loss_desc = st.make_loss(False, 4.0, device)
    dtype = torch.bfloat16 if spec["amp"] else torch.float32
    res = args.res or (160 if on_gpu else 64)
    batch = args.batch or (256 if on_gpu else 8)

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
          f"{res}px b{batch} | {args.steps} steps | data {data}", flush=True)

    rows: list[dict[str, Any]] = []
    nets = None
    num_classes = None
    for backend in backends:
        row: dict[str, Any] = dict(source=backend, res=res, batch=batch, variant=variant)
        try:
            loader = build_loader(str(data), "train", backend, batch, res, device, dtype,
                                  num_workers=args.workers, drop_last=True)
            if nets is None:
                num_classes = loader.num_classes
                nets = st.build_nets(num_classes, device, spec["channels_last"], args.seed)
            opt = st.make_optimizer(*nets[1:], lr=1e-3)
            step = st.make_step(*nets, opt, loss_fn, spec["amp"], device_type)
            row.update(measure(step, LoaderBatches(loader), args.steps, args.warmup, device))
            row["status"] = "ok"
            del loader
        except Exception as error:  # any backend failure is reported and the others still run
            message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            row.update(status="skipped", error=message)
            print(f"  {backend:8s} skipped: {message}", flush=True)
        else:
            print(f"  {backend:8s} {row['images_per_s']:10,.1f} img/s  waiting {row['wait_frac']:.1%} "
                  f"({row['wait_frac_steady']:.1%} in-epoch, {row['epoch_starts']} epoch starts)",
                  flush=True)
        rows.append(row)

    if nets is None:  # no backend ran: still measure the synthetic ceiling
        num_classes = args.classes
        nets = st.build_nets(num_classes, device, spec["channels_last"], args.seed)
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    if spec["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    opt = st.make_optimizer(*nets[1:], lr=1e-3)
    step = st.make_step(*nets, opt, loss_fn, spec["amp"], device_type)
    synth = dict(source="synthetic", res=res, batch=batch, variant=variant, status="ok")
    synth.update(measure(step, lambda: (x, y), args.steps, args.warmup, device))
    rows.append(synth)
    print(f"  {'synthetic':8s} {synth['images_per_s']:10,.1f} img/s", flush=True)
    for r in rows:
        if r.get("status") == "ok":
            r["vs_synthetic"] = r["images_per_s"] / synth["images_per_s"]

    notes = [f"loss: {loss_desc}", "goal (H100): data waiting <= 5 % of step time with the torch backend"]
    columns = [("source", "data"), ("images_per_s", "img/s"), ("wait_frac", "waiting"),
               ("wait_frac_steady", "waiting in-epoch"), ("epoch_starts", "epoch starts"),
               ("vs_synthetic", "x synthetic"), ("status", "status"), ("error", "note")]
    pct = ("wait_frac", "wait_frac_steady")
    shown = [dict(r, **{k: (f"{r[k]:.1%}" if k in r else None) for k in pct}) for r in rows]
    common.print_table(shown, columns, title=f"end-to-end, {variant}, {res}px b{batch}, {args.steps} steps")
    headline = [dict(label=f"e2e {r['source']} {res}px b{batch}", value=r["images_per_s"],
                     unit="img/s", wait_frac=r.get("wait_frac"), wait_frac_steady=r.get("wait_frac_steady"))
                for r in rows if r.get("status") == "ok"]
    params = dict(device=device, data=str(data), backends=backends, res=res, batch=batch,
                  steps=args.steps, warmup=args.warmup, variant=variant, workers=args.workers)
    return common.write_result(args.json, "e2e_throughput", rows, machine=machine, params=params,
                               headline=headline, notes=notes)


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
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list of " + ", ".join(BACKENDS))
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", default=None, choices=[v for v in st.VARIANTS if not st.VARIANTS[v]["compile"]])
    p.add_argument("--res", type=int, default=None, help="default 160 on GPU, 64 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 8 on CPU")
    p.add_argument("--steps", type=int, default=50, help="timed steps per source")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per source")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: backend's)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
