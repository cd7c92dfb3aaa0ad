"""Per-iteration learning rate and per-epoch resolution: pure functions of the position.

The schedule has no state of its own: the trainer's global step is the schedule position, so
resuming restores it by restoring the step count.
"""

from __future__ import annotations

import math

from fastkd.config import config_from_dict
from fastkd.errors import FastKDError

# the peak lr per 256 images of each optim.name when neither optim.lr nor optim.lr_per_256 is set:
# SGD 0.5 (momentum 0.9, nesterov: the ImageNet KD recipes' 0.1 per 256 at batch 256 trains too
# slowly for short runs, 0.5 with warm-up is stable); AdamW 2.5e-4, DeiT's 5e-4 per 512 images.
# One default for both sent AdamW to 0.5 x batch / 256, where its loss goes to 1e11.
DEFAULT_LR_PER_256 = {"sgd": 0.5, "adamw": 2.5e-4}


def scaled_lr(lr_per_256: float, batch_size: int, world_size: int) -> float:
    """Peak lr for a global batch of batch_size x world_size images (linear scaling rule)."""
    return lr_per_256 * batch_size * world_size / 256


def peak_lr(cfg, world_size: int) -> tuple[float, str]:
    """(peak lr, how it was reached, in words) of a TrainConfig run on `world_size` ranks:
    optim.lr as it is (absolute), else optim.lr_per_256 (default: DEFAULT_LR_PER_256 of
    optim.name) x global batch / 256, e.g. (0.25, "peak lr 0.25 (lr_per_256 0.5 x 128 images /
    256)"). FastKDError when schedule.min_lr is above it."""
    o, batch = cfg.optim, cfg.data.batch_size
    images = batch * world_size
    if o.lr is not None:
        lr, how = float(o.lr), f"peak lr {o.lr:.4g} (optim.lr, absolute; {images} images per step)"
    else:
        per, what = o.lr_per_256, "lr_per_256"
        if per is None:
            per, what = DEFAULT_LR_PER_256[o.name], f"{o.name}'s default lr_per_256"
        lr = scaled_lr(per, batch, world_size)
        how = f"peak lr {lr:.4g} ({what} {per:g} x {images} images / 256)"
    if cfg.schedule.min_lr > lr:
        raise FastKDError(f"schedule.min_lr {cfg.schedule.min_lr:g} is above the {how}; lower schedule.min_lr")
    return lr, how


def saved_peak_lr(config: dict, world_size: int) -> tuple[float, str]:
    """`peak_lr` of a saved config dict (a checkpoint's "config") on `world_size` ranks."""
    return peak_lr(config_from_dict(config, "checkpoint config", check=False), world_size)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, shape: str = "cosine",
          min_lr: float = 0.0) -> float:  # fmt: skip
    """lr of iteration `step` (0-based): linear warm-up from 0 to `peak` over `warmup_steps`,
    then cosine or linear decay reaching `min_lr` (absolute, <= peak) after `total_steps`.
    With min_lr 0 the values are bit-identical to the schedule before min_lr existed."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if shape == "cosine":
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "linear":
        return min_lr + (peak - min_lr) * (1.0 - progress)
    raise ValueError(f"unknown schedule shape {shape!r}")


def resolution_at(
    epoch: int,
    epochs: int,
    min_res: int | None,
    max_res: int | None,
    fixed: int,
    ramp_end_epoch: int | None = None,
    multiple: int = 16,
) -> int:
    """Train resolution of `epoch`: `fixed` without progressive resizing, else a linear ramp
    from min_res (epoch 0) to max_res (epoch ramp_end_epoch, default the last), rounded down to
    a multiple of `multiple` and kept inside [min_res, max_res]."""
    if min_res is None or max_res is None:
        return fixed
    end = epochs - 1 if ramp_end_epoch is None else ramp_end_epoch
    if end <= 0:
        return max_res
    fraction = min(1.0, max(0.0, epoch / end))
    res = int(min_res + (max_res - min_res) * fraction) // multiple * multiple
    return max(min_res, min(max_res, res)) if epoch < end else max_res
