"""Stopping a run whose training loss diverged, checked on the window means the loop already reads.

    guard = LossGuard(optimizer="adamw", peak_lr_how="peak lr 0.5 (...)")
    guard.check(window["loss"], epoch=0, step=20, lr=0.31, last=Path("runs/a/checkpoints/last.pt"))

The step never looks at its loss (no host sync per step); the trainer calls `check` on the values
`StepMeter.read` returns once every run.log_every steps, before anything of that window is saved,
so neither last.pt nor a best-*.pt holds the diverged weights.
"""

from __future__ import annotations

import math
from pathlib import Path

from fastkd.errors import FastKDError

# A window loss this many times the first window's is divergence, not noise: a healthy run's
# loss only falls from its first window (cross-entropy of a random net, ln C), while AdamW at
# SGD's lr reached 1e11. 1000 leaves room for a warm-up bump and for tiny first losses.
EXPLOSION_FACTOR = 1.0e3


class NonFiniteLoss(FastKDError):
    """The training loss became NaN/inf or exploded: the run stops, the last good checkpoint is kept."""


class LossGuard:
    """Remembers the first window's loss of this process and raises NonFiniteLoss when a later
    window's loss is NaN/inf or over EXPLOSION_FACTOR x it; messages name the lr and optimizer."""

    def __init__(self, optimizer: str, peak_lr_how: str, factor: float = EXPLOSION_FACTOR):
        self.optimizer, self.peak_lr_how, self.factor = optimizer, peak_lr_how, factor
        self.first: float | None = None  # the first finite window loss (the reference)

    def check(self, loss: float, *, epoch: int, step: int, lr: float, last: Path) -> None:
        """`loss`: a window's mean loss (a float already on the host); `epoch` 0-based, `step` the
        steps done in it; `last`: the run's last.pt, named in the message when it exists."""
        where = f"at epoch {epoch + 1}, step {step}"
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({loss}) {where}; {self._advice(lr, last)}")
        if self.first is None:
            self.first = loss
            return
        if self.first > 0 and loss > self.factor * self.first:
            raise NonFiniteLoss(
                f"training loss exploded {where}: {loss:.4g}, over {self.factor:g} x the first window's "
                f"{self.first:.4g}; {self._advice(lr, last)}"
            )

    def _advice(self, lr: float, last: Path) -> str:
        kept = f"last good checkpoint: {last}" if last.exists() else "no checkpoint written yet"
        return (f"stopped, {kept}. optimizer {self.optimizer}, lr {lr:.4g} at this step, {self.peak_lr_how}. "
                "Try a lower --lr / --optim.lr_per_256, --optim.clip_grad_norm, or --precision.amp fp32/bf16")
