"""The distillation loss: reference and fused op vs an independent float64 derivation.

    .venv/bin/python -m pytest tests/test_losses.py        # CPU: values, grads, compile, nvcc
    (on a GPU machine the `gpu` tests also run the CUDA kernel against the same derivation)

`expected_loss` below re-derives the loss from docs/LOSS.md in NumPy float64; it shares no code
with fastkd.losses or fastkd.kernels.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd.errors import FastKDError
from fastkd.losses import LossConfig, distillation_loss, reference_loss

REPO = Path(__file__).resolve().parents[1]
CU_SOURCE = REPO / "kernels" / "dual_kd_loss.cu"

# Written out again from docs/LOSS.md, not imported: method -> (KD term, peer term, weighting).
TERMS = {
    "ce": (False, False, False),
    "kd": (True, False, False),
    "uakd": (True, False, True),
    "dml": (False, True, False),
    "dual": (True, True, False),
    "uadkd": (True, True, True),
}


# ---------------------------------------------------------------------------------------------
# The independent float64 derivation
# ---------------------------------------------------------------------------------------------


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def expected_loss(teacher, students, labels, method, T=4.0, Tw=1.0, a_ce=1.0, a_kd=1.0, a_peer=1.0, eps=0.1):
    """float64 NumPy: {"rows" [B], "loss", "ce"/"kd"/"peer" [n] batch means, "w" [B], "parts" [n, B, 3]}."""
    kd_on, peer_on, w_on = TERMS[method]
    s = [np.asarray(x.detach().cpu().double().numpy()) for x in students]
    y = labels.cpu().numpy()
    B, C = s[0].shape
    w = np.ones(B)
    if kd_on:
        t = teacher.detach().cpu().double().numpy()
        log_pt = _log_softmax64(t / T)
        if w_on:
            log_q = _log_softmax64(t / Tw)
            w = np.clip(1.0 - (-(np.exp(log_q) * log_q).sum(1)) / math.log(C), 0.0, 1.0)
    target = np.full((B, C), eps / C)
    target[np.arange(B), y] += 1.0 - eps
    parts = np.zeros((len(s), B, 3))
    for i, x in enumerate(s):
        parts[i, :, 0] = a_ce * -(target * _log_softmax64(x)).sum(1)
        log_ps = _log_softmax64(x / T)
        if kd_on:
            parts[i, :, 1] = a_kd * w * T * T * (np.exp(log_pt) * (log_pt - log_ps)).sum(1)
        if peer_on:
            log_pq = _log_softmax64(s[1 - i] / T)
            parts[i, :, 2] = a_peer * T * T * (np.exp(log_pq) * (log_pq - log_ps)).sum(1)
    rows = parts.sum(axis=(0, 2))
    means = parts.mean(axis=1)
    return {"rows": rows, "loss": rows.mean(), "ce": means[:, 0], "kd": means[:, 1], "peer": means[:, 2],
            "w": w, "parts": parts}


def expected_row_grads(teacher, students, labels, method, T=4.0, Tw=1.0, a_ce=1.0, a_kd=1.0, a_peer=1.0, eps=0.1):
    """float64 NumPy d(L_A + L_B)[b] / d s_i[b, :] per student, with the peer target held constant.

    Not the true derivative where a peer term is on (L_B depends on s_A through p_A, by design
    not differentiated), which is why gradcheck alone cannot cover the peer methods.
    """
    kd_on, peer_on, _ = TERMS[method]
    s = [x.detach().cpu().double().numpy() for x in students]
    B, C = s[0].shape
    w = expected_loss(teacher, students, labels, method, T, Tw, a_ce, a_kd, a_peer, eps)["w"][:, None]
    target = np.full((B, C), eps / C)
    target[np.arange(B), labels.cpu().numpy()] += 1.0 - eps
    grads = []
    for i, x in enumerate(s):
        g = a_ce * (np.exp(_log_softmax64(x)) - target)
        p_s = np.exp(_log_softmax64(x / T))
        if kd_on:
            g += T * a_kd * w * (p_s - np.exp(_log_softmax64(teacher.detach().cpu().double().numpy() / T)))
        if peer_on:
            g += T * a_peer * (p_s - np.exp(_log_softmax64(s[1 - i] / T)))
        grads.append(g)
    return grads


def rel_err(got, want, scale=0.0) -> float:
    """max |got - want| / max(max |want|, scale): normwise relative error."""
    got = np.asarray(torch.as_tensor(got).detach().cpu().double().numpy())
    want = np.asarray(want, dtype=np.float64)
    denom = max(float(np.abs(want).max(initial=0.0)), scale, 1e-30)
    return float(np.abs(got - want).max(initial=0.0)) / denom


def check_result(out, exp, rtol, w_atol=1e-6):
    """The loss to rtol; parts to rtol of the loss's magnitude (a part may be ~0); w to w_atol."""
    scale = abs(exp["loss"])
    assert rel_err(out["loss"], exp["loss"]) <= rtol, (float(out["loss"]), exp["loss"])
    for key in ("ce", "kd", "peer"):
        assert out[key].shape == (len(exp[key]),)
        assert rel_err(out[key], exp[key], scale) <= rtol, (key, out[key], exp[key])
    assert float(np.abs(out["w"].double().cpu().numpy() - exp["w"]).max()) <= w_atol, (out["w"], exp["w"])


