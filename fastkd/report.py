"""Run reporting: metrics.jsonl, the rich live display, the final table, report.json/.md + plots.

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_rank0)
    log.write({"kind": "step", "epoch": 0, "step": 50, "lr": 0.1, "images_per_s": 900.0,
               "loss": 2.1, "ce": {"resnet18": 1.0, "mobilenet_v2": 1.1}, ...})
    log.write({"kind": "eval", "epoch": 0, "step": 200, **evaluate(...)})
    with LiveDisplay(enabled=is_rank0, total_epochs=16) as live:
        live.start_epoch(epoch, total_steps)
        live.update(step_in_epoch, {"loss": 2.1, "lr": 0.1}, images_per_s)
        live.end_epoch(eval_res)
    write_report(run_dir, summary)     # report.json, report.md, plots/*.png
    Console().print(summary_table(summary))

metrics.jsonl records (one JSON object per line; the reader tolerates a cut-off last line and, on
resume, keeps the latest record for a repeated (kind, epoch, step)):

- `{"kind": "step", "epoch", "step" (global optimizer step), "lr", "images_per_s", "loss", ...}`:
  every other number, list (one value per student) or {network: number} dict is a loss part
  (`ce`, `kd`, `peer`, ...) and is drawn on the loss plot.
- `{"kind": "eval", "epoch", "step", <network>: {"top1", "top5", "loss", "ece", "reliability"},
  "teacher": {...}, "teacher_w": {"mean", "hist", "edges"}}`: what `fastkd.evaluate.evaluate`
  returns, spread into the record (a nested "results" dict is accepted too).

`summary` (input of write_report / summary_table):
`{"method", "networks": {name: {"arch", "params", "compression", "top1", "top5", "best_top1"}},
"teacher": {"arch", "params", "top1", "top5"} | None, "images_per_s", "wall_time_s",
"config": {...}}`; a missing "compression" is computed as teacher params / network params.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import fastkd
from fastkd.atomic import atomic_write_bytes

PLOT_NAMES = ("loss", "accuracy", "w_hist", "reliability")


# ----------------------------------------------------------------------------- small helpers


def _is_rank0() -> bool:
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except ImportError:  # torch is always there in fastkd; keep the reporter importable anyway
        return True


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy scalars/arrays, paths and dataclass-likes -> plain JSON values."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


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


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_number(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Concise 'loss 1.234 ce 0.51/0.62 lr 0.1' from numbers, lists and {net: number} dicts."""
    parts = []
    for key, value in metrics.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, Mapping):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            nums = [v for v in value if isinstance(v, (int, float))]
            if nums:
                parts.append(f"{key} " + "/".join(_fmt_number(float(v)) for v in nums))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {_fmt_number(float(value))}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """Append-only JSON-lines log, flushed after every record; a no-op where `enabled` is False.

    enabled=None means "rank 0" (or no torch.distributed). The file is opened in append mode, so
    a resumed run continues the same log; `read_metrics` keeps the latest of repeated records.
    A "time" (Unix seconds) is added to records that have none.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool | None = None):
        self.path = Path(path)
        self.enabled = _is_rank0() if enabled is None else bool(enabled)
        self._file: IO[str] | None = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        record = dict(record)
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record, default=to_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl in order; unreadable lines (a cut-off last line) are skipped and
    a record repeated after a resume (same kind, epoch, step) replaces the earlier one."""
    path = Path(path)
    if not path.exists():
        return []
    records: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            kind = record.get("kind")
            if kind in ("step", "eval") and "epoch" in record:
                key = (kind, record.get("epoch"), record.get("step"))
            else:
                key = ("line", i)
            records.pop(key, None)  # re-insert so order follows the latest write
            records[key] = record
    return list(records.values())


def eval_networks(record: Mapping[str, Any]) -> dict[str, dict]:
    """{network: metrics} of an eval record (teacher included, teacher_w excluded)."""
    source = record.get("results") if isinstance(record.get("results"), Mapping) else record
    return {
        name: value
        for name, value in source.items()
        if isinstance(value, Mapping) and "top1" in value
    }


def teacher_w_of(record: Mapping[str, Any]) -> dict | None:
    source = record.get("results") if isinstance(record.get("results"), Mapping) else record
    w = source.get("teacher_w")
    return w if isinstance(w, Mapping) and "hist" in w else None


# ----------------------------------------------------------------------------- live display


