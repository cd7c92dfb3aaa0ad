"""The decode-path table: per decode path, the loader alone and end to end, and the
projected ImageNet-100 epoch, from loader_throughput.py and e2e_throughput.py results.

    python benchmarks/decode_table.py loader-160.json loader-192.json e2e-160.json e2e-192.json \
        --out decode_table.md
    python benchmarks/decode_table.py RESULTS_DIR/ --res 160,192     # every *.json in the folder

Inputs: schema-2 results (benchmarks/common.py) of `loader_throughput` and `e2e_throughput`, any
number, at any resolutions; a `jpeg_engines` result (jpeg_engines.py) labels each GPU path's kind
by whether the JPEG engines ran (`nvJPEG CUDA, engines: no`), with the utilisation measured in
lines under the table; other benchmarks' files are ignored. A row's resolution is its `res`
extra (loader rows: else the run's --resolution). Rows (decode paths):

    measured on a GPU    torch = nvJPEG CUDA, nvimgcodec = hardware engines, nvimgcodec-gpu =
                         nvImageCodec's CUDA decoder, torch-host wN / nvimgcodec-cpu / ffcv (and
                         folder) = host cores; the first six are always listed
    measured on a CPU    every backend decodes on the host cores: `NAME (CPU device)` (only
                         the paths with a measurement; the skipped ones are listed below it)
    a host-decode row is labelled with its worker count (`torch-host w15`), so a loader row and
    an e2e row meet only when they ran with the same workers.

Columns per resolution (--res): loader alone img/s, end to end img/s, x synthetic (e2e over the
synthetic row of the same run), waiting (e2e `wait_frac_steady`: time blocked in next() inside
an epoch), and the projected ImageNet-100 epoch in minutes (126,689 images / e2e img/s). A cell
without a measurement of its own reads `not measured` (with --gpu-note on the GPU rows when no
input ran on a GPU); a skipped row's reason is listed under the table. No cell is estimated from
another resolution or another machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

IMAGENET100_TRAIN = 126_689  # ImageNet-100's train images (the epoch projection's base)
NOT_MEASURED = "not measured"
GPU_KINDS = {"torch": "nvJPEG CUDA", "nvimgcodec": "hardware engines", "nvimgcodec-gpu": "nvImageCodec CUDA"}
HOST_KINDS = {"torch-host": "host cores", "nvimgcodec-cpu": "host cores", "ffcv": "host cores",
              "folder": "host cores"}
LISTED = ("torch", "nvimgcodec", "nvimgcodec-gpu", "torch-host", "nvimgcodec-cpu", "ffcv")
MEASURES = (("loader", "loader img/s"), ("e2e", "e2e img/s"), ("x_synthetic", "x synthetic"),
            ("waiting", "waiting"), ("epoch", "IN-100 epoch"))


def epoch_minutes(images_per_s: float) -> float:
    """Minutes of one ImageNet-100 train epoch (126,689 images) at `images_per_s`: a projection."""
    return IMAGENET100_TRAIN / images_per_s / 60


def _split_workers(name: str) -> tuple[str, int | None]:
    """`torch-host w8` -> ("torch-host", 8); a name without a worker count -> (name, None)."""
    base, _, count = name.rpartition(" w")
    return (base, int(count)) if base and count.isdigit() else (name, None)


def path_of(name: str) -> str:
    """Row name -> its decode path: `torch-host w8` -> `torch-host`."""
    return _split_workers(name)[0]


def label(row: dict[str, Any], gpu: bool) -> tuple[str, str]:
    """(table row label, kind) of a result row measured on a GPU (`gpu`) or a CPU device."""
    path = path_of(row["name"])
    workers = row.get("workers")
    host = not gpu or path in HOST_KINDS
    name = f"{path} w{workers}" if host and isinstance(workers, int) else row["name"]
    if not gpu:
        return f"{name} (CPU device)", "host cores (CPU device)"
    return name, GPU_KINDS.get(path) or HOST_KINDS.get(path) or "other"


def _res(row: dict[str, Any], result: dict[str, Any]) -> int | None:
    value = row.get("res", result["params"].get("resolution"))
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def collect(results: list[dict[str, Any]]) -> tuple[dict, list[str], bool]:
    """{(label, kind): {(benchmark, res): row}}, notes on skipped rows, whether any input ran on a GPU."""
    table: dict[tuple[str, str], dict] = {}
    notes, any_gpu = [], False
    for result in results:
        bench = {"loader_throughput": "loader", "e2e_throughput": "e2e"}.get(result.get("benchmark"))
        if bench is None:
            continue
        gpu = common.on_gpu(result["machine"])
        any_gpu |= gpu
        for row in result["rows"]:
            if row["name"] == "synthetic" or row["name"] == "auto":
                continue
            key, res = label(row, gpu), _res(row, result)
            cells = table.setdefault(key, {})
            if row["status"] == "ok":
                cells[(bench, res)] = row
            else:
                notes.append(f"{key[0]}, {bench} at {res} px: {row['status']}: {row.get('error') or ''}".strip())
    return table, notes, any_gpu


def engines(results: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """From jpeg_engines.py results: {decode path: "yes"/"no"/"unknown"}, whether the JPEG
    engines ran while it decoded (GPU runs only: a CPU run measured nothing), and footnote lines
    with the utilisation behind each verdict, wrapped at 60 columns (the table's cells stay short)."""
    import textwrap

    verdicts, lines = {}, []
    for result in results:
        if result.get("benchmark") != "jpeg_engines":
            continue
        gpu = common.on_gpu(result["machine"])
        where = result["machine"].get("gpu") if gpu else "no GPU"
        lines.append(f"JPEG engines while decoding (jpeg_engines.py, {where}):")
        for row in result["rows"]:
            if row["status"] == "ok" and gpu:
                verdicts[row["name"]] = row.get("engines") or "unknown"
                jpg = "-" if row.get("jpg_util_max") is None else f"{row['jpg_util_max']:.0f} %"
                sm = "-" if row.get("sm_util_max") is None else f"{row['sm_util_max']:.0f} %"
                text = f"{row['name']}: {verdicts[row['name']]} (jpg max {jpg}, sm max {sm})"
            else:
                text = f"{row['name']}: not measured ({row['status']}: {row.get('error') or ''})"
            lines += textwrap.wrap(text, 60, initial_indent="- ", subsequent_indent="  ")
    return verdicts, lines


def _cells(cells: dict, res: int, blank: str) -> dict[str, str]:
    loader, e2e = cells.get(("loader", res)), cells.get(("e2e", res))
    out = {f"{m}_{res}": blank for m, _ in MEASURES}
    if loader is not None:
        out[f"loader_{res}"] = f"{loader['value']:,.0f}"
    if e2e is not None:
        out[f"e2e_{res}"] = f"{e2e['value']:,.0f}" if e2e["value"] >= 100 else f"{e2e['value']:.1f}"
        if e2e.get("ratio") is not None:
            out[f"x_synthetic_{res}"] = f"{e2e['ratio']:.2f}"
        if e2e.get("wait_frac_steady") is not None:
            out[f"waiting_{res}"] = f"{100 * e2e['wait_frac_steady']:.1f} %"
        minutes = epoch_minutes(e2e["value"])
        out[f"epoch_{res}"] = f"{minutes:.1f} min" if minutes < 600 else f"{minutes / 60:.1f} h"
    return out


def build(results: list[dict[str, Any]], resolutions=(160, 192), gpu_note: str = "") -> list[dict[str, str]]:
    """The table's rows: {"path", "kind", "<measure>_<res>": cell} (measures: MEASURES)."""
    table, _, any_gpu = collect(results)
    return table_rows(table, any_gpu, resolutions, gpu_note, engines(results)[0])


def table_rows(table: dict, any_gpu: bool, resolutions, gpu_note: str,
               used: dict[str, str] | None = None) -> list[dict[str, str]]:
    """build's rows from collect's table (and whether any input ran on a GPU); `used`: engines()'s
    verdicts, which label a GPU row's kind with what ran (`nvJPEG CUDA, engines: no`)."""
    listed = {path_of(name) for name, _ in table if not name.endswith("(CPU device)")}
    for path in LISTED:  # every decode path of a GPU machine is shown, measured or not
        if path not in listed:
            table[(path, GPU_KINDS.get(path) or HOST_KINDS[path])] = {}
    order = {p: i for i, p in enumerate(LISTED)}
    keys = sorted(table, key=lambda k: (k[0].endswith("(CPU device)"), order.get(path_of(k[0].split(" (")[0]), 99),
                                        _workers_of(k[0])))
    rows = []
    for key in keys:
        gpu_row = not key[0].endswith("(CPU device)")
        if not gpu_row and not table[key]:
            continue  # a path that cannot run on a CPU device: its reason is in the notes
        blank = f"{NOT_MEASURED} ({gpu_note})" if gpu_note and gpu_row and not any_gpu else NOT_MEASURED
        kind = key[1]
        if gpu_row and (used or {}).get(path_of(key[0])):
            kind = f"{kind}, engines: {used[path_of(key[0])]}"
        row = {"path": key[0], "kind": kind}
        for res in resolutions:
            row.update(_cells(table[key], res, blank))
        rows.append(row)
    return rows


def _workers_of(label: str) -> int:
    return _split_workers(label.split(" (")[0])[1] or 0


def columns(resolutions=(160, 192)) -> list[tuple[str, str]]:
    return [("path", "decode path"), ("kind", "decodes on")] + [
        (f"{m}_{r}", f"{header} {r} px") for m, header in MEASURES for r in resolutions]


def markdown(rows: list[dict[str, str]], resolutions=(160, 192)) -> str:
    return common.markdown_table(rows, columns(resolutions))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("inputs", nargs="+", help="result JSON files, or folders of them")
    p.add_argument("--res", type=common.parse_int_list, default=[160, 192], help="resolutions (columns)")
    p.add_argument("--gpu-note", default="no GPU run among the inputs",
                   help="said in the GPU rows' empty cells when no input ran on a GPU")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    paths = [f for i in args.inputs for f in (sorted(Path(i).glob("*.json")) if Path(i).is_dir() else [Path(i)])]
    results, unread = [], []
    for path in paths:
        try:
            results.append(common.read_result(path))
        except ValueError as error:
            unread.append(str(error))
    table, notes, any_gpu = collect(results)
    used, engine_lines = engines(results)
    rows = table_rows(table, any_gpu, args.res, args.gpu_note, used)
    sources = sorted({f"{r['machine'].get('gpu') or r['machine'].get('cpu')} ({r['machine'].get('date_utc')})"
                      for r in results if r.get("benchmark") in ("loader_throughput", "e2e_throughput")})
    text = "\n".join([markdown(rows, args.res), "",
                      f"Measured on: {'; '.join(sources) or 'nothing'}. Waiting = in-epoch time blocked in "
                      f"next(); IN-100 epoch = {IMAGENET100_TRAIN:,} images / e2e img/s (a projection)."]
                     + [f"- skipped: {n}" for n in notes] + [f"- not read: {u}" for u in unread]
                     + ([""] + engine_lines if engine_lines else [])) + "\n"
    print(text, end="")
    if args.out:
        common.write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
