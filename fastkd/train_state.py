"""Where a run stands: the one owner of the trainer's counters, and what of them last.pt keeps.

    state = TrainState(run_id="ab12cd34ef56", best_top1={"resnet18": -1.0})
    state.add_window(samples=4096, seconds=1.5)   # a log window's images and training seconds
    ckpt.update(state.state_dict())               # epoch, step_in_epoch, global_step, samples_seen,
    state.load_state_dict(ckpt)                   #   best_top1, run_id (the keys of last.pt)

The training seconds and images behind images/s, and the compile seconds, measure this process
only (a resumed run reports its own speed), so they are not saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    epoch: int = 0  # next epoch to run (epochs done)
    step_in_epoch: int = 0  # steps of `epoch` already done (> 0 only in a Ctrl-C checkpoint)
    global_step: int = 0  # optimizer steps taken, every world size (the metrics' x axis)
    samples_seen: int = 0  # images trained on, all ranks together
    best_top1: dict[str, float] = field(default_factory=dict)  # network (or <net>-ema) -> best val top-1
    run_id: str = ""
    train_seconds: float = 0.0  # time in training steps of this process (images/s), not saved
    train_images: int = 0  # images of those steps, all ranks together, not saved
    compile_seconds: dict[int, float] = field(default_factory=dict)  # train resolution -> s, not saved

    def add_window(self, samples: int, seconds: float) -> None:
        """A log window: `samples` images (all ranks) trained in `seconds`."""
        self.train_seconds += seconds
        self.train_images += samples
        self.samples_seen += samples

    def images_per_s(self) -> float | None:
        return self.train_images / self.train_seconds if self.train_seconds else None

    def improves(self, name: str, top1: float) -> bool:
        """Record `top1` of network `name`; True when it beats that network's best so far."""
        if top1 <= self.best_top1.setdefault(name, -1.0):
            return False
        self.best_top1[name] = top1
        return True

    def state_dict(self) -> dict:
        """The position and bests, under last.pt's keys (schema: fastkd/checkpoint.py)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "samples_seen": self.samples_seen, "best_top1": dict(self.best_top1), "run_id": self.run_id}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """From a last.pt dict. Checkpoints written before samples_seen was saved count it as
        global_step x world size x batch size; one without run_id keeps this run's; the bests
        of networks the checkpoint does not know stay."""
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.samples_seen = samples_before(state)
        self.best_top1.update(state["best_top1"])
        self.run_id = state.get("run_id", self.run_id)


def made_with(ckpt: dict) -> tuple[int, int]:
    """(world size, per-rank batch size) a last.pt dict was made with."""
    bs = ckpt.get("batch_size") or ckpt["config"]["data"]["batch_size"]
    return int(ckpt.get("world_size", 1)), int(bs)


def samples_before(ckpt: dict) -> int:
    """Images trained on before the checkpoint, all ranks together."""
    if ckpt.get("samples_seen") is not None:
        return int(ckpt["samples_seen"])
    ws, bs = made_with(ckpt)
    return int(ckpt["global_step"]) * ws * bs
