"""The Python API: distil into your own networks on your own batches, no pack needed.

    import fastkd
    summary = fastkd.fit(
        students={"small": my_resnet, "tiny": my_mobilenet},   # nn.Modules (1 or 2)
        teacher=my_frozen_teacher,                             # nn.Module (None for ce / dml)
        train=train_batches, val=val_batches,                  # iterables of (images, labels)
        num_classes=10,
        config={"loss.method": "uadkd", "schedule.epochs": 5, "optim.lr": 0.05, "run.out": "runs/mine"},
    )
    summary["networks"]["small"]["top1"]

Every `fastkd train` key is accepted in `config` as "section.key" (see `fastkd train --help`); the
run directory holds the same files as a command-line run (config.yaml, metrics.jsonl,
checkpoints, report). `Trainer` and `TrainConfig` are the same objects `fastkd train` uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from fastkd.config import TrainConfig, resolve_config, validate


def make_config(config: Mapping[str, Any] | None = None, **defaults: Any) -> TrainConfig:
    """A TrainConfig from {"section.key": value} (values as Python objects or strings)."""
    overrides = {**defaults, **dict(config or {})}
    return resolve_config(None, {k: _text(v) for k, v in overrides.items()})


def _text(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "null" if value is None else value if isinstance(value, str) else str(value)


def fit(students: Mapping[str, nn.Module] | Sequence[nn.Module], train: Iterable, val: Iterable, *,
        teacher: nn.Module | None = None, num_classes: int | None = None, classes: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None) -> dict:  # fmt: skip
    """Train `students` (distilling from `teacher` when the method uses one) on `train`, evaluate
    on `val` each epoch; returns the run summary (also written to RUN/report.json)."""
    from fastkd.data.iterable import IterableLoader
    from fastkd.runtime import resolve_device
    from fastkd.train import Trainer

    defaults = {"data.dir": "in-memory", "run.live": "false", "data.batch_size": _batch_size(train)}
    cfg = make_config(config, **{k: v for k, v in defaults.items() if v is not None})
    device = resolve_device(cfg.run.device)
    train_loader = IterableLoader(train, num_classes=num_classes, classes=classes, device=device)
    val_loader = IterableLoader(val, num_classes=num_classes, classes=classes, device=device, steps_per_epoch=_len(val))
    trainer = Trainer(cfg, train_loader=train_loader, val_loader=val_loader, students=students, teacher=teacher)
    return trainer.fit()


def _len(batches: Iterable) -> int:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return 2**62  # val: every batch the iterable yields


def _batch_size(batches: Iterable) -> int | None:
    """Images in the first batch of a re-iterable (list, DataLoader): the per-step batch the
    peak lr and the report speak of. None for a one-shot iterator (nothing is consumed)."""
    if iter(batches) is batches:
        return None
    first = next(iter(batches), None)
    return int(first[0].shape[0]) if first is not None else None


def config_for_modules(cfg: TrainConfig, students, teacher) -> TrainConfig:
    """`cfg` with model.students / model.teacher naming the user's modules (their class names),
    so the saved config, the checks and the report describe what really trains."""
    nets = list(students.values()) if isinstance(students, dict) else list(students)
    archs = [type(n).__name__ for n in nets]
    model = dataclasses.replace(cfg.model, students=archs,
                                teacher=type(teacher).__name__ if teacher is not None else cfg.model.teacher)  # fmt: skip
    cfg = dataclasses.replace(cfg, model=model)
    validate(cfg)  # 1 or 2 students, two for the peer methods
    return cfg
