"""Shared helpers for the fastkd benchmarks: machine description, honest timing, tables, JSON.

Every benchmark script in this folder can `import common` (they run as `python benchmarks/X.py`,
so this folder is on sys.path). What lives here:

    machine_info(device)          # dict: host, CPU, GPU, torch/CUDA/Triton versions, UTC date
    device_slug(info)             # "nvidia-h100-80gb-hbm3" / "cpu-amd-epyc-2c", for result folders
    time_windows(fn, ...)         # per-window seconds; CUDA events on GPU, warm-up excluded
    print_table / markdown_table  # one table, rich on a terminal, plain text otherwise
    write_result(path, name, rows, ...)   # the JSON every benchmark writes with --json

The JSON schema shared by step_throughput.py, e2e_throughput.py and run_all.py:

    {"benchmark": "step_throughput", "schema": 1, "command": "python benchmarks/...",
     "machine": {...machine_info...}, "params": {...}, "rows": [{...}, ...],
     "headline": [{"label": str, "value": float, "unit": str}], "notes": [str]}

`headline` holds the few numbers run_all.py charts; `rows` holds everything.

Also a small generator of an ImageNet-style folder of photo-sized JPEGs (smooth colour fields
plus texture, so they compress like photos rather than like noise), for loader benchmarks on
machines without ImageNet:

    python benchmarks/common.py synth-folder OUT --classes 8 --train 96 --val 8 --size 400
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

SCHEMA = 1


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict[str, Any]:
    """Where and with what a figure was measured. `device` is the torch device string used."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_build"] = torch.version.cuda
        if torch.cuda.is_available():
            idx = torch.device(device).index if device and device.startswith("cuda") else None
            idx = torch.cuda.current_device() if idx is None else idx
            props = torch.cuda.get_device_properties(idx)
            info["gpu"] = props.name
            info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
            info["gpu_sms"] = props.multi_processor_count
            info["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        info["torch"] = None
    try:
        import triton  # noqa: F401

        info["triton"] = triton.__version__
    except Exception:  # any import failure means "no usable Triton"
        info["triton"] = None
    return info


def device_slug(info: dict[str, Any]) -> str:
    """Short folder-safe name of the measuring device: the GPU if one was used, else the CPU."""
    if info.get("device", "") and str(info.get("device")).startswith("cuda") and info.get("gpu"):
        name = info["gpu"]
    else:
        name = f"cpu {info.get('cpu', 'unknown')} {info.get('cpu_count', '?')}c"
    slug = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug.strip("-")[:48]


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: CUDA is not available on this machine")
    return requested


def command_line() -> str:
    """The command that produced this result, as the user would retype it."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


# ----------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_windows(
    fn: Callable[[], Any], device: str, *, warmup: int, windows: int, steps: int
) -> list[float]:
    """Seconds taken by `steps` calls of `fn`, for each of `windows` timed windows.

    `warmup` calls run first and are not timed (autotuning, compilation, allocator growth).
    On CUDA each window is bracketed by CUDA events, so no host sync happens inside a window;
    on CPU the host clock is read around it. Report the median: one slow window (a page fault,
    a neighbour on shared cores) does not move it.
    """
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    if str(device).startswith("cuda"):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(windows)]
        for start, end in events:
            start.record()
            for _ in range(steps):
                fn()
            end.record()
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            seconds.append(time.perf_counter() - t0)
    return seconds


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of the windows: how much to trust a ratio between two variants."""
    m = median(values)
    return float((max(values) - min(values)) / m) if m > 0 else float("nan")


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table_cells(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> list[list[str]]:
    """columns: (key, header) pairs; returns formatted cells, header row first."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    return cells


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> str:
    cells = table_cells(rows, columns)
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def print_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]], title: str = "") -> None:
    """One table on stdout: rich when it is importable, aligned plain text otherwise."""
    cells = table_cells(rows, columns)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title or None)
        for i, header in enumerate(cells[0]):
            table.add_column(header, justify="left" if i == 0 else "right")
        for r in cells[1:]:
            table.add_row(*r)
        Console(width=max(100, sum(len(h) + 5 for h in cells[0]))).print(table)
        return
    except ImportError:
        pass
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    if title:
        print(title)
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


# ----------------------------------------------------------------------------- JSON


def write_result(
    path: str | os.PathLike | None,
    name: str,
    rows: list[dict],
    *,
    machine: dict[str, Any],
    params: dict[str, Any],
    headline: list[dict] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Build the shared result payload and, when `path` is given, write it there (atomically)."""
    payload = {
        "benchmark": name,
        "schema": SCHEMA,
        "command": command_line(),
        "machine": machine,
        "params": params,
        "rows": rows,
        "headline": headline or [],
        "notes": notes or [],
    }
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        tmp.replace(path)
    return payload


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).replace(",", " ").split()]