def make_inputs(B, C, scale, kind="random", seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, C, generator=g) * scale
    if kind == "uniform":  # every class equally likely: w = 0
        t = torch.full((B, C), 3.0)
    elif kind == "onehot":  # a near-certain teacher: w near 1
        t = torch.zeros(B, C)
        t[torch.arange(B), torch.randint(0, C, (B,), generator=g)] = 1e4
    a = torch.randn(B, C, generator=g) * scale
    b = torch.randn(B, C, generator=g) * scale
    y = torch.randint(0, C, (B,), generator=g)
    if dtype == torch.float16:  # randn * 3e4 can pass fp16's largest finite value, 65504
        t, a, b = (x.clamp(-6e4, 6e4) for x in (t, a, b))
    return [x.to(device=device, dtype=dtype) for x in (t, a, b)] + [y.to(device)]


def kwargs_of(cfg: LossConfig) -> dict:
    return dict(T=cfg.temperature, Tw=cfg.entropy_temperature, a_ce=cfg.a_ce, a_kd=cfg.a_kd, a_peer=cfg.a_peer,
                eps=cfg.label_smoothing)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_presets_turn_on_the_documented_terms():
    for name, (kd, peer, weighting) in TERMS.items():
        cfg = LossConfig.from_method(name)
        assert (cfg.uses_teacher, cfg.uses_peer, cfg.weighting) == (kd, peer, weighting), name
        assert cfg.kd_weight == (1.0 if kd else 0.0) and cfg.peer_weight == (1.0 if peer else 0.0)
    cfg = LossConfig()
    assert (cfg.method, cfg.temperature, cfg.entropy_temperature, cfg.label_smoothing) == ("uadkd", 4.0, 1.0, 0.1)
    assert LossConfig.from_method("kd", temperature=2, a_kd=0.5).temperature == 2.0


def test_config_errors_name_the_culprit():
    with pytest.raises(FastKDError, match=r"'dkd'.*ce, kd, uakd, dml, dual, uadkd"):
        LossConfig.from_method("dkd")
    with pytest.raises(FastKDError, match="tempreature"):
        LossConfig.from_method("kd", tempreature=3.0)
    with pytest.raises(FastKDError, match="temperature must be > 0"):
        LossConfig.from_method("kd", temperature=0.0)
    with pytest.raises(FastKDError, match="label_smoothing"):
        LossConfig.from_method("kd", label_smoothing=1.0)
    with pytest.raises(FastKDError, match="a_peer"):
        LossConfig.from_method("dml", a_peer=-1.0)
    with pytest.raises(FastKDError, match="'bogus'"):
        LossConfig(method="bogus")


def test_call_errors_are_programming_errors_not_user_errors():
    """Malformed loss inputs are bugs in the caller: ValueError/TypeError with a traceback,
    never FastKDError (which the CLI prints as if a flag were wrong)."""
    t, a, b, y = make_inputs(4, 5, 1.0)
    cases = [
        (ValueError, "needs teacher logits", lambda: distillation_loss(None, [a, b], y, LossConfig.from_method("uadkd"))),
        (ValueError, "needs two students", lambda: distillation_loss(t, [a], y, LossConfig.from_method("dml"))),
        (ValueError, "shapes differ", lambda: distillation_loss(t[:, :4], [a, b], y, LossConfig.from_method("kd"))),
        (ValueError, "C >= 2", lambda: distillation_loss(None, [a[:, :1]], y, LossConfig.from_method("ce"))),
        (TypeError, "floating point", lambda: distillation_loss(None, [y[:, None].expand(4, 5)], y,
                                                                 LossConfig.from_method("ce"))),
    ]
    for kind, text, call in cases:
        with pytest.raises(kind, match=text) as error:
            call()
        assert not isinstance(error.value, FastKDError)


