r"""Train a teacher, or one/two students distilled from it, on a packed directory.

Single GPU (the ImageNet-100 paper recipe: teacher ResNet-50, students ResNet-18 + MobileNetV2):

    fastkd train --config fastkd/configs/imagenet100_uadkd.yaml --data data/imagenet100-packed \
        --teacher-weights runs/imagenet100-teacher/checkpoints/best-resnet50.pt --out runs/uadkd

One node, 8 GPUs (relaunches itself through torch.distributed.run; batch size is per GPU and
the lr scales with batch size x GPUs / 256):

    fastkd train --config fastkd/configs/imagenet100_uadkd.yaml --data data/imagenet100-packed --gpus 8

Several nodes: start torchrun on every node (here node 0 of 2); fastkd joins the group it made:

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST0:29500 -m fastkd.cli train --config CONFIG --data DIR

A teacher is the same trainer with method `ce` and one network:

    fastkd train --config fastkd/configs/imagenet100_teacher.yaml --data data/imagenet100-packed

Config: dataclass defaults, then `--config FILE.yaml`, then any `--section.key VALUE` flag
(the short aliases are listed below). `--resume auto` continues OUT/checkpoints/last.pt when it
exists; `--resume PATH` (a run directory or its checkpoints/last.pt) continues that run, in the
directory that holds it, with its config (flags given now override). A finished run is left
untouched (exit 0). A fresh run into a directory that already holds a run is refused unless
`--overwrite`; one training at a time holds a run directory (a lock; a dead holder's is taken
over). On resume, metrics.jsonl records past the checkpoint (after a kill -9) are dropped.
Ctrl-C finishes the current step, saves last.pt and exits with status 130 (SIGTERM: 143). On
CPU, `--gpus N --run.device cpu` runs N gloo ranks (tests). The run directory OUT holds
config.yaml, metrics.jsonl, checkpoints/{last,best-<net>}.pt, report.json, report.md, plots/.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from fastkd import distributed
from fastkd.checkpoint import load_last
from fastkd.config import TrainConfig, resolve_config, save_config
from fastkd.config_cli import TrainArgs, parse_train_argv
from fastkd.errors import FastKDError
from fastkd.notes import say
from fastkd.run_dir import LOCK_ENV, claim, classify
from fastkd.run_layout import CHECKPOINTS_DIR, RunLayout
from fastkd.weights import split_weights_spec

# keys a resumed run never inherits from the checkpoint's config
_NOT_INHERITED = {"run": ("resume", "stop_after", "overwrite")}


def parse(argv: list[str]) -> TrainArgs:
    """`fastkd train`'s argv -> the config file and the typed keys the command line set (the
    whole command line, `--help` included, goes to tyro: fastkd.config_cli)."""
    return parse_train_argv(argv, description=__doc__)


def resume_path(resume: str | None, out: str) -> Path | None:
    """The checkpoint `--resume` names: auto -> OUT/checkpoints/last.pt if it exists, a run
    directory -> its last.pt, else the file itself (which must exist)."""
    if not resume:
        return None
    if resume == "auto":
        path = RunLayout(out).last
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = RunLayout(path).last
    if not path.is_file():
        raise FastKDError(f"--resume {resume}: no checkpoint at {path}")
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory holding `checkpoint` (RUN/checkpoints/last.pt -> RUN; a checkpoint
    elsewhere: its folder)."""
    folder = checkpoint.resolve().parent
    return folder.parent if folder.name == CHECKPOINTS_DIR else folder


def _absolute_paths(cfg: TrainConfig) -> None:
    """Paths in the config made absolute, so the saved config resumes from any directory."""
    cfg.run.out = os.path.abspath(cfg.run.out)
    if cfg.data.dir:
        cfg.data.dir = os.path.abspath(cfg.data.dir)
    weights, prefix = split_weights_spec(cfg.model.teacher_weights or "")  # PATH:PREFIX keeps its prefix
    if weights and weights != "imagenet" and os.path.exists(weights):
        cfg.model.teacher_weights = os.path.abspath(weights) + (f":{prefix.rstrip('.')}" if prefix else "")


