"""Shared helpers for the fastkd benchmarks: machine description, honest timing, tables, the one
result schema, synthetic JPEGs.

Every benchmark script in this folder can `import common` (they run as `python benchmarks/X.py`,
so this folder is on sys.path; tests put it there too). What lives here:

    machine_info(device)          # dict: host, CPU, GPU, torch/CUDA/Triton versions, UTC date
    device_slug(info)             # "nvidia-h100-80gb-hbm3" / "cpu-amd-epyc-2c", for result folders
    time_windows(fn, ...)         # per-window seconds; CUDA events on GPU, warm-up excluded
    print_table / markdown_table  # one table, rich on a terminal, plain text otherwise
    row(), head(), goal(), fill_ratios() # build rows and goals of the schema below
    write_result(path, benchmark, rows, ...) # the JSON every benchmark writes with --json
    validate_result(payload)      # [] or the list of schema violations (run_all.py and tests)
    make_synthetic_folder(root)   # ImageNet-style folder of photo-like JPEGs

The result schema (SCHEMA = 2), written by pack_throughput, loader_throughput, loss_kernel,
step_throughput, e2e_throughput and methods_table, and the only thing run_all.py reads:

    {"schema": 2, "benchmark": "step_throughput", "command": "python benchmarks/...",
     "machine": {...machine_info...}, "params": {...the run's settings...},
     "rows": [ROW, ...], "headline": [HEAD, ...], "goals": [GOAL, ...], "notes": [str, ...]}

    ROW   one measurement. Required keys:
          name      str    what was measured: a variant, backend, implementation or method
          case      str    the condition it was measured under ("160px b256", "cpu B=256 C=100");
                           "" when a benchmark has one condition. (name, case) is unique.
          status    str    "ok", "skipped", "oom" or "failed" (then "error" says why)
          unit      str    unit of value: a rate ends in "/s" (higher is better), "s"/"ms"/"us"
                           are times (lower is better), anything else ("%", "x") is neither
          value     float  the measurement (None unless status is "ok")
          baseline  str    name of the row, in the same case, that `ratio` compares with (None: none)
          ratio     float  speed relative to the baseline, > 1 = faster: value / baseline value for
                           rates, baseline value / value for times (None: no baseline measured)
          Any other keys are free extras (res, batch, tflops, windows_s, ...).
    HEAD  {"label": str, "value": float, "unit": str, "ratio": float|None}: the few numbers a
          summary shows and charts.
    GOAL  {"goal": str, "measured": str, "met": bool|None}: a goal of benchmarks/README.md checked
          against this run (met None: not judged, e.g. a GPU goal measured on a CPU).

Synthetic images: photo-sized JPEGs (smooth colour fields plus texture, so they compress like
photos rather than like noise), for pack/loader/e2e benchmarks on machines without ImageNet:

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

SCHEMA = 2
STATUSES = ("ok", "skipped", "oom", "failed")
TIME_UNITS = ("s", "ms", "us")


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
    """One table on stdout: rich (through fastkd) when importable, aligned plain text otherwise;
    either way at the width its cells need, whatever the terminal's."""
    cells = table_cells(rows, columns)
    try:
        from rich.table import Table

        from fastkd.tables import print_table as print_rich  # at the cells' width, never cut

        table = Table(title=title or None)
        for i, header in enumerate(cells[0]):
            table.add_column(header, justify="left" if i == 0 else "right")
        for r in cells[1:]:
            table.add_row(*r)
        print_rich(table)
        return
    except ImportError:
        pass
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    if title:
        print(title)
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


# ----------------------------------------------------------------------------- result schema


def row(name: str, *, case: str = "", unit: str, value: float | None = None, status: str = "ok",
        baseline: str | None = None, ratio: float | None = None, **extras: Any) -> dict[str, Any]:
    """One ROW of the schema (module docstring); extras go after the required keys."""
    if status not in STATUSES:
        raise ValueError(f"row {name!r}: status {status!r} is not one of {STATUSES}")
    return dict(name=name, case=case, status=status, unit=unit,
                value=None if value is None else float(value), baseline=baseline, ratio=ratio, **extras)


