"""The live progress display of a training run on rank 0: a rich bar per epoch with images/s,
elapsed time, ETA, the latest losses and lr; one plain line per update when stdout is no terminal
(logs, CI), and one summary line per finished epoch (train losses, val top-1/top-5, mean w).
Its lines go out through fastkd.notes.show; while the bar is drawn, fastkd.notes.say prints the
run's notes above it (the bar draws on fastkd.notes.console() unless given a console).

    with LiveDisplay(enabled=is_rank0, total_epochs=16) as live:
        live.start_epoch(epoch, total_steps)
        live.update(step_in_epoch, {"loss": 2.1, "lr": 0.1}, images_per_s)
        live.end_epoch(eval_res)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Mapping
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

from fastkd.metrics import eval_networks, is_rank0, teacher_w_of
from fastkd.notes import drawing, show
from fastkd.notes import console as shared_console


def format_duration(seconds: float | None) -> str:
    """'1:02:03' (with hours) or '2:03'; '-' for None/inf/nan."""
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
        self.enabled = is_rank0() if enabled is None else bool(enabled)
        self.total_epochs = total_epochs
        self.file = file if file is not None else sys.stdout
        self.console = console or (Console(file=file) if file is not None else shared_console())
        self.interactive = self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._epoch = 0
        self._total_steps = 0
        self._epoch_start = 0.0
        self._last: dict[str, Any] = {}
        self._last_ips = 0.0
        self._drawing = contextlib.ExitStack()

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
            self._drawing.enter_context(drawing(self.console))  # notes go above the bar
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._drawing.close()

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
        show(f"{self._epoch_label()} step {step}/{self._total_steps} | {info} | {ips} img/s"
             f" | eta {format_duration(eta)}", file=self.file)

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
        """A line above the bar (or on `file`, stdout by default, without one); nothing where
        disabled. Never wrapped: a path stays copy-pasteable (fastkd.notes.show)."""
        if self.enabled:
            show(message, file=self.console.file if self._progress is not None else self.file)
