"""PNG plots of a run from its metrics.jsonl records (matplotlib, Agg canvas, no pyplot state).

render_plots(records, report) -> {"loss": png_bytes, "accuracy": ..., "w_hist": ..., "reliability": ...}
A plot whose data is absent (no teacher -> no w histogram) is left out of the dict.

Series read from the records (schema in fastkd.metrics):
- loss:        step records' `loss`, `ce`, `kd`, `peer` and any key containing "loss" (numbers,
               per-student lists or {network: number} dicts) against the global step; val CE
               per network against epochs from eval records.
- accuracy:    val top-1 (solid) and top-5 (dashed) per network per eval; the teacher as a
               horizontal line; step records' `train_top1` ({network: percent}) as thin lines.
- w_hist:      the latest eval record's `teacher_w` histogram, with its mean.
- reliability: the latest eval record's reliability data per network, with its ECE.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fastkd.metrics import eval_networks, teacher_w_of

LOSS_KEYS = ("loss", "ce", "kd", "peer")
META_KEYS = ("kind", "epoch", "step", "lr", "images_per_s", "time", "samples", "world_size")
DPI = 110


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _flatten(key: str, value: Any) -> dict[str, float]:
    """'ce': 1.0 -> {'ce': 1.0}; [a, b] -> {'ce[0]', 'ce[1]'}; {'r18': a} -> {'ce r18'}."""
    if _is_number(value):
        return {key: float(value)}
    if isinstance(value, (list, tuple)):
        return {f"{key}[{i}]": float(v) for i, v in enumerate(value) if _is_number(v)}
    if isinstance(value, Mapping):
        return {f"{key} {k}": float(v) for k, v in value.items() if _is_number(v)}
    return {}


def _step_x(steps: list[dict]) -> tuple[list[float], str]:
    """Global step if it never goes backwards, else epoch + fraction of the epoch's steps."""
    raw = [r.get("step") for r in steps]
    if all(_is_number(s) for s in raw) and all(b >= a for a, b in zip(raw, raw[1:])):
        return [float(s) for s in raw], "optimizer step"
    per_epoch: dict[int, int] = {}
    for r in steps:
        per_epoch[r.get("epoch", 0)] = max(per_epoch.get(r.get("epoch", 0), 0), int(r.get("step") or 0))
    xs = []
    for i, r in enumerate(steps):
        e, s = r.get("epoch"), r.get("step")
        if _is_number(e) and _is_number(s) and per_epoch.get(e):
            xs.append(e + s / per_epoch[e])
        else:
            xs.append(float(i))
    return xs, "epoch"


def _epoch_x(steps: list[dict]) -> list[float]:
    """Fractional epochs trained at each step record: epoch e spans the global steps after the
    last record of epoch e-1 up to its own last record (the trainer logs each epoch's end)."""
    end: dict[int, float] = {}
    for r in steps:
        if _is_number(r.get("epoch")) and _is_number(r.get("step")):
            end[r["epoch"]] = max(end.get(r["epoch"], 0.0), r["step"])
    xs = []
    for r in steps:
        e, s = r.get("epoch"), r.get("step")
        if not (_is_number(e) and _is_number(s)):
            xs.append(float("nan"))
            continue
        lo = end.get(e - 1, 0.0) if e > 0 else 0.0
        hi = end[e]
        xs.append(e + (s - lo) / (hi - lo) if hi > lo else e + 1.0)
    return xs


def _series(steps: list[dict], keep) -> dict[str, tuple[list[float], list[float]]]:
    xs, _ = _step_x(steps)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for x, record in zip(xs, steps):
        for key, value in record.items():
            if key in META_KEYS or not keep(key):
                continue
            for name, v in _flatten(key, value).items():
                out.setdefault(name, ([], []))
                out[name][0].append(x)
                out[name][1].append(v)
    return out


def _is_loss_key(key: str) -> bool:
    return key in LOSS_KEYS or "loss" in key


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _network_colors(names) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def plot_loss(steps: list[dict], evals: list[dict], method: str) -> bytes | None:
    train = _series(steps, _is_loss_key) if steps else {}
    val: dict[str, tuple[list[float], list[float]]] = {}
    for record in evals:
        for name, m in eval_networks(record).items():
            if _is_number(m.get("loss")) and _is_number(record.get("epoch")):
                val.setdefault(name, ([], []))
                val[name][0].append(record["epoch"] + 1)
                val[name][1].append(m["loss"])
    if not train and not val:
        return None
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    if train:
        _, xlabel = _step_x(steps)
        for name, (xs, ys) in sorted(train.items(), key=lambda kv: (kv[0] != "loss", kv[0])):
            ax_train.plot(xs, ys, label=name, linewidth=2.2 if name == "loss" else 1.3)
        values = [v for _, ys in train.values() for v in ys]
        if values and min(values) > 0 and max(values) / min(values) > 30:
            ax_train.set_yscale("log")
        ax_train.set_xlabel(xlabel)
        ax_train.legend(fontsize=8, loc="upper right")
    else:
        ax_train.text(0.5, 0.5, "no training steps logged", ha="center", va="center", transform=ax_train.transAxes)
    ax_train.set_ylabel("loss")
    ax_train.set_title("Training loss and its parts")
    ax_train.grid(alpha=0.3)
    colors = _network_colors(val)
    for name, (xs, ys) in val.items():
        ax_val.plot(xs, ys, marker="o", label=name, color=colors[name])
    ax_val.set_xlabel("epochs trained")
    ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_val.set_ylabel("cross-entropy")
    ax_val.set_title("Validation loss")
    ax_val.grid(alpha=0.3)
    if val:
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax_val.transAxes)
    fig.suptitle(f"fastkd {method}: loss curves")
    return _png(fig)


