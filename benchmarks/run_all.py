"""Run every benchmark that applies on this machine; one JSON, one markdown table, one bar chart.

    python benchmarks/run_all.py                 # full sizes; results/<date>-<device>/
    python benchmarks/run_all.py --quick         # tiny sizes (CPU smoke run, a minute or two)
    python benchmarks/run_all.py --only step,e2e --out /tmp/r
    # merge JSONs some other script already wrote (benchmarks/gpu_check.sh does this):
    python benchmarks/run_all.py --collect DIR_OF_JSONS --out benchmarks/results/2026-11-26-nvidia-h100

Each benchmark runs in its own subprocess with `--json`, under its own timeout; a missing script,
a non-zero exit or a timeout is recorded as that benchmark's status and the others still run.
Writes under the output folder (default `benchmarks/results/<UTC date>-<device>/`):

    results.json   {"machine", "command", "benchmarks": {name: {status, rc, seconds, command,
                    result (the benchmark's own JSON)}}, "goals": [...], "stages": [...]}
    results.md     per benchmark: status, command, its rows as a table; goals and headline first
    results.png    bar chart of each benchmark's headline numbers (one panel per benchmark)
    logs/NAME.log  each subprocess's stdout + stderr

The loader and e2e benchmarks need a packed directory: `--data PACKED`, else a small synthetic
one is made once in a temporary folder (photo-sized JPEGs, `fastkd pack`) and removed
afterwards unless `--keep-data`. The figures are whatever this machine measured; nothing is
asserted here.

Everything read here is benchmarks/common.py's result schema (`common.read_result`): rows by
name and case, the benchmarks' own headline numbers and goals. A result file that breaks the
schema is recorded as a failed benchmark with the reason; nothing is guessed from other shapes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

ORDER = ("pack", "loader", "loss", "step", "e2e")
SCRIPTS = {
    "pack": "pack_throughput.py",
    "loader": "loader_throughput.py",
    "loss": "loss_kernel.py",
    "step": "step_throughput.py",
    "e2e": "e2e_throughput.py",
}


def bench_args(name: str, *, quick: bool, on_gpu: bool, data: Path | None, src: Path | None) -> list[str]:
    """Arguments for one benchmark (besides --json): flags its docstring documents."""
    if name == "step":
        if quick:
            return ["--res", "32", "--batch", "4", "--steps", "1", "--windows", "2", "--warmup", "1",
                    "--variants", "fp32_nchw,bf16_cl,bf16_cl_fused"]
        return [] if on_gpu else ["--variants", "fp32_nchw,bf16_cl,bf16_cl_fused"]
    if name == "e2e":
        args = ["--data", str(data)] if data else []
        if quick:
            args += ["--res", "32", "--batch", "8", "--steps", "3", "--warmup", "1"]
        elif not on_gpu:
            args += ["--steps", "10", "--warmup", "2"]
        return args
    if name == "loader":
        args = ["--data", str(data)] if data else []
        args += ["--device", "cuda" if on_gpu else "cpu"]
        if quick:
            args += ["--batch-size", "8", "--resolution", "32", "--epochs", "1", "--backends", "folder,torch"]
        return args
    if name == "pack":
        args = ["--src", str(src)] if src else []
        return args + (["--repeats", "1"] if quick else [])
    if name == "loss":
        if quick:
            return ["--device", "cpu", "--warmup", "1", "--iters", "3", "--no-compile"]
        return ["--device", "cuda"] if on_gpu else []
    return []


def run_one(name: str, args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    script = HERE / SCRIPTS[name]
    json_path = out / "json" / f"{name}.json"
    log_path = out / "logs" / f"{name}.log"
    record: dict[str, Any] = {"script": f"benchmarks/{script.name}"}
    if not script.exists():
        return dict(record, status="missing", error=f"{script.name} not in this checkout")
    cmd = [sys.executable, str(script), *args, "--json", str(json_path)]
    record["command"] = " ".join(["python", f"benchmarks/{script.name}", *args, "--json", f"{name}.json"])
    print(f"[run_all] {name}: {record['command']}", flush=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=HERE.parent)
            record["rc"] = proc.returncode
            record["status"] = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            record.update(rc=None, status="timeout")
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["log"] = str(log_path.relative_to(out))
    if json_path.exists():
        try:
            record["result"] = common.read_result(json_path)
        except ValueError as error:
            record["status"] = "failed"
            record["error"] = str(error)[:300]
    elif record["status"] == "ok":
        record["status"] = "failed"
        record["error"] = "exited 0 but wrote no JSON"
    if record["status"] != "ok" and "error" not in record:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        record["error"] = tail[0][:300]
    print(f"[run_all] {name}: {record['status']} in {record['seconds']} s"
          + (f" ({record['error']})" if record.get("error") else ""), flush=True)
    return record


# ----------------------------------------------------------------------------- reporting


def headline_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's own headline numbers (schema key `headline`)."""
    return list(result.get("headline") or [])


