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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastkd.config import TrainConfig, resolve_config
from fastkd.errors import FastKDError


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
        steps_per_epoch: int | None = None, config: Mapping[str, Any] | None = None) -> dict:  # fmt: skip
    """Train `students` (distilling from `teacher` when the method uses one) on `train`, evaluate
    on `val` each epoch; returns the run summary (also written to RUN/report.json). `train` and
    `val` must be re-iterable (a list, a DataLoader): each epoch reads them again.
    `steps_per_epoch`: batches per epoch when `train` has no len(). The first batch of each is
    checked (images [B, 3, H, W], labels in range) and run through every network, so a wrong
    layout or a classifier of the wrong width is named before training starts."""
    from fastkd.data.iterable import IterableLoader
    from fastkd.runtime import resolve_device
    from fastkd.train import Trainer

    first_train, first_val = _first_batch(train, "train"), _first_batch(val, "val")
    defaults = {"data.dir": "in-memory", "run.live": "false", "data.batch_size": int(first_train[0].shape[0])}
    cfg = make_config(config, **defaults)
    device = resolve_device(cfg.run.device)
    train_loader = IterableLoader(train, num_classes=num_classes, classes=classes, device=device,
                                  steps_per_epoch=steps_per_epoch, name="fit(train=...)")  # fmt: skip
    val_loader = IterableLoader(val, num_classes=num_classes, classes=classes, device=device,
                                steps_per_epoch=_len(val), name="fit(val=...)")  # fmt: skip
    images, _ = train_loader.check_batch(0, first_train)
    val_loader.check_batch(0, first_val)
    _check_outputs(students, teacher, images, train_loader.num_classes)
    trainer = Trainer(cfg, train_loader=train_loader, val_loader=val_loader, students=students, teacher=teacher)
    return trainer.fit()


def _len(batches: Iterable) -> int:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return 2**62  # val: every batch the iterable yields


def _first_batch(batches: Iterable, arg: str):
    """The first batch of a re-iterable (list, DataLoader), which stays readable from the start;
    FastKDError naming fit's argument `arg` for a one-shot iterator (a generator: the second epoch
    would find it empty) or an iterable without batches."""
    if iter(batches) is batches:
        raise FastKDError(f"fit({arg}=...): {type(batches).__name__} is an iterator, read once, but fit reads "
                          f"{arg} again every epoch; pass a list of batches or a torch DataLoader")  # fmt: skip
    first = next(iter(batches), None)
    if first is None:
        raise FastKDError(f"fit({arg}=...): the iterable yields no batches")
    return first


def _check_outputs(students, teacher: nn.Module | None, images: Tensor, num_classes: int) -> None:
    """Run every network on two images of the first train batch (eval mode, no grad, on the
    network's own device): FastKDError naming the network when it fails on them or does not
    output [2, num_classes] logits. Eval mode updates no BatchNorm statistics."""
    nets = dict(students) if isinstance(students, Mapping) else {f"#{i}": n for i, n in enumerate(students)}
    named = [(f"fit(students=...): student {k!r}", n) for k, n in nets.items()]
    if teacher is not None:
        named.append(("fit(teacher=...): the teacher", teacher))
    sample = images[:2].float()
    for what, net in named:
        param = next(iter(net.parameters()), None)
        x = sample.to(param.device) if param is not None else sample
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                out = net(x)
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FastKDError(f"{what} ({type(net).__name__}) fails on images {list(x.shape)} of the first train "
                              f"batch: {first_line}") from err  # fmt: skip
        finally:
            net.train(was_training)
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        if shape != [x.shape[0], num_classes]:
            raise FastKDError(f"{what} ({type(net).__name__}) outputs {shape} for {x.shape[0]} images, but there "
                              f"are {num_classes} classes: it must return [B, {num_classes}] logits")  # fmt: skip

