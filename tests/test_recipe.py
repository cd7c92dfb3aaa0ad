"""Recipe knobs of the one training step: AdamW, lr vs lr_per_256, gradient clipping, min_lr,
EMA of the students, MixUp / CutMix (teacher sees the mixed batch, CE mixed exactly)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fastkd.config import config_to_dict, resolve_config, save_config
from fastkd.errors import FastKDError
from fastkd.losses import distillation_loss, reference_loss
from fastkd.recipe import MIX_STREAM, param_groups
from fastkd.schedule import lr_at, peak_lr, saved_peak_lr
from fastkd.step import build_step
from test_train_support import one_thread  # noqa: F401 (fixture)

CPU = torch.device("cpu")
B, RES, CLASSES = 8, 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (test_train_support)


def config(**keys):
    """Two resnet18 students, a resnet18 teacher, uadkd, fp32 on the CPU; keys {"sec.key": value}."""
    base = {"model.students": "resnet18,resnet18", "model.teacher": "resnet18", "loss.method": "uadkd",
            "precision.amp": "fp32", "run.device": "cpu", "data.batch_size": B}  # fmt: skip
    base.update(keys)
    return resolve_config(None, {k: str(v) for k, v in base.items()})


def make_step(lr=0.05, **keys):
    cfg = config(**keys)
    torch.manual_seed(0)  # same students and (random) teacher for every step built here
    return build_step(cfg, CLASSES, CPU, lr=lr)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, RES, RES, generator=g).contiguous(memory_format=torch.channels_last)
    return images, torch.arange(B) % CLASSES


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- optimizer and lr


def test_adamw_is_built_and_takes_adamw_steps():
    lr, wd = 1e-3, 5e-5
    step = make_step(lr=lr, **{"optim.name": "adamw", "optim.weight_decay": wd})
    opt = step.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]  # CPU: foreach kernels
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]  # groups as for SGD
    assert all(p.ndim > 1 for p in opt.param_groups[0]["params"])
    before = [p.detach().clone() for p in step.students.parameters()]
    step(*batch(), seed=1)
    moved = 0
    for group in opt.param_groups:
        for p in group["params"]:
            p0 = before[[id(q) for q in step.students.parameters()].index(id(p))]
            g = p.grad
            # AdamW's first step: decoupled decay, then lr * g / (|g| + eps) (bias-corrected moments)
            expected = p0 * (1 - lr * group["weight_decay"]) - lr * g / (g.abs() + 1e-8)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
            moved += int(not torch.equal(p.detach(), p0))
    assert moved > 0


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_resumed_optimizer_keeps_this_devices_kernels(name):
    """A state saved by an optimizer with other kernels (a CPU run, or SGD before the fused
    kernel) loads its momentum and steps but not its kernel flags: the fused kernel stays on."""
    from fastkd.recipe import load_optimizer_state

    p = nn.Parameter(torch.randn(5))
    cls, extra, key = ((torch.optim.SGD, {"momentum": 0.9}, "momentum_buffer") if name == "sgd"
                       else (torch.optim.AdamW, {}, "exp_avg"))  # fmt: skip
    saved = cls([p], lr=0.1, foreach=False, **extra)
    p.grad = torch.randn(5)
    saved.step()
    fused = cls([p], lr=0.1, fused=True, **extra)
    load_optimizer_state(fused, saved.state_dict())
    assert fused.param_groups[0]["fused"] is True and not fused.param_groups[0]["foreach"]
    assert torch.equal(fused.state[p][key], saved.state[p][key])  # the run's state itself is loaded


def test_optimizer_flag_alias():
    from fastkd.config_cli import parse_train_argv

    cfg = resolve_config(None, parse_train_argv(["--optimizer", "adamw", "--lr", "0.002"]).overrides)
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 0.002 and cfg.optim.lr_per_256 is None


def test_peak_lr_absolute_or_per_256():
    cfg = config(**{"optim.lr_per_256": 0.5, "data.batch_size": 64})
    assert peak_lr(cfg, 2) == (0.25, "peak lr 0.25 (lr_per_256 0.5 x 128 images / 256)")
    cfg = config(**{"optim.lr": 0.1, "data.batch_size": 64})
    assert peak_lr(cfg, 2)[0] == 0.1 and peak_lr(cfg, 8)[0] == 0.1  # absolute: no scaling
    assert "optim.lr" in peak_lr(cfg, 2)[1]
    default = config(**{"data.batch_size": 64})
    assert default.optim.lr is None and default.optim.lr_per_256 is None
    assert peak_lr(default, 2) == (0.25, "peak lr 0.25 (sgd's default lr_per_256 0.5 x 128 images / 256)")
    # the step's default lr is the one-rank peak, not the raw config number
    step = build_step(config(**{"optim.lr_per_256": 0.5}), CLASSES, CPU)
    assert step.optimizer.param_groups[0]["lr"] == 0.5 * B / 256


def test_lr_and_lr_per_256_exclusive_per_layer(tmp_path):
    with pytest.raises(FastKDError, match=r"optim\.lr .*optim\.lr_per_256"):
        resolve_config(None, {"optim.lr": "0.1", "optim.lr_per_256": "0.5"})
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.1, "lr_per_256": 0.5}}))
    with pytest.raises(FastKDError, match=r"both\.yaml.*optim\.lr .*optim\.lr_per_256"):
        resolve_config(path)
    # a later layer that sets one drops the other: file lr_per_256, flag --lr
    path.write_text(yaml.safe_dump({"optim": {"lr_per_256": 0.2}}))
    cfg = resolve_config(path, {"optim.lr": "0.3"})
    assert (cfg.optim.lr, cfg.optim.lr_per_256) == (0.3, None)
    ckpt_config = config_to_dict(cfg)  # this version's checkpoint: both keys
    cfg = resolve_config(None, {"optim.lr_per_256": "0.4"}, base=ckpt_config)
    assert (cfg.optim.lr, cfg.optim.lr_per_256) == (None, 0.4)


def test_saved_configs_read_lr_as_written(tmp_path):
    """A checkpoint's or config.yaml's optim.lr is the absolute peak lr, as this version writes it."""
    saved = config_to_dict(config(**{"optim.lr": 0.3}))
    assert saved_peak_lr(saved, 2)[0] == 0.3
    cfg = resolve_config(None, base=saved)
    assert (cfg.optim.lr, cfg.optim.lr_per_256) == (0.3, None)
    path = tmp_path / "config.yaml"
    save_config(config(**{"optim.lr_per_256": 0.4}), path)
    assert saved_peak_lr(yaml.safe_load(path.read_text()), 2)[0] == pytest.approx(0.4 * B * 2 / 256)


def test_min_lr_floors_the_decay():
    peak, floor = 1.0, 0.1
    for shape in ("cosine", "linear"):
        lrs = [lr_at(s, 100, 10, peak, shape, min_lr=floor) for s in range(101)]
        assert lrs[:10] == [lr_at(s, 100, 10, peak, shape) for s in range(10)]  # warm-up unchanged
        assert lrs[100] == pytest.approx(floor) and min(lrs[10:]) == pytest.approx(floor)
        assert lrs[55] == pytest.approx(floor + (peak - floor) * 0.5)  # half-way through the decay
    # min_lr 0: exactly the schedule before min_lr existed
    for s in range(10, 100):
        progress = (s - 10) / 90
        assert lr_at(s, 100, 10, 0.7, "cosine", min_lr=0.0) == 0.7 * 0.5 * (1.0 + math.cos(math.pi * progress))
        assert lr_at(s, 100, 10, 0.7, "linear", min_lr=0.0) == 0.7 * (1.0 - progress)
    assert config(**{"schedule.min_lr": 1e-5}).schedule.min_lr == 1e-5
    with pytest.raises(FastKDError, match=r"schedule\.min_lr"):
        peak_lr(config(**{"schedule.min_lr": 0.5, "optim.lr": 0.1}), 1)


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("amp", ["fp32", "fp16"])
def test_clip_grad_norm_bounds_each_student(amp):
    max_norm = 0.05
    step = make_step(**{"optim.clip_grad_norm": max_norm, "precision.amp": amp, "loss.fused": "false"})
    free = make_step(**{"precision.amp": amp, "loss.fused": "false"})  # same init, no clipping
    if amp == "fp16":  # a scale whose fp16 gradients stay finite on this tiny net (65536 overflows)
        step.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        free.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    images, labels = batch()
    parts = step(images, labels, seed=3)
    free(images, labels, seed=3)
    for net, free_net, pre in zip(step.students.nets, free.students.nets, parts["grad_norm"]):
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))
        raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in free_net.parameters()]))
        assert pre > 10 * max_norm and pre == pytest.approx(raw.item(), rel=1e-3)
        assert clipped == pytest.approx(max_norm, rel=1e-3)  # clipped after unscale_, not before
    assert "grad_norm" not in free(images, labels, seed=4)


# ----------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("every", [1, 2])
def test_ema_is_the_running_average_and_changes_nothing_else(every):
    decay, k = 0.9, 3 * every
    step = make_step(**{"ema.decay": decay, "ema.every": every})
    plain = make_step()
    raw = []  # the raw students after each update of the EMA
    for i in range(k):
        images, labels = batch(i)
        step(images, labels, seed=i)
        plain(images, labels, seed=i)
        if (i + 1) % every == 0:
            raw.append(snapshot(step.students.nets[0]))
    expected = dict(raw[0])  # the first update copies, then ema = decay * ema + (1 - decay) * raw
    for weights in raw[1:]:
        for key, value in weights.items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value
            else:
                expected[key] = value
    averaged = step.ema.modules()
    assert list(averaged) == ["resnet18", "resnet18-2"]
    got = averaged["resnet18"].state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any("running_mean" in key for key in got)  # buffers averaged too
    # raw training is bit-identical with the EMA on or off
    for a, b in zip(step.students.state_dict().values(), plain.students.state_dict().values()):
        assert torch.equal(a, b)
    # the EMA round-trips through a state dict (last.pt)
    again = make_step(**{"ema.decay": decay, "ema.every": every})
    again.ema.load_state_dict(copy.deepcopy(step.ema.state_dict()))
    assert again.ema.calls == k
    for a, b in zip(again.ema.modules()["resnet18-2"].state_dict().values(),
                    averaged["resnet18-2"].state_dict().values()):  # fmt: skip
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- MixUp / CutMix


def capture(step):
    """Inputs of the teacher and of each student, and the students' logits, of the next call."""
    seen = {"teacher": [], "students": [], "logits": []}

    def teacher_hook(module, args, out) -> None:
        seen["teacher"].append((args[0].clone(), out.clone()))

    def student_hook(module, args, out) -> None:
        seen["students"].append(args[0].clone())
        seen["logits"].append(out.detach().clone())

    step.teacher.register_forward_hook(teacher_hook)
    for net in step.students.nets:
        net.register_forward_hook(student_hook)
    return seen