def rows_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and not isinstance(v, (list, dict)):
                keys.append(k)
    return common.markdown_table(rows, [(k, k) for k in keys])


def write_markdown(path: Path, summary: dict[str, Any]) -> None:
    m = summary["machine"]
    lines = [f"# fastkd benchmarks, {m.get('gpu') or m.get('cpu')} ({m.get('cpu_count')} CPU cores)", "",
             f"Measured {m.get('date_utc')} on host `{m.get('host')}`: torch {m.get('torch')}, "
             f"CUDA build {m.get('cuda_build')}, Triton {m.get('triton')}, Python {m.get('python')}.",
             f"Command: `{summary['command']}`", ""]
    if summary.get("stages"):
        lines += ["## Stages", "", common.markdown_table(summary["stages"], [("stage", "stage"),
                  ("status", "status"), ("seconds", "s"), ("note", "note")]), ""]
    g = [dict(x, met={True: "yes", False: "NO", None: "-"}[x["met"]]) for x in goals(summary)]
    lines += ["## Goals (benchmarks/README.md)", "", common.markdown_table(g, [("benchmark", "benchmark"),
              ("goal", "goal"), ("measured", "measured"), ("met", "met")]) if g else "(none measured)", "",
              "## Headline", ""]
    heads = []
    for name, rec in summary["benchmarks"].items():
        for h in headline_of(rec.get("result") or {}):
            heads.append(dict(benchmark=name, label=h.get("label"), value=h.get("value"),
                              unit=h.get("unit"), ratio=h.get("ratio")))
        if rec.get("status") != "ok":
            heads.append(dict(benchmark=name, label=rec.get("status"), value=None,
                              unit=(rec.get("error") or "")[:80]))
    lines += [common.markdown_table(heads, [("benchmark", "benchmark"), ("label", "what"),
                                            ("value", "value"), ("unit", "unit"), ("ratio", "ratio")]), ""]
    for name, rec in summary["benchmarks"].items():
        lines += [f"## {name}: {rec.get('status')}", ""]
        if rec.get("command"):
            took = f" ({rec['seconds']} s)" if rec.get("seconds") not in (None, "") else ""
            lines += [f"`{rec['command']}`{took}", ""]
        if rec.get("error"):
            lines += [f"Error: {rec['error']}", ""]
        result = rec.get("result") or {}
        rows = result.get("rows")
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            lines += [rows_table(rows), ""]
        for note in result.get("notes") or []:
            lines.append(f"- {note}")
        lines.append("")
    path.write_text("\n".join(lines))


