"""The uncertainty-aware dual-student distillation loss (Gore, Dey & Mishra, arXiv 2511.18826).

    from fastkd.losses import LossConfig, distillation_loss
    cfg = LossConfig.from_method("uadkd", temperature=4.0)
    out = distillation_loss(teacher_logits, [logits_a, logits_b], labels, cfg)
    out["loss"].backward()     # scalar: batch mean of L_A + L_B
    out["ce"], out["kd"], out["peer"]   # [n_students] batch means of the weighted parts (detached)
    out["w"]                   # [B] teacher confidence weight (detached; ones when weighting is off)

Per sample, with teacher logits t, a student's logits s, its peer's logits q and label y over
C classes (softmaxes in fp32, or fp64 for fp64 logits, whatever the logits' dtype):

    p_t = softmax(t/T)    log p_s = log_softmax(s/T)    p_q = softmax(q/T), detached
    w   = 1 - H(softmax(t/T_w)) / log C                  detached, in [0, 1]
    L_s = a_ce * CE(s, y; label smoothing eps)           (CE at temperature 1)
        + a_kd * w * T^2 * KL(p_t || p_s)
        + a_peer * T^2 * KL(p_q || p_s)
    loss = mean over the batch of (L_A + L_B)            (KL summed over classes: "batchmean")

`ce`, `kd` and `peer` in the result are the three weighted terms averaged over the batch, per
student, so `loss == ce.sum() + kd.sum() + peer.sum()`.

Methods choose which terms are on (the paper's baselines and ablations); the a_* weights scale
the terms that are on, so one config file can keep a_kd = a_peer = 1 for every method:

    method  KD term  peer term  w        students  teacher
    ce      -        -          1        1 or 2    not used (teacher training: one network)
    kd      yes      -          1        1 or 2    needed
    uakd    yes      -          w(x)     1 or 2    needed
    dml     -        yes        1        2         not used
    dual    yes      yes        1        2         needed
    uadkd   yes      yes        w(x)     2         needed   (the paper's method, the default)

Defaults. The paper publishes none of T, T_w, the weights or the smoothing, so these are
fastkd's choices, recorded in every run's config: T = 4 (the usual Hinton-style KD value on
ImageNet), T_w = 1 (the teacher's own predictive entropy), a_ce = a_kd = a_peer = 1 (the plain
sum of the three terms), label smoothing 0.1 (the usual ImageNet recipe).

Implementations: `reference_loss` is plain PyTorch with autograd; `distillation_loss(...,
fused=True)` runs the custom op `torch.ops.fastkd.dual_kd_loss` (fastkd.kernels.op: one CUDA
kernel computing both students' losses, w and both gradients; the same maths in PyTorch on CPU),
for one or two students, with or without teacher. `FASTKD_LOSS_IMPL=reference` in the
environment forces `reference_loss` (read at each eager call; under torch.compile, when the
step is traced). Neither implementation synchronises with the host.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

import fastkd.kernels  # noqa: F401  (registers torch.ops.fastkd.dual_kd_loss)
from fastkd.errors import FastKDError

# method -> (KD term on, peer term on, uncertainty weighting on)
METHODS: dict[str, tuple[bool, bool, bool]] = {
    "ce": (False, False, False),
    "kd": (True, False, False),
    "uakd": (True, False, True),
    "dml": (False, True, False),
    "dual": (True, True, False),
    "uadkd": (True, True, True),
}
MethodName = Literal["ce", "kd", "uakd", "dml", "dual", "uadkd"]  # the keys of METHODS, for typed configs
TEACHER_METHODS = tuple(m for m, (kd, _, _) in METHODS.items() if kd)  # need teacher logits
PEER_METHODS = tuple(m for m, (_, peer, _) in METHODS.items() if peer)  # need two students
assert set(get_args(MethodName)) == set(METHODS), "MethodName must list exactly the METHODS keys"
IMPL_ENV = "FASTKD_LOSS_IMPL"  # "reference" forces the PyTorch reference; "fused" (or unset) = default


@dataclass(kw_only=True)
class LossConfig:
    """Settings of the distillation loss; `method` picks the terms, the rest are their constants."""

    method: MethodName = "uadkd"  # which terms are on: ce kd uakd dml dual uadkd
    temperature: float = 4.0  # T of the KD and peer softmaxes; KL terms are scaled by T^2
    entropy_temperature: float = 1.0  # T_w of the teacher softmax whose entropy gives w
    a_ce: float = 1.0  # weight of the label-smoothed cross-entropy (every method)
    a_kd: float = 1.0  # weight of w * T^2 * KL(p_t || p_s) (methods with a KD term)
    a_peer: float = 1.0  # weight of T^2 * KL(p_peer || p_s) (methods with a peer term)
    label_smoothing: float = 0.1  # eps of the CE target (1 - eps) * onehot(y) + eps / C
    fused: bool = True  # fused loss op (CUDA kernel on GPU); false = plain PyTorch reference

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FastKDError(f"unknown loss method {self.method!r}; valid methods: {', '.join(METHODS)}")
        for name in ("temperature", "entropy_temperature", "a_ce", "a_kd", "a_peer", "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FastKDError(f"loss.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("temperature", "entropy_temperature"):
            if getattr(self, name) <= 0:
                raise FastKDError(f"loss.{name} must be > 0, got {getattr(self, name)}")
        for name in ("a_ce", "a_kd", "a_peer"):
            if getattr(self, name) < 0:
                raise FastKDError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FastKDError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @classmethod
    def from_method(cls, name: str, **overrides: float) -> LossConfig:
        """The preset `name` with some constants overridden, e.g. from_method("kd", temperature=2)."""
        if name not in METHODS:
            raise FastKDError(f"unknown loss method {name!r}; valid methods: {', '.join(METHODS)}")
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "method"]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise FastKDError(f"unknown loss setting(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
        return cls(method=name, **overrides)

    @property
    def uses_teacher(self) -> bool:
        """The KD term is on (and so teacher logits are needed)."""
        return METHODS[self.method][0]

    @property
    def uses_peer(self) -> bool:
        """The peer term is on (and so two students are needed)."""
        return METHODS[self.method][1]

    @property
    def weighting(self) -> bool:
        """w is the teacher's confidence rather than 1."""
        return METHODS[self.method][2]

    @property
    def kd_weight(self) -> float:
        """a_kd if the method has a KD term, else 0."""
        return self.a_kd if self.uses_teacher else 0.0

    @property
    def peer_weight(self) -> float:
        """a_peer if the method has a peer term, else 0."""
        return self.a_peer if self.uses_peer else 0.0