def test_mixup_teacher_and_students_see_one_mixed_batch_and_ce_is_mixed():
    alpha, seed, eps = 0.4, 123, 0.1
    step = make_step(**{"augment.mixup": alpha, "loss.label_smoothing": eps})
    seen = capture(step)
    images, labels = batch()
    parts = step(images, labels, seed=seed)
    rng = np.random.default_rng([seed, MIX_STREAM])  # documented order: mix_prob coin, then lam
    assert rng.random() < 1.0
    lam = float(rng.beta(alpha, alpha))
    assert step.last_mix.kind == "mixup" and step.last_mix.lam == lam
    mixed = images * lam + images.roll(1, dims=0) * (1 - lam)
    teacher_in, teacher_out = seen["teacher"][0]
    assert all(torch.equal(teacher_in, s) for s in seen["students"])  # consistent teaching
    torch.testing.assert_close(teacher_in, mixed)
    assert not torch.allclose(teacher_in, images)
    y_a, y_b = labels, labels.roll(1)
    logits = seen["logits"]
    ce = [lam * F.cross_entropy(s, y_a, label_smoothing=eps) + (1 - lam) * F.cross_entropy(s, y_b, label_smoothing=eps)
          for s in logits]  # fmt: skip
    torch.testing.assert_close(parts["ce"], torch.stack(ce))
    ref_a = reference_loss(teacher_out, logits, y_a, step.loss)
    ref_b = reference_loss(teacher_out, logits, y_b, step.loss)
    torch.testing.assert_close(ref_a["kd"], ref_b["kd"])  # KD and peer do not depend on labels
    torch.testing.assert_close(parts["kd"], ref_a["kd"])
    torch.testing.assert_close(parts["peer"], ref_a["peer"])
    torch.testing.assert_close(parts["loss"], lam * ref_a["loss"] + (1 - lam) * ref_b["loss"])
    dominant = y_a if lam >= 0.5 else y_b
    assert parts["correct"].tolist() == [int((s.argmax(1) == dominant).sum()) for s in logits]
    # the draws are the step seed's: same seed, same lam; another seed, another lam
    step(images, labels, seed=seed)
    assert step.last_mix.lam == lam
    step(images, labels, seed=seed + 1)
    assert step.last_mix.lam != lam


