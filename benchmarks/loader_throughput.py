"""Loader throughput: images/s of each fastkd.data backend vs the torchvision ImageFolder baseline.

    .venv/bin/python benchmarks/loader_throughput.py --json benchmarks/results/loader_cpu.json
    .venv/bin/python benchmarks/loader_throughput.py --device cuda --json benchmarks/results/loader_gpu.json
    .venv/bin/python benchmarks/loader_throughput.py --data PACKED_DIR   # your own packed data

What it measures: one process, one run: for each backend (folder, ffcv, dali, torch, nvimgcodec) the train
split of the same packed data with the same augmentation (RandomResizedCrop 0.08-1, flip, at
--resolution), batches normalised in --dtype, channels_last, on --device, exactly what a training
step receives. Per backend: one warm-up epoch (JIT compile, page cache, worker start-up) that is
not timed, then --epochs timed epochs; reported: the median epoch's images/s and its ratio to
`folder`. Workers: one --workers value goes to every backend; a list (`--workers 4,8,15`) sweeps
the host-decode paths (HOST_DECODE: one row per count, named `torch-host w8`) and leaves the
others their default; without --workers each backend takes build_loader's default (every core;
torch-host on CUDA every core but one). Each row records its `workers`. On cuda the batch is
synchronised at the end of each epoch; a backend whose package is missing is skipped with the
reason, and so is one that build_loader replaced by another (nvimgcodec without the GPU's JPEG
engines falls back to torch: that row would measure torch). Names with options (VARIANTS):
nvimgcodec-gpu / nvimgcodec-cpu (nvImageCodec's CUDA decoder / host cores, ROI decode),
torch-host (the torch backend with decode="host": libjpeg-turbo in the DataLoader workers, also
when the device is CUDA) and auto (`--backend auto`; extra `ran_as` = the backend it chose).

Data: --data PACKED_DIR (its `source` folder serves `folder`), or --images photo-like JPEGs
(benchmarks/common.py's synthetic folder: 10 classes, 90 % train, longer side 300-400 px)
generated once into --work and packed with `fastkd pack` (max side 400, quality 90); later runs
reuse them. Rows follow benchmarks/common.py's schema: name = backend (`NAME wN` in a sweep),
unit img/s, baseline `folder`; extras res, workers, build_s, warmup_epoch_s, epoch_rates,
images_per_epoch, ran_as.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fastkd.data.spec import AUTO, LOADERS  # noqa: E402

# every loader backend (fastkd.data.spec.LOADERS), folder first: the baseline of the ratios
BACKENDS = ("folder", *(b for b in LOADERS if b != "folder"))
# extra names for --backends: a backend with options (e2e_throughput.py takes the same names)
VARIANTS = {
    "dali-reader": ("dali", {"shuffle": "reader"}),  # fn.readers.webdataset buffer shuffle
    "nvimgcodec-gpu": ("nvimgcodec", {"decoders": "gpu"}),  # nvImageCodec's CUDA decoder, no engines
    "nvimgcodec-cpu": ("nvimgcodec", {"decoders": "cpu"}),  # libjpeg-turbo ROI decode on the host cores
    "torch-host": ("torch", {"decode": "host"}),  # libjpeg-turbo in the DataLoader workers, on any device
    AUTO: (AUTO, {}),  # fastkd.data.auto's rule
}

# paths that decode on host cores whatever the device: a --workers list sweeps these
HOST_DECODE = ("torch-host", "nvimgcodec-cpu", "ffcv", "folder")


def runs(names: list[str], workers: list[int]) -> list[tuple[str, str, int | None]]:
    """(row name, --backends name, workers) per measurement. No --workers: each backend's default
    (None); one value: every path gets it, names unchanged; several: each host-decode path once
    per count (`torch-host w8`), the other paths once with their default."""
    out = []
    for name in names:
        if len(workers) <= 1:
            out.append((name, name, workers[0] if workers else None))
        elif name in HOST_DECODE:
            out += [(f"{name} w{n}", name, n) for n in workers]
        else:
            out.append((name, name, None))
    return out


def resolve(name: str) -> tuple[str, dict]:
    """--backends name -> (build_loader backend, its options)."""
    return VARIANTS.get(name, (name, {}))


def substituted(name: str, loader, device: str) -> str | None:
    """Why the loader built for `name` is not what `name` measures (build_loader fell back to
    another backend), or None. `auto` may run as anything."""
    backend, opts = resolve(name)
    if backend == "auto" or loader.backend == backend:
        return None
    why = ""
    if backend == "nvimgcodec":
        from fastkd.data.nvimgcodec_loader import why_not

        why = f": {why_not(torch.device(device), opts.get('decoders', 'hw'))}"
    return f"build_loader ran the {loader.backend} backend instead of {backend}{why}"


def prepare(work: Path, count: int) -> Path:
    from fastkd.preprocess.pack import pack

    src, packed = work / f"src-{count}", work / f"packed-{count}"
    if not (packed / "manifest.json").exists():
        if not (src / "val").exists():
            print(f"generating {count} images in {src} ...", flush=True)
            classes = 10
            per_class = max(1, count // classes)
            common.make_synthetic_folder(src, classes=classes, train_per_class=per_class - per_class // 10,
                                         val_per_class=max(1, per_class // 10), size=400)
        print(f"packing into {packed} ...", flush=True)
        pack(src, packed, classes="all", max_side=400, quality=90, overwrite=True)
    return packed


def build(packed: Path, backend: str, args, workers: int | None = None):
    """(loader, seconds to build) or (None, why it is skipped)."""
    from fastkd.data import build_loader
    from fastkd.errors import FastKDError

    name, opts = resolve(backend)
    t0 = time.perf_counter()
    try:
        loader = build_loader(packed, "train", name, args.batch_size, args.resolution, args.device,
                              args.dtype, num_workers=workers, seed=0, **opts)
    except FastKDError as error:
        return None, str(error)
    why = substituted(backend, loader, args.device)
    if why is not None:
        return None, why
    return loader, time.perf_counter() - t0


def run_epoch(loader, epoch: int, device: str) -> tuple[int, float]:
    """Images and seconds of one full pass; the last batch is waited for on CUDA."""
    loader.set_epoch(epoch)
    t = time.perf_counter()
    images = 0
    for x, _ in loader:
        images += x.shape[0]
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - t


def measure_all(packed: Path, backends: list[str], args) -> list[dict]:
    """Warm-up epoch per backend, then timed epochs interleaved round-robin across backends, so
    that load from other processes on a shared machine hits every backend alike."""
    results, loaders = [], {}
    for backend, path, workers in runs(backends, args.workers):
        loader, built = build(packed, path, args, workers)
        if loader is None:
            results.append({"backend": backend, "skipped": built, "res": args.resolution, "workers": workers})
            print(f"  {backend}: skipped: {built}", flush=True)
            continue
        _, warm = run_epoch(loader, 0, args.device)
        loaders[backend] = loader
        results.append({"backend": backend, "res": args.resolution, "workers": loader.spec.num_workers,
                        "build_s": built, "warmup_epoch_s": warm, "epoch_rates": [], "ran_as": loader.backend})
        print(f"  {backend}: built in {built:.1f} s, warm-up epoch {warm:.1f} s", flush=True)
    by_name = {r["backend"]: r for r in results}
    for epoch in range(1, args.epochs + 1):
        for backend, loader in loaders.items():
            images, seconds = run_epoch(loader, epoch, args.device)
            by_name[backend]["epoch_rates"].append(images / seconds)
            by_name[backend]["images_per_epoch"] = images
    for backend in loaders:
        r = by_name[backend]
        r["images_per_s"] = statistics.median(r["epoch_rates"])
        print(f"  {backend}: {r['images_per_s']:.0f} img/s (epochs: "
              + ", ".join(f"{v:.0f}" for v in r["epoch_rates"]) + ")", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--data", type=Path, default=None, help="packed directory to read (default: generate)")
    parser.add_argument("--images", type=int, default=2000, help="generated images (90%% train)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--workers", type=common.parse_int_list, default=[],
                        help="decode workers: one count for every backend, or a list (4,8,15) swept over the "
                             f"host-decode paths ({', '.join(HOST_DECODE)}); default: each backend's")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma list of {', '.join(BACKENDS + tuple(VARIANTS))}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fastkd-loader-bench"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 images, r=64, 1 timed epoch")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.device = common.pick_device(args.device)
    if args.quick:
        args.images, args.resolution, args.epochs, args.batch_size = 300, 64, 1, 32

    packed = args.data or prepare(args.work, args.images)
    info = common.machine_info(args.device)
    workers = ",".join(map(str, args.workers)) or "default"
    print(f"{info['date_utc']}  {info['cpu']} ({len(os.sched_getaffinity(0))} cores, workers {workers})  "
          f"{info.get('gpu', 'no GPU')}  "
          f"torch {info['torch']}")
    print(f"device={args.device} dtype={args.dtype} batch={args.batch_size} r={args.resolution} data={packed}",
          flush=True)
    results = measure_all(packed, args.backends.split(","), args)
    rows = []
    for r in results:
        extras = {k: v for k, v in r.items() if k not in ("backend", "skipped", "images_per_s")}
        if "skipped" in r:
            rows.append(common.row(r["backend"], unit="img/s", status="skipped", baseline="folder",
                                   error=r["skipped"], **extras))
        else:
            rows.append(common.row(r["backend"], unit="img/s", value=r["images_per_s"], baseline="folder", **extras))
    common.fill_ratios(rows)
    measured = [r for r in rows if r["status"] == "ok"]
    common.print_table(measured, [("name", "backend"), ("value", "img/s"), ("ratio", "x folder"),
                                  ("workers", "workers"), ("build_s", "build s"), ("warmup_epoch_s", "warm-up s")],
                       title=f"train loaders, r={args.resolution}, batch {args.batch_size}, {args.device}")
    for r in rows:
        if r["status"] != "ok":
            print(f"skipped {r['name']}: {r['error']}")
    common.write_result(
        args.json, "loader_throughput", rows, machine=info,
        params={k: str(v) for k, v in vars(args).items() if k != "json"},
        headline=[common.head(f"{r['name']} loader", r["value"], "img/s", r["ratio"]) for r in measured],
        notes=[f"device {args.device}; ratios are to the folder baseline measured in the same run"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