class LiveDisplay:
    """Per-epoch rich progress bar (images/s, ETA, losses, lr) on a terminal; otherwise one concise
    line per `update` (the trainer calls it at its log interval). A no-op where `enabled` is False
    (enabled=None means rank 0)."""

    def __init__(
        self,
        enabled: bool | None = None,
        total_epochs: int | None = None,
        console: Console | None = None,
        file: IO[str] | None = None,
    ):
        self.enabled = _is_rank0() if enabled is None else bool(enabled)
        self.total_epochs = total_epochs
        self.file = file if file is not None else sys.stdout
        self.console = console or Console(file=self.file)
        self.interactive = self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._epoch = 0
        self._total_steps = 0
        self._epoch_start = 0.0
        self._last: dict[str, Any] = {}
        self._last_ips = 0.0

    # context manager: the rich Progress lives for the whole fit
    def __enter__(self) -> LiveDisplay:
        if self.enabled and self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[ips]} img/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _epoch_label(self) -> str:
        total = f"/{self.total_epochs}" if self.total_epochs else ""
        return f"epoch {self._epoch + 1}{total}"

    def start_epoch(self, epoch: int, total_steps: int) -> None:
        """epoch is 0-based (shown 1-based); total_steps: optimizer steps in this epoch."""
        if not self.enabled:
            return
        self._epoch, self._total_steps = epoch, total_steps
        self._epoch_start = time.perf_counter()
        self._last, self._last_ips = {}, 0.0
        if self._progress is not None:
            self._task = self._progress.add_task(self._epoch_label(), total=total_steps, ips="-", info="")

    def update(self, step: int, metrics: Mapping[str, Any], images_per_s: float | None = None) -> None:
        """step: optimizer steps done so far in this epoch; metrics: loss parts, lr, ..."""
        if not self.enabled:
            return
        self._last, self._last_ips = dict(metrics), images_per_s or 0.0
        ips = f"{images_per_s:,.0f}" if images_per_s else "-"
        info = format_metrics(metrics)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, ips=ips, info=info)
            return
        elapsed = time.perf_counter() - self._epoch_start
        eta = elapsed / step * (self._total_steps - step) if step else float("nan")
        print(
            f"{self._epoch_label()} step {step}/{self._total_steps} | {info} | {ips} img/s"
            f" | eta {format_duration(eta)}",
            file=self.file,
            flush=True,
        )

    def end_epoch(self, eval_res: Mapping[str, Any] | None = None) -> None:
        """Close the epoch's bar and print one line: time, last losses, val top-1/top-5, w."""
        if not self.enabled:
            return
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        elapsed = time.perf_counter() - self._epoch_start
        line = f"{self._epoch_label()} done in {format_duration(elapsed)}"
        losses = format_metrics({k: v for k, v in self._last.items() if k != "lr"})
        if losses:
            line += f" | train {losses}"
        if eval_res:
            nets = eval_networks(eval_res)
            if nets:
                line += " | val " + ", ".join(
                    f"{name} {m['top1']:.2f}/{m.get('top5', float('nan')):.2f}" for name, m in nets.items()
                )
            w = teacher_w_of(eval_res)
            if w is not None:
                line += f" | w {w['mean']:.3f}"
        self.print(line)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, highlight=False, markup=False)
        else:
            print(message, file=self.file, flush=True)


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


def summary_table(summary: Mapping[str, Any]) -> Table:
    """rich Table: network, arch, params, compression vs teacher, top-1, top-5, best top-1 (%)."""
    summary = fill_compression(summary)
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
    teacher = summary.get("teacher")
    if teacher:
        table.add_row(
            "teacher",
            str(teacher.get("arch", "-")),
            format_params(teacher.get("params")),
            "1.00x",
            _pct(teacher.get("top1")),
            _pct(teacher.get("top5")),
            "-",
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
    if report.get("wall_time_s") is not None:
        lines.append(f"- wall time: {format_duration(report['wall_time_s'])} ({report['wall_time_s']:.1f} s)")
    lines += [
        "",
        "| network | arch | params | compression vs teacher | top-1 % | top-5 % | best top-1 % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    if teacher:
        lines.append(
            f"| teacher | {teacher.get('arch', '-')} | {format_params(teacher.get('params'))} | 1.00x"
            f" | {_pct(teacher.get('top1'))} | {_pct(teacher.get('top5'))} | - |"
        )
    for name, net in nets.items():
        comp = net.get("compression")
        lines.append(
            f"| {name} | {net.get('arch', '-')} | {format_params(net.get('params'))}"
            f" | {f'{comp:.2f}x' if comp else '-'} | {_pct(net.get('top1'))} | {_pct(net.get('top5'))}"
            f" | {_pct(net.get('best_top1'))} |"
        )
    lines.append("")
    lines.append("Compression = teacher parameters / network parameters. Accuracies on the val split.")
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
        records = read_metrics(run_dir / "metrics.jsonl")
    report = fill_compression(summary)
    report["fastkd_version"] = fastkd.__version__
    report["config_digest"] = config_digest(report.get("config"))
    report["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    plots = []
    for name, png in render_plots(records, report).items():
        rel = f"plots/{name}.png"
        atomic_write_bytes(run_dir / rel, png)
        plots.append(rel)
    report["plots"] = plots
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, default=to_jsonable) + "\n")
    atomic_write_text(run_dir / "report.md", _markdown(report, plots))
    return report