def write_chart(path: Path, summary: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels: dict[tuple[str, str], list] = {}  # one panel per benchmark and unit: no mixed axes
    for name, rec in summary["benchmarks"].items():
        for h in headline_of(rec.get("result") or {}):
            if isinstance(h.get("value"), (int, float)):
                panels.setdefault((name, str(h.get("unit"))), []).append(h)
    panels = [(f"{name} ({unit})", heads) for (name, unit), heads in panels.items()]
    if not panels:
        return False
    m = summary["machine"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + 0.45 * sum(len(h) for _, h in panels) + 0.6 * len(panels)),
                             squeeze=False)
    for ax, (name, heads) in zip(axes[:, 0], panels):
        labels = [str(h.get("label"))[:48] for h in heads]
        values = [float(h["value"]) for h in heads]
        bars = ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9, loc="left")
        for bar, value in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:,.1f}",
                    va="center", fontsize=7)
        ax.margins(x=0.2)
    fig.suptitle(f"fastkd benchmarks: {m.get('gpu') or m.get('cpu')}, {m.get('date_utc', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def finish(out: Path, summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary["goals"] = goals(summary)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_markdown(out / "results.md", summary)
    chart = write_chart(out / "results.png", summary)
    rows = [dict(benchmark=n, status=r.get("status"), seconds=r.get("seconds"),
                 note=(r.get("error") or "")[:70]) for n, r in summary["benchmarks"].items()]
    common.print_table(rows, [("benchmark", "benchmark"), ("status", "status"), ("seconds", "s"),
                              ("note", "note")], title=f"run_all -> {out}")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'results.png'}" if chart else ""))


def collect(dirs: list[str]) -> dict[str, Any]:
    """{name: record} from JSON files written earlier (name = file stem)."""
    benchmarks: dict[str, Any] = {}
    for d in dirs:
        for path in sorted(Path(d).glob("*.json")):
            try:
                result = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                benchmarks[path.stem] = {"status": "failed", "error": f"{path.name}: {error}"}
                continue
            if isinstance(result, dict) and "benchmarks" in result:
                continue  # a run_all results.json, not one benchmark's result
            errors = common.validate_result(result)
            if errors:
                benchmarks[path.stem] = {"status": "failed", "error": f"{path.name}: not a schema-"
                                         f"{common.SCHEMA} benchmark result: " + "; ".join(errors[:3])}
                continue
            benchmarks[path.stem] = {"status": "ok", "result": result, "command": result.get("command"),
                                     "script": f"benchmarks/{result.get('benchmark', path.stem)}.py"}
    return benchmarks


def read_stages(path: str | None) -> list[dict[str, Any]]:
    """gpu_check.sh's stages.tsv: name, status, seconds, note per line."""
    if not path or not Path(path).exists():
        return []
    stages = []
    for line in Path(path).read_text().splitlines():
        parts = (line.split("\t") + ["", "", "", ""])[:4]
        if parts[0]:
            stages.append(dict(stage=parts[0], status=parts[1], seconds=parts[2], note=parts[3]))
    return stages


def goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every benchmark's own goals (schema key `goals`), tagged with the benchmark's name."""
    return [dict(g, benchmark=name) for name, rec in summary.get("benchmarks", {}).items()
            for g in (rec.get("result") or {}).get("goals") or []]


def pivot(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Measured rows as a table: names down, cases across, "value (ratio x)" in the cells."""
    ok = [r for r in rows if r.get("status") == "ok"]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    table = []
    for name in dict.fromkeys(r["name"] for r in ok):
        cells = {"name": name}
        for r in ok:
            if r["name"] == name:
                ratio = f" ({r['ratio']:.2f}x)" if r.get("ratio") is not None else ""
                cells[r["case"]] = f"{r['value']:,.{0 if r['value'] >= 100 else 2}f}{ratio}"
        table.append(cells)
    unit = ok[0]["unit"] if ok else ""
    return table, [("name", "name")] + [(c, c or unit) for c in cases]