def test_cutmix_pastes_a_box_of_the_rolled_batch():
    seed = 5
    step = make_step(**{"augment.cutmix": 1.0})
    seen = capture(step)
    images, labels = batch()
    step(images, labels, seed=seed)
    rng = np.random.default_rng([seed, MIX_STREAM])
    rng.random()  # mix_prob coin
    ratio = math.sqrt(1 - rng.beta(1.0, 1.0))
    cy, cx = int(rng.integers(0, RES)), int(rng.integers(0, RES))
    h, w = int(RES * ratio), int(RES * ratio)
    y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, RES), max(cx - w // 2, 0), min(cx + w // 2, RES)
    mix = step.last_mix
    assert mix.kind == "cutmix" and mix.box == (y0, y1, x0, x1)
    assert mix.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / RES**2)
    expected = images.clone()
    expected[:, :, y0:y1, x0:x1] = images.roll(1, dims=0)[:, :, y0:y1, x0:x1]
    assert torch.equal(seen["teacher"][0][0], expected) and torch.equal(seen["students"][1], expected)


def test_no_mixing_is_bit_identical_to_the_plain_step():
    """Mixing off (the default, or mix_prob 0): teacher forward, students forward, the loss, one
    SGD update, exactly as the step did before the recipe keys existed."""
    for keys in ({}, {"augment.mixup": 0.2, "augment.mix_prob": 0.0}):
        step = make_step(**keys)
        ref = nn.ModuleList(copy.deepcopy(list(step.students.nets)))
        opt = torch.optim.SGD(param_groups(ref, 5e-5), lr=0.05, momentum=0.9, nesterov=True)
        for i in range(2):
            images, labels = batch(i)
            parts = step(images, labels, seed=i)
            with torch.inference_mode():
                t = step.teacher(images)
            torch.manual_seed(i)
            logits = [net(images).float() for net in ref]
            want = distillation_loss(t.float().clone(), logits, labels, step.loss)
            opt.zero_grad(set_to_none=True)
            want["loss"].backward()
            opt.step()
            assert torch.equal(parts["loss"], want["loss"].detach()) and step.last_mix is None
        for a, b in zip(step.students.state_dict().values(), ref.state_dict().values()):
            assert torch.equal(a, b)