def confidence_weight(teacher_logits: Tensor, entropy_temperature: float = 1.0) -> Tensor:
    """w = 1 - H(softmax(t / T_w)) / log C per row, in [0, 1]: [B, C] -> [B] (fp32 or fp64)."""
    t = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
    log_p = F.log_softmax(t / entropy_temperature, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)  # from log-softmax: no log(0)
    return (1.0 - entropy / math.log(t.shape[1])).clamp(0.0, 1.0)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities: [B, C] x 2 -> [B]."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)


def _check_inputs(
    teacher_logits: Tensor | None, students: Sequence[Tensor], labels: Tensor, cfg: LossConfig
) -> list[Tensor]:
    students = list(students)
    if len(students) not in (1, 2):
        raise ValueError(f"the loss takes one or two students' logits, got {len(students)}")
    shape = students[0].shape
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"student logits must be [B, C] with C >= 2, got {tuple(shape)}")
    for x in students + ([teacher_logits] if teacher_logits is not None else []):
        if x.shape != shape:
            raise ValueError(f"logits shapes differ: {tuple(x.shape)} vs {tuple(shape)} (same classes?)")
        if not x.is_floating_point():
            raise TypeError(f"logits must be floating point, got {x.dtype}")
    if labels.shape != (shape[0],):
        raise ValueError(f"labels must be [B] = [{shape[0]}], got {tuple(labels.shape)}")
    if cfg.uses_teacher and teacher_logits is None:
        raise ValueError(f"loss method {cfg.method!r} needs teacher logits")
    if cfg.uses_peer and len(students) != 2:
        raise ValueError(f"loss method {cfg.method!r} needs two students, got {len(students)}")
    return students


