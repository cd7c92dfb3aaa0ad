"""The custom op `torch.ops.fastkd.dual_kd_loss`: fused forward + gradient of the dual-student loss.

    loss, parts, w, grads = torch.ops.fastkd.dual_kd_loss(
        teacher, s_a, s_b, labels, temperature, entropy_temperature,
        a_ce, a_kd, a_peer, label_smoothing, weighting, need_grad)

teacher [B, C] or None (no KD term, w = 1), s_a [B, C], s_b [B, C] or None (one student, no
peer term), labels int64 [B]; all logits of one dtype. Outputs, in fp32 (fp64 for fp64 inputs):
loss [B] = L_A + L_B per sample, parts [n_students, B, 3] = weighted (ce, kd, peer) per student
and sample, w [B]; and grads [n_students, B, C] in the logits' dtype, grads[i, b] = d loss[b] /
d s_i[b, :] (the peer target held constant), or [0, B, C] when need_grad is false. The maths
is in docs/LOSS.md and in dual_kd_loss.cu's header.

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
    "bool weighting, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor)"
)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 maths for fp32/fp16/bf16 logits; fp64 stays fp64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _rowdot(x: Tensor, y: Tensor, scratch: Tensor) -> Tensor:
    """sum_j x[..., j] * y[..., j]: [..., C] -> [...], the products in a reused scratch buffer."""
    return torch.mul(x, y, out=scratch).sum(dim=-1)


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor, scratch: Tensor) -> Tensor:
    """KL(p || q) = sum_j p_j (log p_j - log q_j) per row (broadcasting [B, C] against
    [n, B, C]), differences taken elementwise: not as cross-entropy minus entropy, which loses
    ~1e-7 log C absolute, times T^2 in the loss."""
    return torch.sub(log_p, log_q, out=scratch).mul_(p).sum(dim=-1)


def _softmax_and_log(x: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(x) and log_softmax(x), [B, C] each.

    Two passes rather than exp(log_softmax(x)): on CPU softmax is vectorised and exp is several
    times slower. Deriving log p from p (log p = x - max x + log max p) would save a pass but
    costs ~1.5e-7 absolute in every log p, which the T^2 factor turns into > 1e-6 of the loss.
    """
    return torch.softmax(x, dim=-1), torch.log_softmax(x, dim=-1)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's maths in PyTorch (any device): per-row losses, parts, w and gradients.

    On CPU this is the fused op, so it is written for few operations (both students stacked
    into one [n, B, C] tensor: each op runs once for both) and few [n, B, C] temporaries (the
    smoothed CE from softmax(s) alone, which is also the CE gradient; the KL products in one
    reused scratch buffer; the gradient assembled in place).
    """
    T, eps = temperature, label_smoothing
    B, C = s_a.shape
    cd = compute_dtype(s_a.dtype)
    n = 1 if s_b is None else 2
    S = (s_a.unsqueeze(0) if s_b is None else torch.stack([s_a, s_b])).to(cd)  # [n, B, C]
    y = labels.view(1, B, 1).expand(n, B, 1)
    scratch = torch.empty((n, B, C), dtype=cd, device=s_a.device)

    # CE = lse - (1-eps) s_y - (eps/C) sum s with lse = max s - log max p (max p >= 1/C: no
    # underflow), as a sum of terms >= 0; the log max p rounding (~1e-7) is not scaled by T^2.
    p1 = torch.softmax(S, dim=2)  # [n, B, C], becomes the gradient
    s_max = S.amax(dim=2)  # [n, B]
    neg_log_pmax = p1.amax(dim=2).log_().neg_()
    ce = (1.0 - eps) * (s_max - S.gather(2, y).squeeze(2) + neg_log_pmax) + eps * (s_max - S.mean(dim=2) + neg_log_pmax)

    pT, logpT = _softmax_and_log(S / T)  # p_s, log p_s [n, B, C]
    w = torch.ones(B, dtype=cd, device=s_a.device)
    kd = peer = torch.zeros((n, B), dtype=cd, device=s_a.device)
    if teacher is not None:
        t = teacher.to(cd)
        pt, logpt = _softmax_and_log(t / T)  # [B, C]
        if weighting:
            pw, logpw = _softmax_and_log(t / entropy_temperature)
            entropy = -_rowdot(pw, logpw, scratch[0])  # -sum p log p, elementwise
            w = (1.0 - entropy / math.log(C)).clamp_(0.0, 1.0)
        kd = (a_kd * T * T) * w * _kl_rows(pt, logpt, logpT, scratch)  # KL(p_t || p_s)
    if n == 2:
        # KL(p_B || p_A) = sum p_B d and KL(p_A || p_B) = -sum p_A d with d = log p_B - log p_A
        d = torch.sub(logpT[1], logpT[0], out=scratch[0])
        peer = (a_peer * T * T) * torch.stack([_rowdot(pT[1], d, scratch[1]), -_rowdot(pT[0], d, scratch[1])])
    parts = torch.stack([a_ce * ce, kd, peer], dim=2)  # [n, B, 3]
    loss = parts.sum(dim=(0, 2))  # [B]
    if not need_grad:
        return loss, parts, w, s_a.new_empty((0, B, C))
    # a_ce (softmax(s) - target) + T a_kd w (p_s - p_t) + T a_peer (p_s - p_peer), in place in p1
    g = p1.mul_(a_ce).sub_(a_ce * eps / C)
    g.scatter_add_(2, y, torch.full((n, B, 1), -a_ce * (1.0 - eps), dtype=cd, device=g.device))
    if teacher is not None:
        kd_row = (T * a_kd) * w.view(1, B, 1)
        g.addcmul_(pT, kd_row).addcmul_(pt.unsqueeze(0), kd_row, value=-1.0)
    if n == 2:
        g.add_(pT, alpha=T * a_peer)
        g[0].add_(pT[1], alpha=-T * a_peer)
        g[1].add_(pT[0], alpha=-T * a_peer)
    return loss, parts, w, g.to(s_a.dtype)  # gradients in the logits' dtype


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
            return tuple(ext.forward(*contiguous, *args))  # the kernel reads each row once
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
        s_a.new_empty((n, B, 3), dtype=cd),
        s_a.new_empty((B,), dtype=cd),
        s_a.new_empty((n if need_grad else 0, B, C)),
    )


def _setup_context(ctx, inputs, output):
    ctx.need_grad = inputs[-1]
    ctx.has_b = inputs[2] is not None
    ctx.save_for_backward(output[3])


def _backward(ctx, g_loss, g_parts, g_w, g_grads):
    # Only `loss` is differentiable; parts and w are logged values (callers detach them).
    if not ctx.need_grad:
        raise RuntimeError("fastkd::dual_kd_loss was called with need_grad=False; it has no gradient")
    (grads,) = ctx.saved_tensors  # [n, B, C]
    d = (grads * g_loss.view(1, -1, 1)).to(grads.dtype)
    return None, d[0], d[1] if ctx.has_b else None, None, None, None, None, None, None, None, None, None


dual_kd_loss.register_autograd(_backward, setup_context=_setup_context)
