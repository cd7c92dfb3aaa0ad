"""Per-iteration learning rate and per-epoch resolution: pure functions of the position.

The schedule has no state of its own: the trainer's global step is the schedule position, so
resuming restores it by restoring the step count.
"""

from __future__ import annotations

import math


def scaled_lr(lr_per_256: float, batch_size: int, world_size: int) -> float:
    """Peak lr for a global batch of batch_size x world_size images (linear scaling rule)."""
    return lr_per_256 * batch_size * world_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, shape: str = "cosine") -> float:
    """lr of iteration `step` (0-based): linear warm-up to `peak` over `warmup_steps`, then
    cosine or linear decay reaching 0 after `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if shape == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "linear":
        return peak * (1.0 - progress)
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
