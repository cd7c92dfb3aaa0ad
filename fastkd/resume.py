"""What a resumed run may change, and where its schedule continues.

    check_resume(ckpt, trainer)          # FastKDError when the run cannot continue
    notes = resume_notes(ckpt, trainer)  # what changes, in words
    samples = resume_samples(ckpt)

The schedule's position is epochs done plus steps of the current epoch done, counted in steps of
the current world size (epoch * steps_per_epoch + step_in_epoch). So:
- same world size and batch size: everything continues exactly (mid-epoch included);
- another world size or batch size at an epoch boundary: the lr curve continues at the same
  fraction of the run, the peak lr is rescaled by the linear scaling rule, each change is
  returned as a note (printed and logged);
- another world size or batch size in the middle of an epoch: refused, naming both, because the
  rest of that epoch's samples were split for the old ranks and batches;
- more (or fewer) schedule.epochs: the warm-up and decay are recomputed over the new length and
  the note says what the lr does at the resume point.
"""

from __future__ import annotations

from fastkd.checkpoint import check_same_classes
from fastkd.errors import FastKDError
from fastkd.schedule import lr_at, saved_peak_lr


def check_resume(ckpt: dict, trainer) -> None:
    """Networks, classes and (mid-epoch) world size / batch size must match the checkpoint."""
    where = f"resume from {trainer.ckpt_dir / 'last.pt'}"
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
    old_ws, old_bs = _made_with(ckpt)
    ws, bs = trainer.dist.world_size, trainer.cfg.data.batch_size
    if ckpt["step_in_epoch"] and (old_ws, old_bs) != (ws, bs):
        raise FastKDError(
            f"{where}: the checkpoint was taken inside epoch {ckpt['epoch'] + 1} (step {ckpt['step_in_epoch']}) "
            f"with world size {old_ws} x batch size {old_bs}; this run has world size {ws} x batch size {bs}. "
            f"A mid-epoch checkpoint resumes exactly only as it was made: resume with --gpus {old_ws} "
            f"--batch-size {old_bs} (world size {old_ws}), let that finish the epoch, then change"
        )


def _made_with(ckpt: dict) -> tuple[int, int]:
    """(world size, per-rank batch size) the checkpoint was made with."""
    bs = ckpt.get("batch_size") or ckpt["config"]["data"]["batch_size"]
    return int(ckpt.get("world_size", 1)), int(bs)


def resume_samples(ckpt: dict) -> int:
    """Images trained on before the checkpoint, all ranks together."""
    if ckpt.get("samples_seen") is not None:
        return int(ckpt["samples_seen"])
    ws, bs = _made_with(ckpt)
    return int(ckpt["global_step"]) * ws * bs


def resume_notes(ckpt: dict, trainer) -> list[str]:
    """What changes at this resume, in words (printed and logged): world size or batch size (the
    schedule continues at the same epoch, the peak lr is rescaled), or schedule.epochs (the
    schedule is recomputed: the lr at the resume point changes)."""
    cfg, notes = trainer.cfg, []
    epoch, in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
    position = epoch * trainer.steps_per_epoch + in_epoch
    old_ws, old_bs = _made_with(ckpt)
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
