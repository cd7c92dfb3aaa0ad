"""The custom op `torch.ops.fastkd.dual_kd_loss`: fused forward + gradient of the dual-student loss.

    loss, parts, w, grad_a, grad_b = torch.ops.fastkd.dual_kd_loss(
        teacher, s_a, s_b, labels, temperature, entropy_temperature,
        a_ce, a_kd, a_peer, label_smoothing, weighting, need_grad)

teacher [B, C] or None (no KD term, w = 1), s_a [B, C], s_b [B, C] or None (one student, no
peer term), labels int64 [B]; all logits of one dtype. Outputs, in fp32 (fp64 for fp64 inputs):
loss [B] = L_A + L_B per sample, parts [B, n_students, 3] = weighted (ce, kd, peer) per student,
w [B]; and grad_a, grad_b [B, C] in the logits' dtype = d loss[b] / d s[b, :], or [0, C] when
need_grad is false (or for a missing s_b). The maths is in ../shared/DESIGN.md "The loss" and in
dual_kd_loss.cu's header.

Implementations: CUDA tensors run the fused kernel (dual_kd_loss.cu, built on first use by
fastkd.kernels.build); every other device, and CUDA float64, runs `dual_kd_loss_torch`, the same
maths in PyTorch with the gradient written out. With no CUDA toolkit to build the kernel, CUDA
falls back to `dual_kd_loss_torch` too, with one warning. A fake implementation gives shapes to
torch.compile, and the autograd formula multiplies the saved per-row gradients by the upstream
gradient of `loss` (the other outputs are for logging and carry no gradient), so a compiled step
traces the op as one node with no graph break.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from fastkd.kernels.build import ExtensionUnavailable, load_extension

OP_NAME = "fastkd::dual_kd_loss"
SCHEMA = (
    "(Tensor? teacher, Tensor s_a, Tensor? s_b, Tensor labels, float temperature, "
    "float entropy_temperature, float a_ce, float a_kd, float a_peer, float label_smoothing, "
    "bool weighting, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 maths for fp32/fp16/bf16 logits; fp64 stays fp64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _rowdot(x: Tensor, y: Tensor, scratch: Tensor) -> Tensor:
    """sum_j x[b, j] * y[b, j]: [B, C] x 2 -> [B], the products in a reused [B, C] scratch."""
    return torch.mul(x, y, out=scratch).sum(dim=1)


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor, scratch: Tensor) -> Tensor:
    """KL(p || q) = sum_j p_j (log p_j - log q_j) per row, differences taken elementwise (not
    as cross-entropy minus entropy, which loses ~1e-7 log C absolute, times T^2 in the loss)."""
    return torch.sub(log_p, log_q, out=scratch).mul_(p).sum(dim=1)


def _softmax_and_log(x: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(x) and log_softmax(x), [B, C] each.

    Two passes rather than exp(log_softmax(x)): on CPU softmax is vectorised and exp is several
    times slower. Deriving log p from p (log p = x - max x + log max p) would save a pass but
    costs ~1.5e-7 absolute in every log p, which the T^2 factor turns into > 1e-6 of the loss.
    """
    return torch.softmax(x, dim=1), torch.log_softmax(x, dim=1)