def fill_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each ok row's `ratio` from its `baseline` row in the same case (None when that row was
    not measured): value / base for rates, base / value for times; returns `rows`."""
    ok = {(r["name"], r["case"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        base = ok.get((r.get("baseline"), r.get("case")))
        if r.get("status") != "ok" or base is None or not r["value"] or not base["value"]:
            r["ratio"] = None
            continue
        if base["unit"] != r["unit"]:
            raise ValueError(f"row {r['name']!r} ({r['unit']}) and its baseline {base['name']!r} "
                             f"({base['unit']}) have different units")
        if r["unit"] in TIME_UNITS:
            r["ratio"] = base["value"] / r["value"]
        else:
            r["ratio"] = r["value"] / base["value"]
    return rows


def on_gpu(machine: dict[str, Any]) -> bool:
    return str(machine.get("device") or "").startswith("cuda")


def goal(text: str, measured: str, met: bool | None, machine: dict[str, Any]) -> dict[str, Any]:
    """A GOAL entry; the goals are GPU goals, so a figure measured elsewhere is shown, never judged."""
    if not on_gpu(machine):
        return {"goal": text, "measured": f"{measured} (not a GPU run)", "met": None}
    return {"goal": text, "measured": measured, "met": met}


def validate_result(payload: Any) -> list[str]:
    """Every way `payload` breaks the schema of the module docstring ([] when it follows it)."""
    if not isinstance(payload, dict):
        return ["result is not a JSON object"]
    errors = []
    if payload.get("schema") != SCHEMA:
        errors.append(f"schema is {payload.get('schema')!r}, expected {SCHEMA}")
    for key, kind in (("benchmark", str), ("command", str), ("machine", dict), ("params", dict),
                      ("rows", list), ("headline", list), ("goals", list), ("notes", list)):
        if not isinstance(payload.get(key), kind):
            errors.append(f"{key!r} missing or not a {kind.__name__}")
    number = (int, float)
    seen = set()
    for i, r in enumerate(payload.get("rows") if isinstance(payload.get("rows"), list) else []):
        where = f"rows[{i}]"
        if not isinstance(r, dict):
            errors.append(f"{where} is not an object")
            continue
        for key, kind in (("name", str), ("case", str), ("status", str), ("unit", str)):
            if not isinstance(r.get(key), kind):
                errors.append(f"{where}.{key} missing or not a {kind.__name__}")
        if r.get("status") not in STATUSES:
            errors.append(f"{where}.status {r.get('status')!r} not in {STATUSES}")
        if r.get("status") == "ok" and not (isinstance(r.get("value"), number) and not isinstance(r["value"], bool)):
            errors.append(f"{where}: status ok but value {r.get('value')!r} is not a number")
        if r.get("status") != "ok" and r.get("value") is not None:
            errors.append(f"{where}: status {r.get('status')} but a value")
        for key in ("value", "baseline", "ratio"):
            if key not in r:
                errors.append(f"{where}.{key} missing (None when it does not apply)")
        if r.get("baseline") is not None and not isinstance(r["baseline"], str):
            errors.append(f"{where}.baseline is not a row name")
        if r.get("ratio") is not None and not isinstance(r["ratio"], number):
            errors.append(f"{where}.ratio is not a number")
        key = (r.get("name"), r.get("case"))
        if key in seen:
            errors.append(f"{where}: (name, case) {key} repeated")
        seen.add(key)
    for i, h in enumerate(payload.get("headline") if isinstance(payload.get("headline"), list) else []):
        if not (isinstance(h, dict) and isinstance(h.get("label"), str) and isinstance(h.get("unit"), str)
                and isinstance(h.get("value"), number) and "ratio" in h):
            errors.append(f"headline[{i}] needs label (str), value (number), unit (str), ratio")
    for i, g in enumerate(payload.get("goals") if isinstance(payload.get("goals"), list) else []):
        if not (isinstance(g, dict) and isinstance(g.get("goal"), str) and isinstance(g.get("measured"), str)
                and g.get("met") in (True, False, None)):
            errors.append(f"goals[{i}] needs goal (str), measured (str), met (true/false/null)")
    if not all(isinstance(n, str) for n in payload.get("notes") or []):
        errors.append("notes must be strings")
    return errors


def head(label: str, value: float, unit: str, ratio: float | None = None) -> dict[str, Any]:
    """A HEAD entry of the schema."""
    return {"label": label, "value": float(value), "unit": unit, "ratio": ratio}


def write_result(
    path: str | os.PathLike | None,
    benchmark: str,
    rows: list[dict],
    *,
    machine: dict[str, Any],
    params: dict[str, Any],
    headline: list[dict] | None = None,
    goals: list[dict] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Build the result payload of the schema (module docstring), check it, and when `path` is
    given write it there atomically (temp name, fsync, rename). A payload that breaks the schema
    is a bug in the benchmark: ValueError, nothing written."""
    payload = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "command": command_line(),
        "machine": machine,
        "params": params,
        "rows": rows,
        "headline": headline or [],
        "goals": goals or [],
        "notes": notes or [],
    }
    payload = json.loads(json.dumps(payload, default=str))  # what a reader will see (Paths -> str)
    errors = validate_result(payload)
    if errors:
        raise ValueError(f"{benchmark}: result breaks the benchmark schema: " + "; ".join(errors[:5]))
    if path:
        write_text_atomic(Path(path), json.dumps(payload, indent=2) + "\n")
    return payload


def write_text_atomic(path: Path, text: str) -> None:
    """fastkd.atomic's write when fastkd is importable; else temp name, fsync, rename here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from fastkd.atomic import atomic_write_bytes

        atomic_write_bytes(path, text.encode())
        return
    except ImportError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """A result file, checked: ValueError naming the file and the first violations otherwise."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None
    errors = validate_result(payload)
    if errors:
        raise ValueError(f"{path}: not a schema-{SCHEMA} benchmark result: " + "; ".join(errors[:5]))
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


def cli_main(build_parser, run):
    """A script's `main(argv=None) -> 0`: parse with `build_parser()`, then `run(args)`."""

    def main(argv: list[str] | None = None) -> int:
        run(build_parser().parse_args(argv))
        return 0

    return main


if __name__ == "__main__":
    sys.exit(_main())