# ---------------------------------------------------------------------------------------------
# Values: reference and fused (CPU op) vs the float64 derivation
# ---------------------------------------------------------------------------------------------

SHAPES = [(1, 2), (5, 7), (16, 100)]
SCALES = [0.1, 1.0, 10.0, 1e4]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("method", list(TERMS))
def test_fp32_matches_float64(method, fused):
    for (B, C) in SHAPES:
        for scale in SCALES:
            for eps in (0.0, 0.1):
                cfg = LossConfig.from_method(method, label_smoothing=eps)
                t, a, b, y = make_inputs(B, C, scale, seed=B + C)
                out = distillation_loss(t, [a, b], y, cfg, fused=fused)
                check_result(out, expected_loss(t, [a, b], y, method, **kwargs_of(cfg)), rtol=1e-6)
                assert out["loss"].dtype == torch.float32 and out["w"].shape == (B,)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("kind,w_want", [("uniform", 0.0), ("onehot", 1.0)])
def test_teacher_confidence_extremes(kind, w_want, fused):
    cfg = LossConfig.from_method("uadkd", a_kd=2.0, temperature=3.0, entropy_temperature=2.0)
    t, a, b, y = make_inputs(6, 10, 5.0, kind=kind)
    out = distillation_loss(t, [a, b], y, cfg, fused=fused)
    exp = expected_loss(t, [a, b], y, "uadkd", **kwargs_of(cfg))
    check_result(out, exp, rtol=1e-6)
    assert np.allclose(exp["w"], w_want, atol=1e-6) and torch.allclose(out["w"], torch.full((6,), w_want), atol=1e-6)
    if kind == "uniform":
        assert float(out["kd"].abs().max()) <= 1e-6 * float(out["loss"])


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_single_student(fused):
    t, a, _, y = make_inputs(8, 12, 2.0)
    for method in ("ce", "kd", "uakd"):
        cfg = LossConfig.from_method(method)
        teacher = None if method == "ce" else t
        out = distillation_loss(teacher, [a], y, cfg, fused=fused)
        check_result(out, expected_loss(teacher, [a], y, method, **kwargs_of(cfg)), rtol=1e-6)
        assert out["ce"].shape == (1,)
    # ce ignores a teacher it is given; two students with ce work too
    out = distillation_loss(t, [a, a * 2], y, LossConfig.from_method("ce"), fused=fused)
    assert torch.equal(out["w"], torch.ones(8)) and float(out["kd"].abs().sum()) == 0.0


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_bf16_inputs(fused):
    cfg = LossConfig.from_method("uadkd")
    for scale in (1.0, 10.0):
        t, a, b, y = make_inputs(16, 100, scale, seed=3)
        t16, a16, b16 = (x.bfloat16() for x in (t, a, b))
        out = distillation_loss(t16, [a16, b16], y, cfg, fused=fused)
        assert out["loss"].dtype == torch.float32  # fp32 maths on bf16 logits
        # fp32 maths on the bf16 values themselves: as exact as fp32 inputs
        check_result(out, expected_loss(t16, [a16, b16], y, "uadkd"), rtol=1e-6)
        # and bf16 rounding of the logits moves the loss by at most 1 %
        check_result(out, expected_loss(t, [a, b], y, "uadkd"), rtol=1e-2, w_atol=1e-2)


def test_loss_is_the_sum_of_its_parts():
    t, a, b, y = make_inputs(9, 11, 3.0)
    for fused in (False, True):
        out = distillation_loss(t, [a, b], y, LossConfig.from_method("uadkd", a_ce=0.5, a_peer=2.0), fused=fused)
        total = out["ce"].sum() + out["kd"].sum() + out["peer"].sum()
        assert torch.allclose(out["loss"], total, rtol=1e-6)


