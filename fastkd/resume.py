"""What a resumed run may change, and where its schedule continues.

    state = last_state(trainer, rngs)    # what checkpoints/last.pt holds
    rngs = restore(trainer, ckpt)        # checks (FastKDError when the run cannot continue), then
                                         # weights, optimizer, position; notes on what changed

The schedule's position is epochs done plus steps of the current epoch done, counted in steps of
the current world size (epoch * steps_per_epoch + step_in_epoch). So:
- same world size and batch size: everything continues exactly (mid-epoch included);
- another world size or batch size at an epoch boundary: the lr curve continues at the same
  fraction of the run, a per-256 peak lr (optim.lr_per_256) is rescaled to the new global batch
  while an absolute one (optim.lr) stays, each change is returned as a note (printed and logged);
- another world size or batch size in the middle of an epoch: refused, naming both, because the
  rest of that epoch's samples were split for the old ranks and batches;
- more (or fewer) schedule.epochs: the warm-up and decay are recomputed over the new length and
  the note says what the lr does at the resume point.
"""

from __future__ import annotations

from fastkd.checkpoint import build_last, check_same_classes
from fastkd.config import config_to_dict
from fastkd.errors import FastKDError
from fastkd.schedule import lr_at, saved_peak_lr
from fastkd.train_state import made_with


def check_resume(ckpt: dict, trainer) -> None:
    """Networks, classes and (mid-epoch) world size / batch size must match the checkpoint."""
    where = f"resume from {trainer.layout.last}"
    if ckpt["archs"] != trainer.archs:
        raise FastKDError(f"{where}: checkpoint networks {ckpt['archs']} differ from model.students {trainer.archs}")
    if ckpt["num_classes"] != trainer.num_classes:
        raise FastKDError(f"{where}: the checkpoint has {ckpt['num_classes']} classes, the data {trainer.num_classes}")
    if "classes" in ckpt:
        check_same_classes(ckpt["classes"], trainer.manifest["classes"], where)  # same count, other WNIDs
    old_optim, optim = ckpt["config"]["optim"].get("name", "sgd"), trainer.cfg.optim.name
    if old_optim != optim:
        raise FastKDError(f"{where}: the checkpoint holds {old_optim} optimizer state (optim.name), this run asks "
                          f"for {optim}; resume with --optimizer {old_optim}")
    have = trainer.cache_feed.cache.identity if trainer.cache_feed else None
    if ckpt.get("teacher_cache") != have:
        raise FastKDError(
            f"{where}: the run was trained with teacher cache {ckpt.get('teacher_cache') or '(none: a live teacher)'}, "
            f"this run has {have or '(none: a live teacher)'}; resume with the run's own --teacher-cache"
        )
    old_ws, old_bs = made_with(ckpt)
    ws, bs = trainer.dist.world_size, trainer.cfg.data.batch_size
    if ckpt["step_in_epoch"] and (old_ws, old_bs) != (ws, bs):
        raise FastKDError(
            f"{where}: the checkpoint was taken inside epoch {ckpt['epoch'] + 1} (step {ckpt['step_in_epoch']}) "
            f"with world size {old_ws} x batch size {old_bs}; this run has world size {ws} x batch size {bs}. "
            f"A mid-epoch checkpoint resumes exactly only as it was made: resume with --gpus {old_ws} "
            f"--batch-size {old_bs} (world size {old_ws}), let that finish the epoch, then change"
        )


