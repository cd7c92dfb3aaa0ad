"""metrics.jsonl: the run's record of every logged step and evaluation, written and read here.

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_rank0)
    log.write({"kind": "step", "epoch": 0, "step": 50, "lr": 0.1, "images_per_s": 900.0,
               "loss": 2.1, "ce": {"resnet18": 1.0, "mobilenet_v2": 1.1}, ...})
    log.write({"kind": "eval", "epoch": 0, "step": 200, **evaluate(...)})
    records = read_metrics(run_dir / "metrics.jsonl")

Records (one JSON object per line, in the order written; "time" = Unix seconds, added by
MetricsLog where missing):

- `{"kind": "step", "epoch", "step", "lr", "images_per_s", "loss", ...}`: "epoch" is 0-based,
  "step" the global optimizer step (1-based count of steps done, over the whole run). Every other
  number, list (one value per student) or {network: number} dict is a loss part (`ce`, `kd`,
  `peer`, ...) and is drawn on the loss plot.
- `{"kind": "eval", "epoch", "step", <network>: {"top1", "top5", "loss", "ece", "reliability"},
  "teacher": {...}, "teacher_w": {"mean", "hist", "edges"}}`: what `fastkd.evaluate.evaluate`
  returns, spread into the record (a nested "results" dict is accepted too). Written after
  `epoch` finished, before the checkpoint of that epoch is saved.
- any other "kind" is kept by the reader as is.

Sinks: `MetricsLog(path, enabled, sinks=[...])` hands every record it writes, after the line is
flushed, to each sink's `write(record)` (the same dict, "time" included); metrics.jsonl stays the
record of truth and the sinks (TensorBoard, W&B: fastkd.loggers) only mirror it. A sink that raises
is reported once on stderr and dropped for the rest of the run, so a logger never stops training.

A resumed run appends to the same file. Its checkpoint stands at (epochs done E, global step G);
records past that point (written before a kill -9 and about to be written again) are removed with
`truncate_metrics(path, G, E)` before appending. `read_metrics` also keeps only the latest of
records repeated for one (kind, epoch, step), and skips unreadable lines (a line cut off by a
kill), so a reader never sees a step twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

from fastkd.atomic import atomic_write_bytes
from fastkd.notes import say


def is_rank0() -> bool:
    """True on rank 0 of torch.distributed, or when no process group is initialised."""
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except ImportError:  # torch is always there in fastkd; keep the reporter importable anyway
        return True


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy scalars/arrays, paths and dataclass-likes -> plain JSON values
    (the `default=` of json.dumps for records and reports)."""
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


class Sink(Protocol):
    """Where MetricsLog mirrors its records (fastkd.loggers): `write` gets every record as written
    to metrics.jsonl (kinds it does not draw, "resume" or unknown, it ignores), `close` flushes."""

    name: str

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Append-only JSON-lines log, flushed after every record; a no-op where `enabled` is False.

    enabled=None means "rank 0" (or no torch.distributed). The file is opened in append mode, so
    a resumed run continues the same log; a last line cut off by a kill (no newline) is ended
    first, so the next record does not get glued onto it. `sinks` get every record after it is
    in the file (see the module docstring); where the log is disabled they are closed unused.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool | None = None, sinks: Iterable[Sink] = ()):
        self.path = Path(path)
        self.enabled = is_rank0() if enabled is None else bool(enabled)
        self._file: IO[str] | None = None
        self.sinks: list[Sink] = list(sinks)
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            cut_off = _ends_without_newline(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            if cut_off:
                self._file.write("\n")
        else:
            self._close_sinks()

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        record = dict(record)
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record, default=to_jsonable) + "\n")
        self._file.flush()
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as e:  # a logger must never stop training: report once, drop it
                self.sinks.remove(sink)
                _sink_failed(sink, "write", e)
                _close_quietly(sink)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._close_sinks()

    def _close_sinks(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as e:
                _sink_failed(sink, "close", e)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sink_failed(sink: Sink, action: str, error: Exception) -> None:
    name = getattr(sink, "name", type(sink).__name__)
    say(f"fastkd: the {name} logger failed in {action} ({type(error).__name__}: {error}); it is off for "
        f"the rest of this run; metrics.jsonl keeps every record")  # fmt: skip


def _close_quietly(sink: Sink) -> None:
    try:
        sink.close()
    except Exception:  # already reported as failed once
        pass


def _ends_without_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _parse(line: str) -> dict | None:
    """The record of one line, or None for a blank, cut-off or non-object line."""
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl in order; unreadable lines (a cut-off last line) are skipped and
    a record repeated after a resume (same kind, epoch, step) replaces the earlier one, taking its
    place at the position of the latest write. A missing file gives []."""
    path = Path(path)
    if not path.exists():
        return []
    records: dict[tuple, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            record = _parse(line)
            if record is None:
                continue
            kind = record.get("kind")
            if kind in ("step", "eval") and "epoch" in record:
                key = (kind, record.get("epoch"), record.get("step"))
            else:
                key = ("line", i)
            records.pop(key, None)  # re-insert so order follows the latest write
            records[key] = record
    return list(records.values())


def _past_checkpoint(record: dict, keep_through_step: int, keep_epoch_evals_before: int) -> bool:
    step, epoch = record.get("step"), record.get("epoch")
    if isinstance(step, (int, float)) and not isinstance(step, bool) and step > keep_through_step:
        return True
    if record.get("kind") == "eval" and isinstance(epoch, int) and epoch >= keep_epoch_evals_before:
        return True
    return False


def truncate_metrics(path: str | os.PathLike, keep_through_step: int, keep_epoch_evals_before: int) -> int:
    """Drop the records a resumed run is about to write again; returns how many lines went.

    keep_through_step: the checkpoint's global step G; every record with "step" > G goes.
    keep_epoch_evals_before: the checkpoint's count of finished epochs E; eval records of epochs
    >= E go (an eval of epoch E-1 is written before the checkpoint that counts E epochs).
    Unreadable lines (a line cut off by a kill) go too. Lines kept are kept byte for byte; the
    file is rewritten atomically (fastkd.atomic) and only when something went. A missing file
    gives 0. Call it before MetricsLog opens the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    kept, dropped = [], 0
    for raw in data.splitlines(keepends=True):
        if not raw.strip():
            continue
        record = _parse(raw.decode("utf-8", errors="replace"))
        if record is None or _past_checkpoint(record, keep_through_step, keep_epoch_evals_before):
            dropped += 1
            continue
        kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
    if dropped:
        atomic_write_bytes(path, b"".join(kept))
    return dropped


def _results(record: Mapping[str, Any]) -> Mapping[str, Any]:
    results = record.get("results")
    return results if isinstance(results, Mapping) else record


def eval_networks(record: Mapping[str, Any]) -> dict[str, dict]:
    """{network: metrics} of an eval record (teacher included, teacher_w excluded)."""
    return {
        name: value
        for name, value in _results(record).items()
        if isinstance(value, Mapping) and "top1" in value
    }


def teacher_w_of(record: Mapping[str, Any]) -> dict | None:
    """The teacher_w {"mean", "hist", "edges"} of an eval record, or None (no teacher)."""
    w = _results(record).get("teacher_w")
    return w if isinstance(w, Mapping) and "hist" in w else None


class NullLog:
    """The metrics log outside fit(): records go nowhere (Trainer.evaluate() on its own)."""

    def write(self, record) -> None:
        pass