def test_env_var_forces_reference(monkeypatch):
    t, a, b, y = make_inputs(4, 6, 1.0)
    cfg = LossConfig.from_method("uadkd")
    a.requires_grad_(True)
    monkeypatch.setenv("FASTKD_LOSS_IMPL", "reference")
    out = distillation_loss(t, [a, b], y, cfg, fused=True)
    assert "dual_kd_loss" not in str(out["loss"].grad_fn.next_functions)  # autograd graph of the reference
    assert out["loss"].grad_fn.name() == "MeanBackward0"
    monkeypatch.setenv("FASTKD_LOSS_IMPL", "fast")
    with pytest.raises(FastKDError, match="FASTKD_LOSS_IMPL"):
        distillation_loss(t, [a, b], y, cfg)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(TERMS))
def test_op_grads_equal_autograd_through_float64_reference(method):
    cfg = LossConfig.from_method(method, label_smoothing=0.1, a_peer=1.5)
    for (B, C), scale in [((1, 2), 1.0), ((7, 30), 3.0), ((4, 100), 1e3)]:
        t, a, b, y = make_inputs(B, C, scale, seed=C)
        a64, b64 = (x.double().requires_grad_(True) for x in (a, b))
        reference_loss(t.double(), [a64, b64], y, cfg)["loss"].backward()
        a32, b32 = (x.clone().requires_grad_(True) for x in (a, b))
        (3.0 * distillation_loss(t, [a32, b32], y, cfg, fused=True)["loss"]).backward()
        row_grads = expected_row_grads(t, [a, b], y, method, **kwargs_of(cfg))
        for got, want, formula in ((a32.grad, a64.grad, row_grads[0]), (b32.grad, b64.grad, row_grads[1])):
            assert got.dtype == torch.float32
            assert rel_err(got, 3.0 * want.numpy()) <= 1e-5, (method, B, C)
            assert rel_err(got, 3.0 * formula / B) <= 1e-5, (method, B, C)


def test_op_grads_bf16_have_input_dtype():
    t, a, b, y = make_inputs(8, 50, 2.0, dtype=torch.bfloat16)
    a.requires_grad_(True)
    b.requires_grad_(True)
    distillation_loss(t, [a, b], y, LossConfig.from_method("uadkd"))["loss"].backward()
    a64, b64 = (x.detach().double().requires_grad_(True) for x in (a, b))
    reference_loss(t.double(), [a64, b64], y, LossConfig.from_method("uadkd"))["loss"].backward()
    assert a.grad.dtype == torch.bfloat16 and rel_err(a.grad, a64.grad.numpy()) <= 1e-2
    assert rel_err(b.grad, b64.grad.numpy()) <= 1e-2


def test_gradcheck_reference_float64():
    # Methods without a peer term: there the gradient is the true derivative (w and the teacher
    # are constants). The peer methods' stop-gradient is checked against expected_row_grads.
    t, a, b, y = make_inputs(3, 5, 2.0, dtype=torch.float64)
    a.requires_grad_(True)
    b.requires_grad_(True)
    for method in ("ce", "kd", "uakd"):
        cfg = LossConfig.from_method(method, temperature=2.0, entropy_temperature=0.7)
        assert torch.autograd.gradcheck(lambda a, b: reference_loss(t, [a, b], y, cfg)["loss"], (a, b))
    cfg = LossConfig.from_method("ce")
    assert torch.autograd.gradcheck(lambda a: reference_loss(None, [a], y, cfg)["loss"], (a,))


def test_gradcheck_op_float64_per_row():
    # Checks the full Jacobian of the per-row losses: the saved gradients and their scaling by
    # an arbitrary upstream gradient.
    t, a, b, y = make_inputs(3, 5, 2.0, dtype=torch.float64)
    a.requires_grad_(True)
    b.requires_grad_(True)
    op = torch.ops.fastkd.dual_kd_loss
    assert torch.autograd.gradcheck(lambda a, b: op(t, a, b, y, 2.0, 0.7, 1.0, 1.5, 0.0, 0.1, True, True)[0], (a, b))
    assert torch.autograd.gradcheck(lambda a: op(None, a, None, y, 2.0, 1.0, 1.0, 0.0, 0.0, 0.2, False, True)[0], (a,))


def test_no_grad_skips_gradients():
    t, a, b, y = make_inputs(4, 6, 1.0)
    with torch.no_grad():
        out = distillation_loss(t, [a.requires_grad_(True), b], y, LossConfig.from_method("uadkd"))
    assert out["loss"].grad_fn is None
    grads = torch.ops.fastkd.dual_kd_loss(t, a, b, y, 4.0, 1.0, 1.0, 1.0, 1.0, 0.1, True, False)[3]
    assert grads.shape == (0, 4, 6)