def resume_notes(ckpt: dict, trainer) -> list[str]:
    """What changes at this resume, in words (printed and logged): world size or batch size (the
    schedule continues at the same epoch, the peak lr is rescaled), or schedule.epochs (the
    schedule is recomputed: the lr at the resume point changes)."""
    cfg, notes = trainer.cfg, []
    epoch, in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
    position = epoch * trainer.steps_per_epoch + in_epoch
    old_ws, old_bs = made_with(ckpt)
    ws, bs = trainer.dist.world_size, cfg.data.batch_size
    old_spe = ckpt.get("steps_per_epoch") or trainer.steps_per_epoch
    if (old_ws, old_bs) != (ws, bs):
        old_peak, _ = saved_peak_lr(ckpt["config"], old_ws)
        notes.append(
            f"world size {old_ws} -> {ws}, batch size {old_bs} -> {bs} per rank: {old_spe} -> "
            f"{trainer.steps_per_epoch} steps per epoch; the schedule continues at epoch {epoch} of "
            f"{cfg.schedule.epochs} (step {position} of {trainer.total_steps}); peak lr {old_peak:.4g} -> "
            f"{trainer.peak_lr_how}"
        )
    old_epochs = ckpt["config"]["schedule"]["epochs"]
    if old_epochs != cfg.schedule.epochs:
        old_warm = round(ckpt["config"]["schedule"]["warmup_epochs"] * old_spe)
        old_position = epoch * old_spe + in_epoch
        old_min = ckpt["config"]["schedule"].get("min_lr", 0.0)
        was = lr_at(old_position, old_spe * old_epochs, old_warm, trainer.peak_lr, cfg.schedule.shape, old_min)
        now = lr_at(position, trainer.total_steps, trainer.warmup_steps, trainer.peak_lr, cfg.schedule.shape,
                    cfg.schedule.min_lr)  # fmt: skip
        notes.append(
            f"schedule.epochs {old_epochs} -> {cfg.schedule.epochs}: the {cfg.schedule.shape} schedule is "
            f"recomputed over {cfg.schedule.epochs} epochs, so the lr at the resume point (epoch {epoch}) is "
            f"{now:.4g} instead of {was:.4g}"
        )
    return notes


def last_state(trainer, rngs: list) -> dict:
    """Everything checkpoints/last.pt holds (schema: fastkd/checkpoint.py): the run's state
    (`TrainState.state_dict`: position, bests, run id), the step's (`TrainStep.state_dict`:
    students, optimizer, scaler, EMA), every rank's RNG states (`rngs`), what the run was made
    with (world size, batch size, classes, teacher or teacher cache) and its config."""
    cfg = trainer.cfg
    return build_last(
        **trainer.state.state_dict(),
        **trainer.train_step.state_dict(trainer.names),
        archs=trainer.archs,
        rng=rngs,
        loader={"seed": cfg.run.seed, "epoch": trainer.state.epoch},
        world_size=trainer.dist.world_size,
        batch_size=cfg.data.batch_size,
        steps_per_epoch=trainer.steps_per_epoch,
        num_classes=trainer.num_classes,
        classes=trainer.manifest["classes"],
        teacher={"arch": cfg.model.teacher, "weights": cfg.model.teacher_weights} if cfg.loss.uses_teacher else None,
        teacher_cache=trainer.cache_feed.cache.identity if trainer.cache_feed else None,
        config=config_to_dict(cfg),
    )


def restore(trainer, ckpt: dict) -> list | None:
    """Continue `trainer` from a loaded last.pt: checked (check_resume), then the step's state
    (students, optimizer, scaler, EMA) and the run's (position, bests, run id); what changed is
    appended to trainer.resume_notes. Returns every rank's RNG states for fit to apply when it
    starts, or None under another world size (the steps' dropout seeds do not depend on them)."""
    check_resume(ckpt, trainer)
    trainer.train_step.load_state_dict(ckpt, trainer.names)
    trainer.state.load_state_dict(ckpt)
    trainer.resume_notes.extend(resume_notes(ckpt, trainer))
    if (trainer.ema is not None) != bool(ckpt.get("ema")):
        trainer.resume_notes.append("ema.decay " + ("on: the EMA starts from the current weights" if trainer.ema
                                                    else "off: the checkpoint's EMA is dropped"))  # fmt: skip
    return ckpt["rng"] if ckpt.get("world_size", 1) == trainer.dist.world_size else None