def plot_accuracy(steps: list[dict], evals: list[dict], method: str) -> bytes | None:
    curves: dict[str, dict[str, list[float]]] = {}
    for record in evals:
        if not _is_number(record.get("epoch")):
            continue
        for name, m in eval_networks(record).items():
            c = curves.setdefault(name, {"x": [], "top1": [], "top5": []})
            c["x"].append(record["epoch"] + 1)
            c["top1"].append(m.get("top1", float("nan")))
            c["top5"].append(m.get("top5", float("nan")))
    train: dict[str, tuple[list[float], list[float]]] = {}
    for x, record in zip(_epoch_x(steps), steps):
        for name, v in _flatten("train", record.get("train_top1")).items():
            train.setdefault(name.removeprefix("train "), ([], []))
            train[name.removeprefix("train ")][0].append(x)
            train[name.removeprefix("train ")][1].append(v)
    if not curves and not train:
        return None
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    colors = _network_colors(list(curves) + [n for n in train if n not in curves])
    for name, (xs, ys) in train.items():
        ax.plot(xs, ys, color=colors[name], linewidth=1, alpha=0.5, label=f"{name} train top-1 (window)")
    for name, c in curves.items():
        if name == "teacher":  # frozen: one level, however often it was evaluated
            ax.axhline(c["top1"][-1], color="0.3", linestyle=":", label=f"teacher top-1 ({c['top1'][-1]:.1f})")
            continue
        ax.plot(c["x"], c["top1"], marker="o", color=colors[name], label=f"{name} val top-1")
        ax.plot(c["x"], c["top5"], linestyle="--", color=colors[name], alpha=0.6, label=f"{name} val top-5")
    ax.set_ylim(0, 101)
    ax.set_xlabel("epochs trained")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"fastkd {method}: accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def plot_w_hist(evals: list[dict], method: str) -> bytes | None:
    record = next((r for r in reversed(evals) if teacher_w_of(r)), None)
    if record is None:
        return None
    w = teacher_w_of(record)
    hist, edges = w["hist"], w["edges"]
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(edges[:-1], hist, width=widths, align="edge", color="C0", edgecolor="white", label="val samples")
    ax.axvline(w["mean"], color="C3", linestyle="--", linewidth=2, label=f"mean w = {w['mean']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("teacher confidence weight w(x) = 1 - H(softmax(t/T_w)) / log C")
    ax.set_ylabel("samples")
    epoch = record.get("epoch")
    ax.set_title(f"fastkd {method}: teacher w(x) on val" + (f" (epoch {epoch + 1})" if _is_number(epoch) else ""))
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def plot_reliability(evals: list[dict], method: str) -> bytes | None:
    record = next(
        (r for r in reversed(evals) if any("reliability" in m for m in eval_networks(r).values())), None
    )
    if record is None:
        return None
    nets = {n: m for n, m in eval_networks(record).items() if "reliability" in m}
    cols = min(len(nets), 3)
    rows = math.ceil(len(nets) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = _network_colors(nets)
    for ax, (name, m) in zip(axes, nets.items()):
        rel = m["reliability"]
        count = rel["count"]
        num_bins = len(count)
        edges = rel.get("edges") or [b / num_bins for b in range(num_bins + 1)]
        lefts = [edges[b] for b in range(num_bins) if count[b]]
        widths = [edges[b + 1] - edges[b] for b in range(num_bins) if count[b]]
        acc = [rel["accuracy"][b] for b in range(num_bins) if count[b]]
        conf = [rel["confidence"][b] for b in range(num_bins) if count[b]]
        ax.bar(lefts, acc, width=widths, align="edge", color=colors[name], edgecolor="black",
               linewidth=0.5, label="accuracy")
        # gap between accuracy and mean confidence: hatched outline, over- or under-confident
        ax.bar(lefts, [abs(c - a) for a, c in zip(acc, conf)], bottom=[min(a, c) for a, c in zip(acc, conf)],
               width=widths, align="edge", fill=False, hatch="//", edgecolor="C3", linewidth=0.8,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence (max softmax)")
        ax.set_ylabel("accuracy")
        ece = m.get("ece")
        ax.set_title(f"{name}" + (f"  ECE {100 * ece:.2f} %" if _is_number(ece) else ""))
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in axes[len(nets):]:
        ax.set_visible(False)
    epoch = record.get("epoch")
    fig.suptitle(f"fastkd {method}: reliability diagram" + (f" (epoch {epoch + 1})" if _is_number(epoch) else ""))
    return _png(fig)


def render_plots(records: list[dict], report: Mapping[str, Any]) -> dict[str, bytes]:
    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    method = str(report.get("method", ""))
    made = {
        "loss": plot_loss(steps, evals, method),
        "accuracy": plot_accuracy(steps, evals, method),
        "w_hist": plot_w_hist(evals, method),
        "reliability": plot_reliability(evals, method),
    }
    return {name: png for name, png in made.items() if png is not None}