def dual_kd_loss_torch(
    teacher: Tensor | None,
    s_a: Tensor,
    s_b: Tensor | None,
    labels: Tensor,
    temperature: float,
    entropy_temperature: float,
    a_ce: float,
    a_kd: float,
    a_peer: float,
    label_smoothing: float,
    weighting: bool,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op's maths in PyTorch (any device): per-row losses, parts, w and gradients.

    On CPU this is the fused op, so it is written for few passes over [B, C] and few [B, C]
    temporaries: the smoothed CE from softmax(s) alone (which is also the CE gradient), the KL
    and entropy products in one reused scratch buffer, the gradient assembled in place.
    """
    T, eps = temperature, label_smoothing
    B, C = s_a.shape
    cd = compute_dtype(s_a.dtype)
    students = [s_a.to(cd)] + ([s_b.to(cd)] if s_b is not None else [])
    n = len(students)
    y = labels.unsqueeze(1)  # [B, 1]
    scratch = torch.empty((B, C), dtype=cd, device=s_a.device)
    p1, pT, logpT, ce = [], [], [], []
    for s in students:
        s_max = s.amax(dim=1)
        p = torch.softmax(s, dim=1)
        p1.append(p)
        # CE = lse - (1-eps) s_y - (eps/C) sum s with lse = max s - log max p (max p >= 1/C: no
        # underflow), as a sum of terms >= 0; the log max p rounding (~1e-7) is not scaled by T^2.
        neg_log_pmax = -p.amax(dim=1).log()
        ce.append((1.0 - eps) * (s_max - s.gather(1, y).squeeze(1) + neg_log_pmax)
                  + eps * (s_max - s.mean(dim=1) + neg_log_pmax))
        p, log_p = _softmax_and_log(s / T)
        pT.append(p)
        logpT.append(log_p)  # log p_s, [B, C]
    w = torch.ones(B, dtype=cd, device=s_a.device)
    zeros = torch.zeros(B, dtype=cd, device=s_a.device)
    kd = [zeros] * n
    if teacher is not None:
        t = teacher.to(cd)
        pt, logpt = _softmax_and_log(t / T)
        if weighting:
            pw, logpw = _softmax_and_log(t / entropy_temperature)
            entropy = -_rowdot(pw, logpw, scratch)  # -sum p log p, elementwise
            w = (1.0 - entropy / math.log(C)).clamp(0.0, 1.0)
        kd = [a_kd * T * T * w * _kl_rows(pt, logpt, lp, scratch) for lp in logpT]
    peer = [zeros] * n
    if n == 2:
        peer = [a_peer * T * T * _kl_rows(pT[1], logpT[1], logpT[0], scratch),
                a_peer * T * T * _kl_rows(pT[0], logpT[0], logpT[1], scratch)]
    parts = torch.stack([torch.stack([a_ce * ce[i], kd[i], peer[i]], dim=1) for i in range(n)], dim=1)  # [B, n, 3]
    grads = []
    if need_grad:
        for i in range(n):
            # a_ce (softmax(s) - target) + T a_kd w (p_s - p_t) + T a_peer (p_s - p_peer), in place in p1
            g = p1[i].mul_(a_ce).sub_(a_ce * eps / C)
            g.scatter_add_(1, y, torch.full((B, 1), -a_ce * (1.0 - eps), dtype=cd, device=g.device))
            if teacher is not None:
                kd_row = (T * a_kd) * w.unsqueeze(1)  # [B, 1]
                g.addcmul_(pT[i], kd_row).addcmul_(pt, kd_row, value=-1.0)
            if n == 2:
                g.add_(pT[i], alpha=T * a_peer).add_(pT[1 - i], alpha=-T * a_peer)
            grads.append(g.to((s_a, s_b)[i].dtype))  # the logits' own dtype
    loss = parts.sum(dim=(1, 2))
    grad_a = grads[0] if need_grad else s_a.new_empty((0, C))
    grad_b = grads[1] if need_grad and n == 2 else s_a.new_empty((0, C))
    return loss, parts, w, grad_a, grad_b


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=SCHEMA)
def dual_kd_loss(
    teacher, s_a, s_b, labels, temperature, entropy_temperature, a_ce, a_kd, a_peer, label_smoothing, weighting,
    need_grad,
):
    return dual_kd_loss_torch(
        teacher, s_a, s_b, labels, temperature, entropy_temperature, a_ce, a_kd, a_peer, label_smoothing,
        weighting, need_grad,
    )


_warned_fallback = False


@dual_kd_loss.register_kernel("cuda")
def _dual_kd_loss_cuda(
    teacher, s_a, s_b, labels, temperature, entropy_temperature, a_ce, a_kd, a_peer, label_smoothing, weighting,
    need_grad,
):
    args = (temperature, entropy_temperature, a_ce, a_kd, a_peer, label_smoothing, weighting, need_grad)
    if s_a.dtype in KERNEL_DTYPES:
        try:
            ext = load_extension()
        except ExtensionUnavailable as exc:
            global _warned_fallback
            if not _warned_fallback:
                warnings.warn(f"{exc}; using the PyTorch maths on the GPU instead", stacklevel=2)
                _warned_fallback = True
        else:
            contiguous = [x.contiguous() if x is not None else None for x in (teacher, s_a, s_b, labels)]
            return tuple(ext.forward(*contiguous, *args))
    return dual_kd_loss_torch(teacher, s_a, s_b, labels, *args)


@dual_kd_loss.register_fake
def _dual_kd_loss_fake(
    teacher, s_a, s_b, labels, temperature, entropy_temperature, a_ce, a_kd, a_peer, label_smoothing, weighting,
    need_grad,
):
    B, C = s_a.shape
    cd = compute_dtype(s_a.dtype)
    n = 2 if s_b is not None else 1
    return (
        s_a.new_empty((B,), dtype=cd),
        s_a.new_empty((B, n, 3), dtype=cd),
        s_a.new_empty((B,), dtype=cd),
        s_a.new_empty((B if need_grad else 0, C)),
        s_a.new_empty((B if need_grad and s_b is not None else 0, C)),
    )


def _setup_context(ctx, inputs, output):
    need_grad = inputs[-1]
    _, _, _, grad_a, grad_b = output
    ctx.need_grad = need_grad
    ctx.has_b = inputs[2] is not None
    ctx.save_for_backward(grad_a, grad_b)


def _backward(ctx, g_loss, g_parts, g_w, g_grad_a, g_grad_b):
    # Only `loss` is differentiable; parts and w are logged values (callers detach them).
    if not ctx.need_grad:
        raise RuntimeError("fastkd::dual_kd_loss was called with need_grad=False; it has no gradient")
    grad_a, grad_b = ctx.saved_tensors
    scale = g_loss.unsqueeze(1)  # [B, 1]
    d_a = (grad_a * scale).to(grad_a.dtype)
    d_b = (grad_b * scale).to(grad_b.dtype) if ctx.has_b else None
    return None, d_a, d_b, None, None, None, None, None, None, None, None, None


dual_kd_loss.register_autograd(_backward, setup_context=_setup_context)
