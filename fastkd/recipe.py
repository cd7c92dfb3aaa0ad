"""Recipe pieces of the training step beside the loss: the optimizer, an EMA of the students,
MixUp / CutMix of the device batch. `fastkd.step.TrainStep` uses all three; the config sections
`optim`, `augment` and `ema` are defined here (as `loss` is in fastkd.losses), with their checks
(`recipe_problems`, run by config.validate) and the reading of pre-lr_per_256 configs.

    opt = build_optimizer(students, cfg.optim, lr=0.1)       # SGD (today's) or AdamW, same WD groups
    load_optimizer_state(opt, ckpt["optimizer"])              # resume, keeping this device's kernels
    ema = StudentsEMA({"resnet18": net_a, "mobilenet_v2": net_b}, decay=0.9998)
    ema.update()                                   # after each optimizer step (every ema.every calls)
    ema.modules()["resnet18"]                      # the averaged copy: evaluate it, save best-*-ema.pt
    mix = draw_mix(cfg.augment, mix_rng(seed), height=160, width=160)   # None or MixParams, host only
    images, labels_b = apply_mix(images, labels, mix)                   # same batch for teacher and students

MixUp / CutMix follow timm's `Mixup` in batch mode: per batch, with probability mix_prob, MixUp
(lam ~ Beta(mixup, mixup), images lam * x + (1 - lam) * x') or, with both on, CutMix with
probability switch_prob (lam ~ Beta(cutmix, cutmix), a box of x' of area ~ (1 - lam) pasted in x
at a uniform centre, clipped to the image, lam corrected to 1 - box area / image area). x' is
the batch rolled by one (sample i is mixed with sample i - 1, never with itself), y' the labels
rolled alike. The draws come from a numpy generator seeded by the step's seed (`mix_rng`), so a
resumed run mixes exactly as the uninterrupted one would; nothing is drawn when both alphas are
0, so a run without mixing is bit-identical to one made before these keys existed.

EMA: `AveragedNet` per student, the rule of torch's AveragedModel with use_buffers=True and
`get_ema_multi_avg_fn` (BN running statistics averaged too; integer buffers such as
num_batches_tracked copied; the first update copies the weights, each later one does ema = decay
* ema + (1 - decay) * weights) in two foreach kernels per update and without its host-to-device
copy of the update count. The averaged copies never run forward during training.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from fastkd.errors import FastKDError

MIX_STREAM = 0x6D6978  # "mix": the mixing generator's stream, apart from every other use of the seed
LR_KEYS = ("lr", "lr_per_256")  # one config layer sets at most one; setting one clears the other below


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # sgd (momentum, nesterov) or adamw (betas, eps)
    lr: float | None = None  # absolute peak lr, whatever the batch; set this or lr_per_256
    lr_per_256: float | None = None  # peak lr per 256 images, x global batch / 256; both null = sgd 0.5, adamw 2.5e-4
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # SGD Nesterov momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1.0e-8  # AdamW eps
    weight_decay: float = 5.0e-5  # on conv/linear weights only (not BN, not biases); decoupled for adamw
    clip_grad_norm: float | None = None  # max gradient norm of each student (after fp16 unscaling); null = off


@dataclass(kw_only=True)
class AugmentConfig:
    mixup: float = 0.0  # MixUp alpha: lam ~ Beta(alpha, alpha) per batch on the device; 0 = off
    cutmix: float = 0.0  # CutMix alpha: box of area ~ 1 - lam, lam ~ Beta(alpha, alpha); 0 = off
    mix_prob: float = 1.0  # probability that a batch is mixed (when mixup or cutmix is on)
    switch_prob: float = 0.5  # both on: probability that a mixed batch uses CutMix, not MixUp

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0


@dataclass(kw_only=True)
class EmaConfig:
    decay: float | None = None  # EMA of each student (weights and BN buffers), e.g. 0.9998; null = off
    every: int = 1  # optimizer steps between EMA updates (the decay applies per update)


# ----------------------------------------------------------------------------- config rules


def lr_pair_layer(values: dict, merged_optim: dict, source: str) -> None:
    """One config layer's optim `values` laid over `merged_optim`: a layer sets at most one of
    optim.lr and optim.lr_per_256 (FastKDError naming both), and the one it sets clears the other
    (so `--lr 0.1` over a file or checkpoint with lr_per_256 means lr 0.1)."""
    given = [k for k in LR_KEYS if values.get(k) is not None]
    if len(given) == 2:
        raise FastKDError(f"{source}: set only one of optim.lr (absolute) and optim.lr_per_256 "
                          f"(x global batch / 256), not both")  # fmt: skip
    if given:
        merged_optim[next(k for k in LR_KEYS if k not in given)] = None


def recipe_problems(cfg) -> list[str]:
    """What is wrong with a TrainConfig's optim, augment and ema keys (each message names them)."""
    o, a, e = cfg.optim, cfg.augment, cfg.ema
    checks = [
        (o.lr is None or o.lr_per_256 is None, "set only one of optim.lr (absolute) and optim.lr_per_256, not both"),
        (o.lr is None or o.lr > 0, f"optim.lr must be > 0 (or null: optim.lr_per_256), got {o.lr}"),
        (o.lr_per_256 is None or o.lr_per_256 > 0, f"optim.lr_per_256 must be > 0 (or null), got {o.lr_per_256}"),
        (o.name != "sgd" or not o.nesterov or o.momentum > 0, "optim.nesterov needs optim.momentum > 0"),
        (o.momentum >= 0 and o.weight_decay >= 0, "optim.momentum and optim.weight_decay must be >= 0"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas: two numbers in [0, 1), got {o.betas}"),
        (o.eps > 0, f"optim.eps must be > 0, got {o.eps}"),
        (o.clip_grad_norm is None or o.clip_grad_norm > 0, "optim.clip_grad_norm must be > 0 (or null: off)"),
        (a.mixup >= 0 and a.cutmix >= 0, "augment.mixup and augment.cutmix are Beta alphas: >= 0 (0 = off)"),
        (0 <= a.mix_prob <= 1 and 0 <= a.switch_prob <= 1, "augment.mix_prob and augment.switch_prob: in [0, 1]"),
        (
            not (a.mixing and cfg.model.teacher_cache and cfg.loss.uses_teacher),
            "augment.mixup / augment.cutmix: the teacher must see the mixed images, but model.teacher_cache "
            "holds logits of unmixed ones; turn mixing off or drop the cache",
        ),
        (e.decay is None or 0 < e.decay < 1, f"ema.decay must be in (0, 1) (or null: off), got {e.decay}"),
        (e.every >= 1, f"ema.every must be >= 1, got {e.every}"),
    ]
    return [message for ok, message in checks if not ok]


# ----------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; BN parameters and biases (ndim <= 1) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(students: nn.Module, optim, lr: float) -> torch.optim.Optimizer:
    """`optim` (config.OptimConfig) over every student parameter with `param_groups`' weight
    decay: SGD (momentum, nesterov: as before these keys existed) or AdamW (betas, eps; weight
    decay decoupled, the config's value) with the fused kernel when every parameter is on CUDA
    (a few kernel launches update every parameter of both students), torch's default kernels
    otherwise (SGD: per tensor, as CPU runs always did; AdamW: foreach)."""
    groups = param_groups(students, optim.weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    if optim.name == "sgd":
        kernels = {"fused": True} if on_cuda else {}
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, **kernels)
    if optim.name == "adamw":
        kernels = {"fused": True} if on_cuda else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, **kernels)
    raise ValueError(f"unknown optimizer {optim.name!r}")