def reference_loss(
    teacher_logits: Tensor | None, students: Sequence[Tensor], labels: Tensor, cfg: LossConfig
) -> dict[str, Tensor]:
    """The loss in plain PyTorch (autograd gives the gradients); same result dict as distillation_loss."""
    students = _check_inputs(teacher_logits, students, labels, cfg)
    T = cfg.temperature
    cd = torch.promote_types(torch.float32, students[0].dtype)
    for x in students[1:]:
        cd = torch.promote_types(cd, x.dtype)
    s = [x.to(cd) for x in students]  # [B, C] each
    B = s[0].shape[0]
    log_p = [F.log_softmax(x / T, dim=1) for x in s]
    w = torch.ones(B, dtype=cd, device=s[0].device)
    zeros = torch.zeros(B, dtype=cd, device=s[0].device)
    if cfg.uses_teacher:
        t = teacher_logits.detach().to(cd)
        log_pt = F.log_softmax(t / T, dim=1)
        if cfg.weighting:
            w = confidence_weight(t, cfg.entropy_temperature)
    ce, kd, peer = [], [], []
    for i, x in enumerate(s):
        ce.append(cfg.a_ce * F.cross_entropy(x, labels, label_smoothing=cfg.label_smoothing, reduction="none"))
        kd.append(cfg.kd_weight * T * T * w * _kl_rows(log_pt, log_p[i]) if cfg.uses_teacher else zeros)
        peer.append(cfg.peer_weight * T * T * _kl_rows(log_p[1 - i].detach(), log_p[i]) if cfg.uses_peer else zeros)
    per_sample = sum(c + k + p for c, k, p in zip(ce, kd, peer))  # [B]
    return {
        "loss": per_sample.mean(),
        "ce": torch.stack([c.mean() for c in ce]).detach(),
        "kd": torch.stack([k.mean() for k in kd]).detach(),
        "peer": torch.stack([p.mean() for p in peer]).detach(),
        "w": w.detach(),
    }


def _fused_loss(
    teacher_logits: Tensor | None, students: list[Tensor], labels: Tensor, cfg: LossConfig
) -> dict[str, Tensor]:
    # One dtype for the op (the kernel reads bf16/fp16/fp32); a mix is promoted, and autograd
    # casts the gradient back to each student's dtype.
    teacher = teacher_logits.detach() if cfg.uses_teacher else None
    dtype = students[0].dtype
    for x in students[1:] + ([teacher] if teacher is not None else []):
        dtype = torch.promote_types(dtype, x.dtype)
    s = [x.to(dtype) for x in students]
    teacher = teacher.to(dtype) if teacher is not None else None
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in s)
    loss_rows, parts, w, _ = torch.ops.fastkd.dual_kd_loss(
        teacher,
        s[0],
        s[1] if len(s) == 2 else None,
        labels.long(),
        cfg.temperature,
        cfg.entropy_temperature,
        cfg.a_ce,
        cfg.kd_weight,
        cfg.peer_weight,
        cfg.label_smoothing,
        cfg.weighting,
        need_grad,
    )
    means = parts.detach().mean(dim=1)  # [n_students, B, 3] -> [n_students, 3]
    return {"loss": loss_rows.mean(), "ce": means[:, 0], "kd": means[:, 1], "peer": means[:, 2], "w": w.detach()}


def distillation_loss(
    teacher_logits: Tensor | None,
    students: Sequence[Tensor],
    labels: Tensor,
    cfg: LossConfig,
    fused: bool | None = None,
) -> dict[str, Tensor]:
    """The loss of one or two students: {"loss", "ce", "kd", "peer", "w"} (see the module doc).
    `fused` (default cfg.fused) picks the op; malformed tensors (shapes, dtypes, a method's
    missing teacher or peer) are programming errors and raise ValueError/TypeError."""
    fused = cfg.fused if fused is None else fused
    students = _check_inputs(teacher_logits, students, labels, cfg)
    impl = os.environ.get(IMPL_ENV, "").strip().lower() or "fused"
    if impl not in ("fused", "reference"):
        raise FastKDError(f"{IMPL_ENV}={impl!r}: expected 'reference' or 'fused'")
    if fused and impl == "fused":
        return _fused_loss(teacher_logits, students, labels, cfg)
    return reference_loss(teacher_logits, students, labels, cfg)