def test_mixing_refuses_cached_teacher_logits():
    step = make_step(**{"augment.mixup": 0.2})
    images, labels = batch()
    with pytest.raises(ValueError, match="mixed"):
        step(images, labels, seed=0, teacher_logits=torch.zeros(B, CLASSES))
    with pytest.raises(FastKDError, match=r"augment\.mixup.*model\.teacher_cache"):
        config(**{"augment.cutmix": 1.0, "model.teacher_cache": "cache"})


@pytest.mark.parametrize(
    "keys, named",
    [
        ({"optim.clip_grad_norm": 0}, "optim.clip_grad_norm"),
        ({"schedule.min_lr": -1}, "schedule.min_lr"),
        ({"augment.mixup": -0.1}, "augment.mixup"),
        ({"augment.mix_prob": 1.5}, "augment.mix_prob"),
        ({"ema.decay": 1.0}, "ema.decay"),
        ({"ema.every": 0}, "ema.every"),
        ({"optim.betas": "0.9"}, "optim.betas"),
        ({"optim.name": "lamb"}, "optim.name"),
        ({"optim.lr_per_256": -1}, "optim.lr_per_256"),
    ],
)
def test_recipe_keys_checked_by_name(keys, named):
    with pytest.raises(FastKDError, match=named.replace(".", r"\.")):
        config(**keys)