KERNEL_KEYS = ("fused", "foreach")  # an optimizer param group's kernel choice


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping the kernels build_optimizer chose for this
    run's device: torch takes each group's `fused` / `foreach` from the saved state, so a
    checkpoint written on CPU (or before SGD used the fused kernel) would silently turn the
    fused CUDA kernel off on resume."""
    chosen = [{key: group.get(key) for key in KERNEL_KEYS} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kernels in zip(optimizer.param_groups, chosen, strict=True):
        group.update(kernels)


# ----------------------------------------------------------------------------- EMA


class AveragedNet:
    """One student's EMA: a frozen copy of the network (`module`) whose floating parameters and
    buffers are lerped towards the live network's, integer buffers (BN num_batches_tracked)
    copied. Nothing here reads a device value or copies from the host: the update count is a
    Python int, and one update is two `torch._foreach_*` calls over precomputed tensor lists
    (torch's AveragedModel instead copies its CPU `n_averaged` to the device at each update,
    a host-to-device copy per call). state_dict keys are AveragedModel's ("module.<key>",
    "n_averaged"), so EMA states saved by earlier versions load unchanged."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(net).requires_grad_(False)
        self.updates = 0
        pairs = [*zip(self.module.parameters(), net.parameters(), strict=True),
                 *zip(self.module.buffers(), net.buffers(), strict=True)]  # fmt: skip
        # (averaged, live) tensor lists, split by kind once: per update no Python work per tensor
        self._float = tuple(map(list, zip(*[p for p in pairs if p[0].is_floating_point()], strict=True)))
        ints = [p for p in pairs if not p[0].is_floating_point()]
        self._int = tuple(map(list, zip(*ints, strict=True))) if ints else ([], [])

    @torch.no_grad()
    def update(self) -> None:
        """ema = decay * ema + (1 - decay) * live (the first update copies)."""
        averaged, live = self._float
        if self.updates == 0:
            torch._foreach_copy_(averaged, live)
        else:
            torch._foreach_lerp_(averaged, live, 1.0 - self.decay)
        if self._int[0]:
            torch._foreach_copy_(*self._int)
        self.updates += 1

    def state_dict(self) -> dict:
        state = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        state["n_averaged"] = torch.tensor(self.updates, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")})
        self.updates = int(state["n_averaged"])  # a CPU tensor in every saved state


class StudentsEMA:
    """Exponential moving averages of the students, one AveragedNet each (see the module doc).
    `nets`: name -> the live student module (not a DDP or compiled wrapper); the copies live on
    the same device. `update()` is called once per optimizer step and averages every `every`-th
    call; it never syncs with the device. state_dict / load_state_dict carry the averages and
    the call count (last.pt)."""

    def __init__(self, nets: dict[str, nn.Module], decay: float, every: int = 1):
        if not 0.0 < decay < 1.0 or every < 1:
            raise ValueError(f"EMA decay must be in (0, 1) and every >= 1, got {decay}, {every}")
        self.nets, self.decay, self.every, self.calls = dict(nets), decay, every, 0
        self.averaged = {name: AveragedNet(net, decay) for name, net in self.nets.items()}

    def update(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            for averaged in self.averaged.values():
                averaged.update()

    def modules(self) -> dict[str, nn.Module]:
        """name -> the averaged network (same architecture and state_dict keys as the student)."""
        return {name: averaged.module for name, averaged in self.averaged.items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "calls": self.calls,
                "models": {name: a.state_dict() for name, a in self.averaged.items()}}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Averages and call count of a saved EMA (its decay and every may differ from this run's:
        this run's apply from here on)."""
        if set(state["models"]) != set(self.averaged):
            raise ValueError(f"EMA state has networks {sorted(state['models'])}, expected {sorted(self.averaged)}")
        for name, averaged in self.averaged.items():
            averaged.load_state_dict(state["models"][name])
        self.calls = int(state["calls"])


# ----------------------------------------------------------------------------- MixUp / CutMix


@dataclass(frozen=True)
class MixParams:
    """One batch's mixing: kind "mixup" or "cutmix", lam (weight of the batch's own images and
    labels), box (y0, y1, x0, x1) of CutMix (rows y0:y1, columns x0:x1 come from the rolled batch)."""

    kind: str
    lam: float
    box: tuple[int, int, int, int] | None = None


def mix_rng(seed: int) -> np.random.Generator:
    """The mixing generator of the step with global-generator seed `seed`."""
    return np.random.default_rng([int(seed), MIX_STREAM])


def draw_mix(cfg: AugmentConfig, rng: np.random.Generator, height: int, width: int) -> MixParams | None:
    """This batch's mixing (None: not mixed), drawn on the host in timm's order: the mix_prob
    coin, the switch_prob coin (both alphas on), lam, then CutMix's box centre (row, column)."""
    if not cfg.mixing:
        return None  # draws nothing
    if rng.random() >= cfg.mix_prob:
        return None
    cutmix = rng.random() < cfg.switch_prob if cfg.mixup > 0 and cfg.cutmix > 0 else cfg.cutmix > 0
    alpha = cfg.cutmix if cutmix else cfg.mixup
    lam = float(rng.beta(alpha, alpha))
    if not cutmix:
        return MixParams("mixup", lam)
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return MixParams("cutmix", 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1))


def apply_mix(images: Tensor, labels: Tensor, mix: MixParams) -> tuple[Tensor, Tensor]:
    """(mixed images [B, 3, H, W] in images' dtype and memory format, rolled labels y' [B]);
    `images` is not modified (a loader may own it)."""
    labels_b = labels.roll(1, dims=0)
    if mix.kind == "mixup":
        return images.mul(mix.lam).add_(images.roll(1, dims=0), alpha=1.0 - mix.lam), labels_b
    y0, y1, x0, x1 = mix.box
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1].roll(1, dims=0)
    return mixed, labels_b