# ---------------------------------------------------------------------------------------------
# torch.compile: one graph, same values and gradients
# ---------------------------------------------------------------------------------------------


class _Nets(torch.nn.Module):
    def __init__(self, d=12, C=10):
        super().__init__()
        self.teacher = torch.nn.Linear(d, C)
        self.a = torch.nn.Linear(d, C)
        self.b = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))


def _loss_step(nets, x, y, cfg):
    with torch.no_grad():
        t = nets.teacher(x)
    return distillation_loss(t, [nets.a(x), nets.b(x)], y, cfg, fused=True)


def _grads(nets):
    return [p.grad.clone() for p in list(nets.a.parameters()) + list(nets.b.parameters())]


def _compile_and_compare(device, backend):
    torch.manual_seed(0)
    nets = _Nets().to(device)
    x = torch.randn(8, 12, device=device) * 3
    y = torch.randint(0, 10, (8,), device=device)
    cfg = LossConfig.from_method("uadkd")
    eager = _loss_step(nets, x, y, cfg)
    eager["loss"].backward()
    want = _grads(nets)
    nets.zero_grad(set_to_none=True)

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    step = torch.compile(_loss_step, backend=recording_backend, fullgraph=True)
    for _ in range(2):  # the second call replays (cudagraphs records on the first ones)
        nets.zero_grad(set_to_none=True)
        got = step(nets, x, y, cfg)
        got["loss"].backward()
    assert len(graphs) == 1  # fullgraph=True already fails on a graph break
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.fastkd.dual_kd_loss.default in targets or torch.ops.fastkd.dual_kd_loss in targets
    for key in ("loss", "ce", "kd", "peer", "w"):
        torch.testing.assert_close(got[key], eager[key], rtol=1e-6, atol=1e-6)
    for g, w in zip(_grads(nets), want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_compile_fullgraph_cpu():
    _compile_and_compare("cpu", "aot_eager")


# ---------------------------------------------------------------------------------------------
# The CUDA source compiles (no GPU needed)
# ---------------------------------------------------------------------------------------------


def test_cuda_source_compiles_for_sm80_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    cmd = [nvcc, "-std=c++17", "-O3", "-c", str(CU_SOURCE), "-o", str(tmp_path / "dual_kd_loss.o"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-Werror", "all-warnings"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "dual_kd_loss.o").stat().st_size > 0


def test_missing_toolkit_is_a_clear_error(monkeypatch):
    from fastkd.kernels import build

    monkeypatch.setattr(build, "_extension", None)
    monkeypatch.setattr(build, "find_cuda_home", lambda: None)
    with pytest.raises(build.ExtensionUnavailable, match="FASTKD_LOSS_IMPL=reference"):
        build.load_extension()
    assert issubclass(build.ExtensionUnavailable, FastKDError)


@pytest.mark.slow
def test_extension_builds_and_checks_its_inputs():
    """Builds the full torch extension (binding + kernel) for sm_90 and loads it, without a GPU."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    code = (
        "import torch\n"
        "from fastkd.kernels import load_extension\n"
        "ext = load_extension()\n"
        "try:\n"
        "    ext.forward(None, torch.zeros(2, 3), None, torch.zeros(2, dtype=torch.long), 4., 1., 1., 1., 1., .1, True, True)\n"
        "except RuntimeError as e:\n"
        "    assert 'CUDA tensor' in str(e), e\n"
        "    print('ok')\n"
    )
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout[-2000:], proc.stderr[-4000:])


# ---------------------------------------------------------------------------------------------
# GPU: the kernel itself (skipped without CUDA)
# ---------------------------------------------------------------------------------------------

GPU_SHAPES = [(1, 2), (3, 5), (64, 64), (37, 100), (256, 100), (5, 257), (33, 1000), (128, 1000), (3, 2049),
              (2, 5000)]
GPU_CASES = [  # (method, n_students)
    ("uadkd", 2), ("dual", 2), ("dml", 2), ("ce", 2), ("ce", 1), ("kd", 1), ("uakd", 1),
]


def _poisoned_outputs(B, C, n, dtype):
    """NaN-filled outputs for forward_out: an element the kernel does not write stays NaN."""
    f32 = dict(device="cuda", dtype=torch.float32)
    return [torch.full((B,), float("nan"), **f32), torch.full((n, B, 3), float("nan"), **f32),
            torch.full((B,), float("nan"), **f32), torch.full((n, B, C), float("nan"), device="cuda", dtype=dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_kernel_matches_float64(dtype):
    from fastkd.kernels import load_extension

    ext = load_extension()
    grad_rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for (B, C) in GPU_SHAPES:
        for scale in (1.0, 10.0, 1e4 if dtype != torch.float16 else 3e4):
            for method, n in GPU_CASES:
                cfg = LossConfig.from_method(method, label_smoothing=0.1 if C % 2 else 0.0, a_peer=0.7)
                t, a, b, y = make_inputs(B, C, scale, seed=B * C, dtype=dtype, device="cuda")
                teacher = t if cfg.uses_teacher else None
                sb = b if n == 2 else None
                outs = _poisoned_outputs(B, C, n, dtype)
                ext.forward_out(teacher, a, sb, y, cfg.temperature, cfg.entropy_temperature, cfg.a_ce,
                                cfg.kd_weight, cfg.peer_weight, cfg.label_smoothing, cfg.weighting, *outs)
                loss, parts, w, grads = outs
                where = (dtype, B, C, scale, method, n)
                for o in outs:
                    assert bool(torch.isfinite(o).all()), ("unwritten or non-finite output", where)
                students = [a, b][:n]
                exp = expected_loss(teacher, students, y, method, **kwargs_of(cfg))
                assert rel_err(loss, exp["rows"]) <= 1e-5, where
                assert rel_err(parts, exp["parts"], float(np.abs(exp["rows"]).max())) <= 1e-5, where
                assert float((w.double().cpu() - torch.from_numpy(exp["w"])).abs().max()) <= 1e-5, where
                # gradients vs autograd through the float64 reference (its loss is the batch mean)
                s64 = [x.double().requires_grad_(True) for x in students]
                t64 = teacher.double() if teacher is not None else None
                reference_loss(t64, s64, y, cfg)["loss"].backward()
                for got, x in zip(grads, s64):
                    assert got.dtype == dtype
                    assert rel_err(got, (B * x.grad).cpu().numpy()) <= grad_rtol, where


@pytest.mark.gpu
def test_kernel_without_grad_and_bad_labels():
    from fastkd.kernels import load_extension

    ext = load_extension()
    t, a, b, y = make_inputs(8, 100, 2.0, device="cuda")
    loss, parts, w, grads = ext.forward(t, a, b, y, 4.0, 1.0, 1.0, 1.0, 1.0, 0.1, True, False)
    assert grads.shape == (0, 8, 100) and parts.shape == (2, 8, 3)
    exp = expected_loss(t, [a, b], y, "uadkd")
    assert rel_err(loss, exp["rows"]) <= 1e-5
    y_bad = y.clone()
    y_bad[3] = 100  # out of range: NaN for that row, no out-of-bounds read
    loss = ext.forward(t, a, b, y_bad, 4.0, 1.0, 1.0, 1.0, 1.0, 0.1, True, True)[0]
    assert bool(torch.isnan(loss[3])) and bool(torch.isfinite(loss[torch.arange(8) != 3]).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_distillation_loss_cuda_matches_reference(dtype):
    cfg = LossConfig.from_method("uadkd")
    t, a, b, y = make_inputs(64, 100, 3.0, dtype=dtype, device="cuda")
    results = []
    for fused in (True, False):
        sa, sb = (x.clone().requires_grad_(True) for x in (a, b))
        out = distillation_loss(t, [sa, sb], y, cfg, fused=fused)
        out["loss"].backward()
        results.append((out, sa.grad, sb.grad))
    (f, fa, fb), (r, ra, rb) = results
    for key in ("loss", "ce", "kd", "peer", "w"):
        torch.testing.assert_close(f[key], r[key], rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(fa, ra.float().cpu().numpy()) <= tol and rel_err(fb, rb.float().cpu().numpy()) <= tol


@pytest.mark.gpu
def test_compile_fullgraph_cuda_cudagraphs():
    """The Triton-free path: the step with the op compiles with backend="cudagraphs"."""
    _compile_and_compare("cuda", "cudagraphs")
