"""The end of a run: the summary table and report.json, report.md, plots/*.png.

    write_report(run_dir, summary)     # report.json, report.md, plots/*.png
    print_table(summary_table(summary))  # fastkd.tables: at its natural width

`summary` (`fastkd.train.Trainer.summary()`; input of write_report / summary_table):
`{"method", "networks": {name: {"arch", "params", "compression", "top1", "top5", "best_top1"}
(+ "ema_top1", "ema_top5", "ema_best_top1" with an EMA of the students)}, "teacher": {"arch", "params", "top1", "top5"} | None, "images_per_s", "wall_time_s",
"config": {...}}` plus whatever else the trainer adds (kept as is in report.json); a missing
"compression" is computed as teacher params / network params. The plots come from the run's
metrics.jsonl (schema and reader in fastkd.metrics; drawing in fastkd.report_plots).

MetricsLog, read_metrics, eval_networks, teacher_w_of, to_jsonable (fastkd.metrics) and
LiveDisplay, format_duration, format_metrics (fastkd.live) are re-exported here for older imports.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.table import Table

import fastkd
from fastkd.atomic import atomic_write_bytes
from fastkd.live import LiveDisplay, format_duration, format_metrics
from fastkd.metrics import MetricsLog, eval_networks, read_metrics, teacher_w_of, to_jsonable
from fastkd.run_layout import PLOTS_DIR, RunLayout

__all__ = [
    "PLOT_NAMES", "LiveDisplay", "MetricsLog", "config_digest", "eval_networks", "fill_compression",
    "format_duration", "format_metrics", "format_params", "has_ema", "read_metrics", "summary_table",
    "teacher_w_of", "to_jsonable", "write_report",
]

PLOT_NAMES = ("loss", "accuracy", "w_hist", "reliability")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def config_digest(config: Mapping | None) -> str:
    """sha256 (first 16 hex digits) of the config as canonical JSON."""
    canonical = json.dumps(config or {}, sort_keys=True, default=to_jsonable, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def format_params(n: int | float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(int(n))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------- summary


def fill_compression(summary: Mapping[str, Any]) -> dict:
    """Copy of summary where every network has "compression" = teacher params / its params."""
    summary = json.loads(json.dumps(summary, default=to_jsonable))
    teacher = summary.get("teacher") or {}
    t_params = teacher.get("params")
    for net in summary.get("networks", {}).values():
        if net.get("compression") is None and t_params and net.get("params"):
            net["compression"] = t_params / net["params"]
    return summary


def has_ema(summary: Mapping[str, Any]) -> bool:
    """Whether the run averaged its students (the EMA columns are shown then only)."""
    return any("ema_top1" in net for net in summary.get("networks", {}).values())


def summary_table(summary: Mapping[str, Any]) -> Table:
    """rich Table: network, arch, params, compression vs teacher, top-1, top-5, best top-1 (%),
    and with an EMA, its top-1 and best top-1. Print it with fastkd.tables.print_table."""
    summary = fill_compression(summary)
    ema = has_ema(summary)
    title = f"fastkd {summary.get('method', '')}".strip()
    extra = []
    if summary.get("images_per_s"):
        extra.append(f"{summary['images_per_s']:,.0f} img/s")
    if summary.get("wall_time_s") is not None:
        extra.append(f"wall {format_duration(summary['wall_time_s'])}")
    extra.append("val accuracy in %")
    table = Table(title=title, caption=" · ".join(extra))
    table.add_column("network")
    table.add_column("arch")
    table.add_column("params", justify="right")
    table.add_column("compression", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_column("best", justify="right")
    if ema:
        table.add_column("EMA top-1", justify="right")
        table.add_column("EMA best", justify="right")
    teacher = summary.get("teacher")
    if teacher:
        table.add_row(
            "teacher",
            str(teacher.get("arch", "-")),
            format_params(teacher.get("params")),
            "1.00x",
            _pct(teacher.get("top1")),
            _pct(teacher.get("top5")),
            *["-"] * (3 if ema else 1),
            style="dim",
        )
    for name, net in summary.get("networks", {}).items():
        comp = net.get("compression")
        table.add_row(
            name,
            str(net.get("arch", "-")),
            format_params(net.get("params")),
            f"{comp:.2f}x" if comp else "-",
            _pct(net.get("top1")),
            _pct(net.get("top5")),
            _pct(net.get("best_top1")),
            *([_pct(net.get("ema_top1")), _pct(net.get("ema_best_top1"))] if ema else []),
        )
    return table


def _markdown(report: Mapping[str, Any], plots: list[str]) -> str:
    nets = report.get("networks", {})
    teacher = report.get("teacher")
    lines = [
        f"# fastkd run report: {report.get('method', '?')}",
        "",
        f"- method: `{report.get('method', '?')}`",
        f"- fastkd version: {report['fastkd_version']}",
        f"- config digest (sha256): `{report['config_digest']}`",
        f"- created: {report['created']}",
    ]
    if report.get("images_per_s") is not None:
        lines.append(f"- throughput: {report['images_per_s']:,.0f} images/s (training)")
    if report.get("val_pipeline"):
        lines.append(f"- val pipeline: {report['val_pipeline']}")
    if report.get("compile_mode"):
        lines.append(f"- step: compile mode `{report['compile_mode']}`")
    if report.get("compile_s"):
        parts = ", ".join(f"{sec:.1f} s at {res} px" for res, sec in report["compile_s"].items())
        lines.append(f"- compiling the step (before training, not in the throughput): {parts}")
    if report.get("wall_time_s") is not None:
        lines.append(f"- wall time: {format_duration(report['wall_time_s'])} ({report['wall_time_s']:.1f} s)")
    ema = has_ema(report)
    ema_heads = " EMA top-1 % | EMA best top-1 % |" if ema else ""
    lines += [
        "",
        "| network | arch | params | compression vs teacher | top-1 % | top-5 % | best top-1 % |" + ema_heads,
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if ema else ""),
    ]
    if teacher:
        lines.append(
            f"| teacher | {teacher.get('arch', '-')} | {format_params(teacher.get('params'))} | 1.00x"
            f" | {_pct(teacher.get('top1'))} | {_pct(teacher.get('top5'))} | - |" + (" - | - |" if ema else "")
        )
    for name, net in nets.items():
        comp = net.get("compression")
        ema_cells = f" {_pct(net.get('ema_top1'))} | {_pct(net.get('ema_best_top1'))} |" if ema else ""
        lines.append(
            f"| {name} | {net.get('arch', '-')} | {format_params(net.get('params'))}"
            f" | {f'{comp:.2f}x' if comp else '-'} | {_pct(net.get('top1'))} | {_pct(net.get('top5'))}"
            f" | {_pct(net.get('best_top1'))} |" + ema_cells
        )
    lines.append("")
    lines.append("Compression = teacher parameters / network parameters. Accuracies on the val split.")
    if ema:
        lines.append("EMA: the exponential moving average of each student's weights, evaluated alike.")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    if report.get("config"):
        lines += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2, default=to_jsonable), "```"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | os.PathLike, summary: Mapping[str, Any], records: list[dict] | None = None) -> dict:
    """Write run_dir/report.json, report.md and plots/{loss,accuracy,w_hist,reliability}.png.

    The plots come from run_dir/metrics.jsonl (or `records`); a plot with no data (w_hist
    without a teacher) is left out and not listed. Every file is written atomically. Returns
    the report dict (the summary with compression filled in, plus version, digest, plot list).
    """
    from fastkd.report_plots import render_plots  # matplotlib only when a report is written

    run_dir = Path(run_dir)
    if records is None:
        records = read_metrics(RunLayout(run_dir).metrics)
    report = fill_compression(summary)
    report["fastkd_version"] = fastkd.__version__
    report["config_digest"] = config_digest(report.get("config"))
    report["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    plots = []
    for name, png in render_plots(records, report).items():
        rel = f"{PLOTS_DIR}/{name}.png"
        atomic_write_bytes(run_dir / rel, png)
        plots.append(rel)
    report["plots"] = plots
    atomic_write_text(RunLayout(run_dir).report_json, json.dumps(report, indent=2, default=to_jsonable) + "\n")
    atomic_write_text(RunLayout(run_dir).report_md, _markdown(report, plots))
    return report


def report_arch(name: str) -> str:
    """An architecture as the report names it: torchvision's by name (resnet18), timm's with its
    zoo (timm:resnet10t, also when the config said plain resnet10t); a user's own module keeps
    its class name."""
    from fastkd.errors import FastKDError
    from fastkd.models import arch_label

    try:
        return arch_label(name).removeprefix("torchvision:")
    except FastKDError:
        return name