# ----------------------------------------------------------------------------- synthetic images


def _write_class(job: tuple) -> int:
    """Write one class folder of one split; job = (folder, wnid, label, split_index, count, size,
    quality, seed). Separate per-class random streams make the output independent of scheduling."""
    import numpy as np
    from PIL import Image

    folder, wnid, label, split_index, count, size, quality, seed = job
    rng = np.random.default_rng([seed, split_index, label])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        long_side = int(size * rng.uniform(0.75, 1.0))
        aspect = rng.choice([0.75, 1.0, 4 / 3, 1.5])
        w, h = (long_side, int(long_side / aspect)) if aspect >= 1 else (int(long_side * aspect), long_side)
        # smooth colour field from a tiny random image, upsampled, plus mild texture
        small = rng.integers(0, 256, size=(4 + label % 4, 5 + label % 3, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        arr = arr + rng.normal(0, 12, size=arr.shape).astype(np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        img.save(folder / f"{wnid}_{folder.parent.name}_{i:05d}.JPEG", quality=quality)
    return count


def make_synthetic_folder(
    root: str | os.PathLike,
    *,
    classes: int = 8,
    train_per_class: int = 96,
    val_per_class: int = 8,
    size: int = 400,
    quality: int = 90,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write root/{train,val}/<wnid>/*.JPEG with photo-like content (~40 KB at 400 px); returns root.

    Class folders take the first `classes` WNIDs of fastkd's ImageNet-100 list when fastkd is
    importable (so `fastkd pack --classes all` and ImageNet-index slicing both work), else
    synthetic `n9000000k` names. Longer sides vary in [0.75, 1] x `size`, with mixed aspect
    ratios. One process per class folder, up to `workers` (default: all cores).
    """
    try:
        from fastkd.resources import imagenet100_wnids

        wnids = list(imagenet100_wnids())[:classes]
    except Exception:  # fastkd not importable: any name pattern works for `--classes all`
        wnids = []
    wnids += [f"n{90000000 + i:08d}" for i in range(len(wnids), classes)]
    root = Path(root)
    jobs = [(root / split / wnid, wnid, label, k, count, size, quality, seed)
            for k, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class)))
            for label, wnid in enumerate(wnids) if count > 0]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        for job in jobs:
            _write_class(job)
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_class, jobs)
    return root


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark helpers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    synth = sub.add_parser("synth-folder", help="write an ImageNet-style folder of synthetic JPEGs")
    synth.add_argument("out")
    synth.add_argument("--classes", type=int, default=8)
    synth.add_argument("--train", type=int, default=96, help="train images per class")
    synth.add_argument("--val", type=int, default=8, help="val images per class")
    synth.add_argument("--size", type=int, default=400, help="longer side, roughly")
    synth.add_argument("--seed", type=int, default=0)
    sub.add_parser("machine", help="print machine_info() as JSON")
    args = parser.parse_args(argv)
    if args.cmd == "synth-folder":
        t0 = time.perf_counter()
        make_synthetic_folder(args.out, classes=args.classes, train_per_class=args.train,
                              val_per_class=args.val, size=args.size, seed=args.seed)
        n = args.classes * (args.train + args.val)
        print(f"wrote {n} JPEGs under {args.out} in {time.perf_counter() - t0:.1f} s")
    elif args.cmd == "machine":
        print(json.dumps(machine_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
