"""Speed guards that need no GPU: what the training step asks of the host, counted at the
dispatcher (tests/dispatch_counts.py) on the meta device, where the step runs with a GPU run's
shapes and devices but computes nothing.

- 0 host syncs (value reads, size-dependent ops) and 0 host<->device copies per step, for every
  recipe option: EMA, MixUp, CutMix, gradient clipping, AdamW, the teacher cache, and the fp16
  GradScaler (the last on the CPU with the fused optimizer a CUDA run uses: autocast has no meta
  device). One sync per step costs a GPU its lead over the host: the launch queue drains.
- The compiled step: after warm, one graph per kind of batch (unmixed, mixed), no graph break,
  no recompile, with every recipe option around it (on CPU through the counting aot_eager
  backend of tests/test_compile_step.py).
- Host work per eager step: the aten ops the step dispatches beyond a bare reference (the same
  three networks' forward, backward and one foreach optimizer update, measured in the same test)
  stay within a small fixed budget: the loss, the meter and the bookkeeping, not per-parameter or
  per-sample Python work.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dispatch_counts import DispatchCounts
from fastkd.config import resolve_config
from fastkd.recipe import build_optimizer
from fastkd.step import build_step
from test_compile_step import TinyNet, graphs  # noqa: F401 (fixture)
from test_compile_step import batch as compile_batch
from test_train_support import one_thread, tiny_config  # noqa: F401 (fixture)

META = torch.device("meta")
B, RES, CLASSES = 8, 32, 10
# aten ops one eager step may dispatch beyond the bare networks + optimizer reference: the fused
# loss and its backward, the correct counts, the meter's sums, the grad bookkeeping (measured:
# 53 with two students; a per-parameter or per-sample loop would add hundreds)
STEP_OVERHEAD_OPS = 80

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = {
    "plain": {},
    "ema": {"ema.decay": 0.999},
    "mixup": {"augment.mixup": 0.8},
    "cutmix": {"augment.cutmix": 1.0},
    "mixup+cutmix, half the batches": {"augment.mixup": 0.8, "augment.cutmix": 1.0, "augment.mix_prob": 0.5},
    "clipping": {"optim.clip_grad_norm": 1.0},
    "teacher cache": {"model.teacher_cache": "unused-here"},
    "kd, one student": {"loss.method": "uakd", "model.students": "mobilenet_v2"},
}


def config(**keys):
    base = {"model.students": "resnet18,mobilenet_v2", "model.teacher": "resnet18", "loss.method": "uadkd",
            "precision.amp": "fp32", "run.device": "cpu", "data.batch_size": B}  # fmt: skip
    base.update(keys)
    return resolve_config(None, {k: str(v) for k, v in base.items()})


def meta_batch():
    images = torch.empty(B, 3, RES, RES, device=META).contiguous(memory_format=torch.channels_last)
    return images, torch.zeros(B, dtype=torch.int64, device=META)


def meta_step(keys: dict):
    cfg = config(**keys)
    cached = bool(cfg.model.teacher_cache)
    step = build_step(cfg, CLASSES, META, lr=0.1, live_teacher=not cached)
    logits = torch.empty(B, CLASSES, device=META) if cached else None
    return step, logits


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_no_host_sync_and_no_host_copy_per_step(recipe):
    step, logits = meta_step(RECIPES[recipe])
    images, labels = meta_batch()
    with DispatchCounts() as counts:
        for i in range(3):  # the first EMA update copies, later ones average; mixing varies per step
            parts = step(images, labels, seed=i, teacher_logits=logits)
            step.meter.add(parts, B)
    assert not counts.syncs, f"{recipe}: the step reads device values on the host: {Counter(counts.syncs)}"
    assert not counts.host_copies, f"{recipe}: the step copies between host and device: {Counter(counts.host_copies)}"


def cuda_optimizer(step, cfg, monkeypatch):
    """The optimizer build_optimizer makes when every parameter is on CUDA (fused SGD / AdamW),
    built over the CPU students (the CPU has the same fused kernels)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        return build_optimizer(step.students, cfg.optim, 0.1)


FUSED_RECIPES = {
    "fp16 scaler": {"precision.amp": "fp16"},
    "adamw": {"optim.name": "adamw", "optim.lr": 1e-3},
    "adamw, fp16 scaler, clipping": {"optim.name": "adamw", "optim.lr": 1e-3, "precision.amp": "fp16",
                                     "optim.clip_grad_norm": 1.0},
}


