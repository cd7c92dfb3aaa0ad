r"""Train a teacher, or one/two students distilled from it, on a packed directory.

Single GPU (the ImageNet-100 paper recipe: teacher ResNet-50, students ResNet-18 + MobileNetV2):

    fastkd train --config fastkd/configs/imagenet100_uadkd.yaml --data data/imagenet100-packed \
        --teacher-weights runs/imagenet100-teacher/checkpoints/best-resnet50.pt --out runs/uadkd

One node, 8 GPUs (relaunches itself through torch.distributed.run; batch size is per GPU and the
lr scales with batch size x GPUs / 256):

    fastkd train --config fastkd/configs/imagenet100_uadkd.yaml --data data/imagenet100-packed --gpus 8

Several nodes: start torchrun on every node (here node 0 of 2); fastkd joins the group it made:

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST0:29500 -m fastkd.cli train --config CONFIG --data DIR

A teacher is the same trainer with method `ce` and one network:

    fastkd train --config fastkd/configs/imagenet100_teacher.yaml --data data/imagenet100-packed

Config: dataclass defaults, then `--config FILE.yaml`, then any `--section.key VALUE` below (short
aliases: --data --backend --batch-size --method --students --teacher --teacher-weights --epochs
--compile --out --resume --gpus). `--resume auto` continues OUT/checkpoints/last.pt when it
exists; `--resume PATH` continues that checkpoint with its config (flags given now override).
Ctrl-C (or SIGTERM) finishes the current step, saves last.pt and exits (status 130).
On CPU, `--gpus N --run.device cpu` runs N gloo ranks (tests). The run directory OUT holds
config.yaml, metrics.jsonl, checkpoints/{last,best-<net>}.pt, report.json, report.md, plots/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fastkd import distributed
from fastkd.checkpoint import load_last
from fastkd.config import add_config_arguments, overrides_from_args, resolve_config, save_config
from fastkd.errors import FastKDError

# keys a resumed run never inherits from the checkpoint's config
_NOT_INHERITED = {"run": ("resume", "stop_after")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="config file (before the flags below)")
    add_config_arguments(parser)


def resume_path(resume: str | None, out: str) -> Path | None:
    """The checkpoint `--resume` names: auto -> OUT/checkpoints/last.pt if it exists, a run
    directory -> its last.pt, else the file itself (which must exist)."""
    if not resume:
        return None
    if resume == "auto":
        path = Path(out) / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FastKDError(f"--resume {resume}: no checkpoint at {path}")
    return path


def resolve(args: argparse.Namespace):
    """(config, loaded checkpoint or None): a resumed run starts from the checkpoint's config."""
    overrides = overrides_from_args(args)
    first = resolve_config(args.config, overrides, check=False)
    path = resume_path(first.run.resume, first.run.out)
    if path is None:
        return resolve_config(args.config, overrides), None
    ckpt = load_last(path)
    base = {s: dict(v) for s, v in ckpt["config"].items()}
    for section, keys in _NOT_INHERITED.items():
        for key in keys:
            base[section].pop(key, None)
    cfg = resolve_config(args.config, overrides, base=base)
    return cfg, ckpt


def run(args: argparse.Namespace) -> int:
    from fastkd.train import Interrupted, Trainer

    cfg, ckpt = resolve(args)
    if cfg.dist.gpus > 1 and not distributed.under_torchrun():
        with tempfile.TemporaryDirectory(prefix="fastkd-launch-") as tmp:
            path = Path(tmp) / "config.yaml"  # every rank reads the config resolved here
            save_config(cfg, path)
            print(f"fastkd train: launching {cfg.dist.gpus} ranks (torch.distributed.run)", file=sys.stderr)
            return distributed.relaunch(cfg.dist.gpus, ["train", "--config", str(path)])
    if cfg.run.resume == "auto" and ckpt is None:
        print(f"fastkd train: no checkpoint in {cfg.run.out}/checkpoints, starting fresh", file=sys.stderr)
    try:
        trainer = Trainer(cfg, resume=ckpt)
        trainer.fit()
    except Interrupted as stop:
        if stop.path is not None:
            print(f"fastkd train: stopped; resume with --resume {stop.path}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    if trainer.is_main:
        print(f"fastkd train: run directory {cfg.run.out} (report.md, checkpoints/)")
    return 0