def print_summary(summary: dict[str, Any]) -> None:
    """The short table gpu_check.sh prints last: stages, then goals."""
    m = summary.get("machine", {})
    print(f"machine: {m.get('gpu') or m.get('cpu')} | torch {m.get('torch')} | Triton {m.get('triton')} | "
          f"{m.get('date_utc')}")
    if summary.get("stages"):
        common.print_table(summary["stages"], [("stage", "stage"), ("status", "status"), ("seconds", "s"),
                                               ("note", "note")], title="gpu_check stages")
    for name, rec in summary.get("benchmarks", {}).items():
        rows = (rec.get("result") or {}).get("rows") or []
        table, columns = pivot(rows)
        if table:
            unit = next(r["unit"] for r in rows if r.get("status") == "ok")
            common.print_table(table, columns, title=f"{name}: {unit} (x baseline)")
    rows = [dict(g, met={True: "yes", False: "NO", None: "-"}[g["met"]]) for g in goals(summary)]
    if rows:
        common.print_table(rows, [("benchmark", "benchmark"), ("goal", "goal"), ("measured", "measured"),
                                  ("met", "met")], title="goals (benchmarks/README.md)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<date>-<device>)")
    p.add_argument("--only", default=",".join(ORDER), help="comma list of " + ", ".join(ORDER))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not figures to quote")
    p.add_argument("--data", default=None, help="packed directory for the loader and e2e benchmarks")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    p.add_argument("--collect", nargs="+", default=None, metavar="DIR",
                   help="run nothing: merge the *.json results found in these folders")
    p.add_argument("--stages", default=None, help="with --collect: gpu_check.sh's stages.tsv")
    p.add_argument("--summary", default=None, metavar="RESULTS_JSON",
                   help="run nothing: print the stage and goal table of a results.json")
    args = p.parse_args(argv)
    if args.summary:
        print_summary(json.loads(Path(args.summary).read_text()))
        return 0

    import torch

    on_gpu = torch.cuda.is_available()
    machine = common.machine_info("cuda" if on_gpu else "cpu")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else HERE / "results" / f"{date}-{common.device_slug(machine)}"
    summary: dict[str, Any] = {"machine": machine, "command": common.command_line(), "benchmarks": {}}

    if args.collect:
        summary["benchmarks"] = collect(args.collect)
        summary["stages"] = read_stages(args.stages)
        for st in summary["stages"]:  # a stage named like a benchmark gives its wall time
            if st["stage"] in summary["benchmarks"]:
                summary["benchmarks"][st["stage"]]["seconds"] = st["seconds"]
        for rec in summary["benchmarks"].values():  # the measuring machine, not the merging one
            if (rec.get("result") or {}).get("machine"):
                summary["machine"] = rec["result"]["machine"]
                break
        finish(out, summary)
        return 0

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in SCRIPTS:
            p.error(f"--only: unknown benchmark {n!r}; choose from {', '.join(ORDER)}")
    data = Path(args.data) if args.data else None
    src = None
    work = Path(tempfile.mkdtemp(prefix="fastkd-run-all-"))  # never inside the repository
    if data is None and {"loader", "e2e", "pack"} & set(names):
        try:
            import e2e_throughput

            per_class, size = (12, 96) if args.quick else (96, 400)
            t0 = time.perf_counter()
            data = e2e_throughput.make_packed(work / "packed", classes=8, per_class=per_class, size=size,
                                              formats=e2e_throughput.available_formats())
            src = work / "packed-src"
            print(f"[run_all] packed synthetic data in {time.perf_counter() - t0:.0f} s: {data}", flush=True)
        except Exception as error:  # no packer yet: benchmarks needing data record their own failure
            print(f"[run_all] could not make packed data ({type(error).__name__}: {error})", flush=True)
            data = None

    for name in names:
        try:
            args_ = bench_args(name, quick=args.quick, on_gpu=on_gpu, data=data, src=src)
            summary["benchmarks"][name] = run_one(name, args_, out, args.timeout)
        except Exception as error:  # a broken benchmark never stops the others
            summary["benchmarks"][name] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    if args.keep_data:
        print(f"[run_all] packed data kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    finish(out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