@pytest.mark.parametrize("recipe", list(FUSED_RECIPES))
def test_no_host_sync_per_step_with_the_fused_optimizer(recipe, monkeypatch):
    """GradScaler skips a step with inf/NaN gradients: with an optimizer that takes the scaler
    into its kernel (fused SGD / AdamW: `_step_supports_amp_scaling`) the check stays on the
    device; with any other it reads found_inf on the host every step. AdamW's step counts stay
    on the device with the fused kernel; the foreach one reads them. A CUDA run builds the fused
    kernels; here the CPU's fused kernels stand in (autocast has no meta device)."""
    cfg = config(**FUSED_RECIPES[recipe])
    step = build_step(cfg, CLASSES, torch.device("cpu"), lr=0.1)
    step.optimizer = cuda_optimizer(step, cfg, monkeypatch)
    assert step.optimizer.defaults.get("fused") and getattr(step.optimizer, "_step_supports_amp_scaling", False)
    images = torch.randn(B, 3, RES, RES).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(B) % CLASSES
    with DispatchCounts() as counts:
        for i in range(2):
            step(images, labels, seed=i)
    assert not counts.syncs, f"{recipe}: the step reads device values on the host: {Counter(counts.syncs)}"


def bare_reference_ops(step, images) -> int:
    """aten ops of the three networks' forward + backward and one foreach SGD update over the
    students (its second: the first creates the momentum buffers): the floor any step pays."""
    optimizer = torch.optim.SGD(step.students.parameters(), lr=0.1, momentum=0.9, foreach=True)

    def bare():
        with torch.no_grad():
            step.teacher(images)
        loss = sum(net(images).float().sum() for net in step.students.nets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    bare()
    with DispatchCounts() as counts:
        bare()
    return counts.total


def test_host_ops_per_eager_step_within_budget_of_the_bare_networks():
    step, _ = meta_step({})
    # the step's own update uses the same foreach kernels the reference does (fused on CUDA)
    step.optimizer = torch.optim.SGD(step.students.parameters(), lr=0.1, momentum=0.9, foreach=True)
    images, labels = meta_batch()
    step(images, labels, seed=0)  # first-call work (optimizer state) out of the count
    reference = bare_reference_ops(step, images)
    with DispatchCounts() as counts:
        parts = step(images, labels, seed=1)
        step.meter.add(parts, B)
    extra = counts.total - reference
    assert extra <= STEP_OVERHEAD_OPS, (
        f"one eager step dispatches {counts.total} aten ops, {extra} beyond the bare networks + optimizer "
        f"({reference}); budget {STEP_OVERHEAD_OPS}. Most frequent: {counts.ops.most_common(8)}"
    )


# ----------------------------------------------------------------------------- the compiled step

COMPILED_RECIPES = {
    "mixup + cutmix, ema, clipping": {"augment.mixup": 0.4, "augment.cutmix": 1.0, "augment.mix_prob": 0.5,
                                      "ema.decay": 0.99, "optim.clip_grad_norm": 1.0},
    "teacher cache": {"model.teacher_cache": "unused-here"},
}


@pytest.mark.parametrize("recipe", list(COMPILED_RECIPES))
def test_compiled_step_one_graph_per_kind_no_break_no_recompile_after_warm(tmp_path, graphs, recipe):
    """After warm: every training step reuses the warmed graphs (one per kind of batch: unmixed,
    mixed), with no graph break (a break splits the step into several graphs and puts Python
    between them) and no recompile, whatever the recipe runs around the graph."""
    import torch._dynamo.utils as dynamo_utils

    keys = COMPILED_RECIPES[recipe]
    cached = "model.teacher_cache" in keys
    cfg = tiny_config(tmp_path, **{"loss.method": "uadkd", "compile.mode": "inductor", "optim.lr": 0.05,
                                   "optim.lr_per_256": None, **keys})  # fmt: skip
    torch.manual_seed(0)
    teacher = None if cached else TinyNet().eval().requires_grad_(False)
    step = build_step(cfg, 4, torch.device("cpu"), teacher=teacher, nets=[TinyNet(), TinyNet()],
                      live_teacher=not cached)  # fmt: skip
    dynamo_utils.counters.clear()
    step.warm(8, 16, torch.float32)
    warmed = len(graphs)
    assert warmed == (2 if step.augment is not None else 1)
    kinds = set()
    for i in range(6):
        images, labels = compile_batch(16, seed=i)
        logits = torch.randn(8, 4) if cached else None
        step(images, labels, seed=i, teacher_logits=logits)
        kinds.add(step.last_mix is None)
    assert len(graphs) == warmed, f"training compiled {len(graphs) - warmed} more graph(s) after warm"
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    assert len(kinds) == (2 if step.augment is not None else 1)  # both kinds of batch were trained