def resolve(args: TrainArgs):
    """(config, loaded checkpoint or None): a resumed run starts from the checkpoint's config and
    continues in the directory that holds the checkpoint."""
    overrides = args.overrides
    first = resolve_config(args.config, overrides, check=False)
    path = resume_path(first.run.resume, first.run.out)
    if path is None:
        cfg = resolve_config(args.config, overrides)
        _absolute_paths(cfg)
        return cfg, None
    ckpt = load_last(path)
    base = {s: dict(v) for s, v in ckpt["config"].items()}
    for section, keys in _NOT_INHERITED.items():
        for key in keys:
            base[section].pop(key, None)
    home = run_dir_of(path)
    if first.run.resume != "auto" and "run.out" in overrides and Path(overrides["run.out"]).resolve() != home:
        raise FastKDError(
            f"--resume {first.run.resume} continues the run in {home}; --out {overrides['run.out']} names "
            "another directory: drop --out (or copy the run there and resume that copy)"
        )
    base["run"]["out"] = str(home)  # the run that holds PATH, wherever it was first written
    cfg = resolve_config(args.config, overrides, base=base)
    _absolute_paths(cfg)
    return cfg, ckpt


def _finished(cfg: TrainConfig, ckpt: dict | None) -> bool:
    return ckpt is not None and ckpt["epoch"] >= cfg.schedule.epochs and ckpt["step_in_epoch"] == 0


def _lock_held_for_us(cfg: TrainConfig) -> bool:
    """A launcher (fastkd train --gpus N) holds the lock for the ranks it started; under an
    outside torchrun rank 0 takes it."""
    return os.environ.get(LOCK_ENV) == cfg.run.out or (distributed.under_torchrun() and os.environ.get("RANK") != "0")


def claim_run_dir(cfg: TrainConfig, ckpt: dict | None):
    """fastkd.run_dir.claim for this run: a fresh run refuses a dir holding a run (unless
    --overwrite); a resume drops metrics records past the checkpoint (a killed run's)."""
    resumed_at = None if ckpt is None else (ckpt["global_step"], ckpt["epoch"])
    return claim(cfg.run.out, resumed_at=resumed_at, overwrite=cfg.run.overwrite)


def run(args: argparse.Namespace) -> int:
    cfg, ckpt = resolve(parse(args.argv))
    if _finished(cfg, ckpt):
        state = "finished" if classify(cfg.run.out) == "finished" else "at its last epoch"
        say(f"fastkd train: the run in {cfg.run.out} is {state} ({ckpt['epoch']} of {cfg.schedule.epochs} "
            "epochs); nothing to do. Raise --epochs to train on, or use --overwrite/another --out for a new run")
        return 0
    if cfg.run.resume == "auto" and ckpt is None:
        say(f"fastkd train: no checkpoint in {cfg.run.out}/checkpoints, starting fresh")
    if _lock_held_for_us(cfg) or cfg.dist.gpus <= 1 or distributed.under_torchrun():
        return _train(cfg, ckpt)  # the Trainer claims the run dir (fastkd.run_dir.claim), after its checks
    with claim_run_dir(cfg, ckpt):  # held for the ranks it launches
        return _launch(cfg)


def _launch(cfg: TrainConfig) -> int:
    """`--gpus N` outside torchrun: the ranks read the config resolved here, under our lock."""
    with tempfile.TemporaryDirectory(prefix="fastkd-launch-") as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(cfg, path)
        say(f"fastkd train: launching {cfg.dist.gpus} ranks (torch.distributed.run)")
        os.environ[LOCK_ENV] = cfg.run.out
        try:
            return distributed.relaunch(cfg.dist.gpus, ["train", "--config", str(path)])
        finally:
            os.environ.pop(LOCK_ENV, None)


def _train(cfg: TrainConfig, ckpt: dict | None) -> int:
    from fastkd.train import Interrupted, Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, resume=ckpt)
        trainer.fit()
    except Interrupted as stop:
        if stop.path is not None:
            say(f"fastkd train: stopped; resume with --resume {stop.path}")
        return stop.exit_code
    finally:
        distributed.shutdown()
    if trainer.is_main:
        say(f"fastkd train: run directory {cfg.run.out} (report.md, checkpoints/)", err=False)
    return 0
