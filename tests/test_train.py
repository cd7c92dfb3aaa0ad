"""Trainer on an in-memory loader: the step, learning, checkpoints, exact resume, Ctrl-C, NaN stop."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
import torchvision
import yaml

from fastkd.checkpoint import load_last
from fastkd.models import build_model
from fastkd.recipe import param_groups
from fastkd.train import Interrupted, NonFiniteLoss, Trainer
from test_train_support import ensure_losses, loaders, one_thread, tiny_config  # noqa: F401 (fixture)

ensure_losses()
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def make_trainer(tmp_path, resume=None, loader_kwargs=None, **overrides):
    cfg = tiny_config(tmp_path / "run", **overrides)
    train, val = loaders(**(loader_kwargs or {}))
    return Trainer(cfg, train_loader=train, val_loader=val, resume=resume)


def teacher_file(tmp_path, arch="resnet18", num_classes=4):
    torch.manual_seed(7)
    path = tmp_path / "teacher.pt"
    torch.save(build_model(arch, num_classes).state_dict(), path)
    return str(path)


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_step_updates_students_not_teacher(tmp_path):
    trainer = make_trainer(tmp_path, **{"loss.method": "uadkd", "model.teacher": "resnet18",
                                        "model.teacher_weights": teacher_file(tmp_path)})
    teacher_before = [p.clone() for p in trainer.teacher.parameters()]
    student_before = [p.clone() for p in trainer.students.parameters()]
    images, labels = next(iter(trainer.train_loader))
    parts = trainer.step(images, labels)
    assert set(parts) >= {"loss", "ce", "kd", "peer", "w", "correct"}
    assert parts["ce"].shape == (2,) and parts["w"].shape == (32,) and parts["correct"].shape == (2,)
    assert all(isinstance(v, torch.Tensor) for v in parts.values())
    assert torch.isfinite(parts["loss"]) and (parts["kd"] > 0).all() and (parts["peer"] > 0).all()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.parameters()))
    assert not trainer.teacher.training and trainer.students.training
    assert not all(torch.equal(a, b) for a, b in zip(student_before, trainer.students.parameters()))


def test_no_weight_decay_on_bn_and_bias():
    groups = param_groups(build_model("resnet18", 4), 5e-5)
    assert groups[0]["weight_decay"] == 5e-5 and all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])
    fc = build_model("resnet18", 4).fc
    assert len(groups[1]["params"]) > 20  # every BN weight/bias + fc.bias
    del fc


def test_lr_scaled_and_warmed_up(tmp_path):
    trainer = make_trainer(tmp_path, **{"optim.lr_per_256": 0.4, "data.batch_size": 32})
    assert trainer.peak_lr == pytest.approx(0.4 * 32 / 256)
    assert trainer.warmup_steps == 4 and trainer.total_steps == 16


def test_fit_learns_and_writes_run_dir(tmp_path):
    trainer = make_trainer(tmp_path, **{"schedule.epochs": 3, "data.min_resolution": 16,
                                        "data.max_resolution": 32, "data.resolution": 24})
    summary = trainer.fit()
    run = tmp_path / "run"
    steps = records(run, "step")
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"]  # ln 4 = 1.39 at start
    assert min(steps[-1]["train_top1"].values()) > 60.0  # chance is 25 %
    # (mobilenet_v2's BN running statistics lag its weights this early: its val top-1 is not
    # checked here; the end-to-end tests on the demo digits check both students)
    assert summary["networks"]["resnet18"]["top1"] > 60.0
    # every sample of every epoch is in the logged windows
    for epoch in range(3):
        assert sum(r["samples"] for r in steps if r["epoch"] == epoch) == 8 * 32
    assert trainer.train_loader.resolutions == [16, 16, 32]  # progressive resizing
    assert [r["epoch"] for r in records(run, "eval")] == [0, 1, 2]
    for f in ("config.yaml", "report.json", "report.md", "checkpoints/last.pt"):
        assert (run / f).exists(), f
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()  # the default logger mirrors the records
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    for name, arch in (("resnet18", "resnet18"), ("mobilenet_v2", "mobilenet_v2")):
        net = torchvision.models.get_model(arch, num_classes=4)
        net.load_state_dict(torch.load(run / f"checkpoints/best-{name}.pt", weights_only=True))
    ckpt = load_last(run / "checkpoints/last.pt")
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 24 and ckpt["config"]["optim"]["lr_per_256"] == 0.4


def _final_weights(run_dir):
    return load_last(run_dir / "checkpoints/last.pt")["models"]


def _assert_same(a, b):
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=1e-6, msg=f"{name}.{key}")


def test_resume_gives_same_weights(tmp_path):
    common = {"schedule.epochs": 4, "run.deterministic": True, "model.students": ["resnet18", "mobilenet_v2"],
              "loss.method": "dml"}
    small = {"n": 128}  # 4 steps per epoch
    make_trainer(tmp_path / "a", loader_kwargs=small, **common).fit()
    make_trainer(tmp_path / "b", loader_kwargs=small, **common, **{"run.stop_after": 2}).fit()
    ckpt = load_last(tmp_path / "b/run/checkpoints/last.pt")
    assert ckpt["epoch"] == 2
    resumed = make_trainer(tmp_path / "b", resume=ckpt, loader_kwargs=small, **common)
    assert resumed.epoch == 2 and resumed.global_step == 8
    resumed.fit()
    _assert_same(_final_weights(tmp_path / "a/run"), _final_weights(tmp_path / "b/run"))


def test_ctrl_c_saves_and_resumes_mid_epoch(tmp_path):
    common = {"schedule.epochs": 2, "run.deterministic": True, "model.students": ["resnet18"]}
    make_trainer(tmp_path / "a", **common).fit()
    interrupted = make_trainer(tmp_path / "b", **common)

    def ctrl_c(batch):
        if interrupted.train_loader.epoch == 1 and batch == 3:
            os.kill(os.getpid(), signal.SIGINT)

    interrupted.train_loader.hook = ctrl_c
    with pytest.raises(Interrupted) as stop:
        interrupted.fit()
    assert stop.value.path == tmp_path / "b/run/checkpoints/last.pt"
    ckpt = load_last(stop.value.path)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 4, 12)  # the step in flight finishes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    make_trainer(tmp_path / "b", resume=ckpt, **common).fit()
    _assert_same(_final_weights(tmp_path / "a/run"), _final_weights(tmp_path / "b/run"))


def test_non_finite_loss_stops_keeping_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, **{"schedule.epochs": 3, "model.students": ["resnet18"]})

    def poison(batch):
        if trainer.train_loader.epoch == 1 and batch == 2:
            trainer.train_loader.images[:] = float("nan")

    trainer.train_loader.hook = poison
    with pytest.raises(NonFiniteLoss, match=r"non-finite.*epoch 2.*last\.pt"):
        trainer.fit()
    assert load_last(tmp_path / "run/checkpoints/last.pt")["epoch"] == 1  # the good one


def test_teacher_training_is_ce_with_one_network(tmp_path):
    trainer = make_trainer(tmp_path, **{"model.students": ["resnet18"], "loss.method": "ce",
                                        "schedule.epochs": 1})
    assert trainer.teacher is None
    summary = trainer.fit()
    assert list(summary["networks"]) == ["resnet18"] and summary["teacher"] is None
    assert "kd" not in records(tmp_path / "run", "step")[0]


def test_distillation_run_reports_teacher(tmp_path):
    trainer = make_trainer(tmp_path, **{"loss.method": "uadkd", "model.teacher": "resnet18",
                                        "model.teacher_weights": teacher_file(tmp_path), "schedule.epochs": 1})
    summary = trainer.fit()
    assert summary["teacher"]["arch"] == "resnet18" and summary["teacher"]["top1"] is not None
    step = records(tmp_path / "run", "step")[0]
    assert set(step["kd"]) == {"resnet18", "mobilenet_v2"} and 0 <= step["w_mean"] <= 1
    assert "teacher_w" in records(tmp_path / "run", "eval")[0]


def test_gpus_relaunches_through_torchrun(tmp_path, monkeypatch):
    """`--gpus 2` outside torchrun re-runs `fastkd train --config RESOLVED` as 2 local ranks."""
    import subprocess

    from fastkd import cli

    calls = []

    class FakePopen:
        pid = 0

        def __init__(self, cmd, **kwargs):
            calls.append(cmd)
            calls.append(yaml.safe_load(open(cmd[cmd.index("--config") + 1])))
            calls.append(os.environ.get("FASTKD_RUN_LOCK_HELD"))

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    rc = cli.main(["train", "--data", "D", "--gpus", "2", "--optim.lr_per_256", "0.3", "--method", "ce",
                   "--students", "resnet18", "--out", str(tmp_path / "run")])
    assert rc == 0
    cmd, config, lock_held = calls
    assert lock_held == str(tmp_path / "run")  # the launcher holds the run dir's lock for its ranks
    assert cmd[1:7] == ["-m", "fastkd.torchrun", "--standalone", "--nproc_per_node", "2", "-m"]
    assert cmd[7:10] == ["fastkd.cli", "train", "--config"]
    assert config["optim"]["lr_per_256"] == 0.3 and config["dist"]["gpus"] == 2 and config["data"]["dir"] == os.path.abspath("D")


@pytest.mark.gpu
def test_step_has_no_host_sync_on_cuda(tmp_path):
    """bf16 autocast + fused loss + SGD: the step never synchronises with the host."""
    cfg = tiny_config(tmp_path / "run", **{"run.device": "cuda", "precision.amp": "auto", "loss.method": "uadkd",
                                           "model.teacher": "resnet18", "model.teacher_weights": teacher_file(tmp_path)})
    train, val = loaders()
    trainer = Trainer(cfg, train_loader=train, val_loader=val)
    batches = [(x.cuda(), y.cuda()) for x, y in train]
    for x, y in batches[:2]:  # warm-up: lazy init, cuDNN autotuning
        trainer.meter.add(trainer.step(x, y), y.shape[0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[2:6]:
            trainer.meter.add(trainer.step(x, y), y.shape[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    window = trainer.meter.read()
    assert window["samples"] == 6 * 32 and math.isfinite(window["loss"])


def test_resume_takes_checkpoint_config_then_flags(tmp_path):
    from fastkd import train_cmd
    from fastkd.checkpoint import build_last, save_atomic
    from fastkd.config import config_to_dict
    from fastkd.errors import FastKDError

    old = tiny_config(tmp_path / "run", **{"loss.method": "uadkd", "model.teacher_weights": "T.pt",
                                           "run.stop_after": 1, "optim.lr_per_256": 0.4})
    path = tmp_path / "run/checkpoints/last.pt"
    save_atomic(build_last(config=config_to_dict(old), optimizer={}, models={}, archs={}, epoch=1, step_in_epoch=0,
                           global_step=8, scaler={}, best_top1={}, rng=[], num_classes=4), path)

    def resolve(argv):
        return train_cmd.resolve(train_cmd.parse(argv))

    cfg, ckpt = resolve(["--resume", str(path), "--optim.lr_per_256", "0.1"])  # nothing else on the line
    assert ckpt is not None and cfg.run.resume == str(path)
    assert (cfg.loss.method, cfg.model.teacher_weights, cfg.run.out) == ("uadkd", "T.pt", str(tmp_path / "run"))
    assert cfg.optim.lr_per_256 == 0.1 and cfg.run.stop_after is None  # flags win; stop_after not inherited
    cfg, ckpt = resolve(["--resume", "auto", "--out", str(tmp_path / "fresh"), "--method", "ce"])
    assert ckpt is None and cfg.loss.method == "ce"
    with pytest.raises(FastKDError, match="nothing.pt"):
        resolve(["--resume", str(tmp_path / "nothing.pt")])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_step_under_autocast_on_cpu(tmp_path, amp):
    """bf16 autocast, and fp16 with a GradScaler, on request (CPU twin of the GPU default)."""
    trainer = make_trainer(tmp_path, **{"precision.amp": amp, "model.students": ["resnet18"]})
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    images, labels = next(iter(trainer.train_loader))
    parts = trainer.step(images, labels)
    assert torch.isfinite(parts["loss"]) and parts["loss"].dtype == torch.float32


def test_compile_modes_checked(tmp_path):
    from fastkd.errors import FastKDError

    with pytest.raises(FastKDError, match="cudagraphs needs CUDA"):
        make_trainer(tmp_path, **{"compile.mode": "cudagraphs"})
    # scope networks: each network compiled alone (lazily, not run here)
    trainer = make_trainer(tmp_path, **{"compile.mode": "inductor", "compile.scope": "networks",
                                        "model.students": ["resnet18"]})  # fmt: skip
    assert type(trainer.students._forwards[0]).__name__ == "OptimizedModule"
    assert list(trainer.students.state_dict())[0] == "nets.0.conv1.weight"  # torchvision keys kept
    # scope step (the default): the networks run plain inside the one compiled forward_loss
    trainer = make_trainer(tmp_path / "step", **{"compile.mode": "inductor", "model.students": ["resnet18"]})
    assert trainer.students._forwards[0] is trainer.students.nets[0]
    assert trainer.train_step.compile_mode == "inductor" and trainer.train_step._forward_loss != trainer.train_step.forward_loss
    assert list(trainer.students.state_dict())[0] == "nets.0.conv1.weight"


# ---------------------------------------------------------------- resume under change, seeding


def _ctrl_c_at(trainer, epoch, batch):
    def hook(b):
        if trainer.train_loader.epoch == epoch and b == batch:
            os.kill(os.getpid(), signal.SIGINT)

    trainer.train_loader.hook = hook


def test_mid_epoch_resume_exact_with_dropout_and_starts_at_offset(tmp_path):
    """MobileNetV2 has dropout: a Ctrl-C mid-epoch then resume equals the uninterrupted run in
    every tensor, and the resumed pass starts at the checkpoint's batch (nothing built before it)."""
    common = {"schedule.epochs": 2, "run.deterministic": True, "model.students": ["mobilenet_v2"]}
    make_trainer(tmp_path / "a", **common).fit()
    interrupted = make_trainer(tmp_path / "b", **common)
    _ctrl_c_at(interrupted, 1, 3)
    with pytest.raises(Interrupted) as stop:
        interrupted.fit()
    ckpt = load_last(stop.value.path)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 4)
    resumed = make_trainer(tmp_path / "b", resume=ckpt, **common)
    resumed.fit()
    assert resumed.train_loader.made == 8 - 4  # epoch 2 from batch 4 on: 4 batches, none thrown away
    a, b = load_last(tmp_path / "a/run/checkpoints/last.pt"), load_last(tmp_path / "b/run/checkpoints/last.pt")
    for key, value in a["models"]["mobilenet_v2"].items():
        assert torch.equal(value, b["models"]["mobilenet_v2"][key]), key


def test_dropout_masks_are_a_function_of_the_step(tmp_path):
    """Whatever used the global generator before a step, the step's dropout masks are the same."""
    def loss_after(noise):
        trainer = make_trainer(tmp_path / str(noise), **{"model.students": ["mobilenet_v2"]})
        images, labels = next(iter(trainer.train_loader))
        torch.randn(noise)  # another consumer of the global generator
        return trainer.step(images, labels, seed=123)["loss"]

    assert torch.equal(loss_after(1), loss_after(1000))


def test_mid_epoch_checkpoint_refused_under_other_world_size(tmp_path):
    from fastkd.errors import FastKDError

    common = {"schedule.epochs": 2, "model.students": ["resnet18"]}
    interrupted = make_trainer(tmp_path, **common)
    _ctrl_c_at(interrupted, 0, 2)
    with pytest.raises(Interrupted) as stop:
        interrupted.fit()
    ckpt = load_last(stop.value.path)
    ckpt["world_size"] = 2  # as if 2 ranks had made it
    with pytest.raises(FastKDError, match=r"world size 2 x batch size 32.*world size 1 x batch size 32"):
        make_trainer(tmp_path, resume=ckpt, **common)


def test_epoch_boundary_resume_under_other_batch_keeps_schedule_position(tmp_path):
    """Batch 32 -> 16 at the end of epoch 1 of 2: the schedule continues at half the run (the
    step count is recomputed, not kept), the peak lr is rescaled, and the change is logged."""
    common = {"schedule.epochs": 2, "model.students": ["resnet18"], "schedule.warmup_epochs": 0.0}
    make_trainer(tmp_path, **common, **{"run.stop_after": 1}).fit()
    ckpt = load_last(tmp_path / "run/checkpoints/last.pt")
    assert ckpt["global_step"] == 8 and ckpt["batch_size"] == 32
    resumed = make_trainer(tmp_path, resume=ckpt, loader_kwargs={"batch_size": 16},
                           **common, **{"data.batch_size": 16})  # fmt: skip
    assert resumed.steps_per_epoch == 16 and resumed.total_steps == 32
    assert resumed.global_step == 8  # optimizer steps taken: the metrics' x axis keeps counting
    assert resumed.peak_lr == pytest.approx(0.4 * 16 / 256)
    resumed.fit()
    steps = [r for r in records(tmp_path / "run", "step") if r["epoch"] == 1]
    # cosine from half-way: the first step of epoch 2 runs at lr_at(16 of 32) = peak/2, then decays
    # (a record's lr is its window's last step: schedule position 16 + steps done in epoch 2 - 1)
    from fastkd.schedule import lr_at

    assert [r["step"] for r in steps] == [11, 14, 17, 20, 23, 24]
    for r in steps:
        assert r["lr"] == pytest.approx(lr_at(16 + (r["step"] - 8) - 1, 32, 0, resumed.peak_lr))
    assert steps[0]["lr"] > 0.4 * resumed.peak_lr
    notes = records(tmp_path / "run", "resume")[0]["notes"]
    assert "batch size 32 -> 16" in notes[0] and "peak lr" in notes[0]


def test_extending_epochs_on_resume_is_announced(tmp_path):
    common = {"model.students": ["resnet18"]}
    make_trainer(tmp_path, **common, **{"schedule.epochs": 2}).fit()
    ckpt = load_last(tmp_path / "run/checkpoints/last.pt")
    resumed = make_trainer(tmp_path, resume=ckpt, **common, **{"schedule.epochs": 3})
    assert any("schedule.epochs 2 -> 3" in n and "instead of" in n for n in resumed.resume_notes)


def test_evaluate_on_its_own(tmp_path):
    trainer = make_trainer(tmp_path, **{"model.students": ["resnet18"]})
    res = trainer.evaluate()
    assert 0.0 <= res["resnet18"]["top1"] <= 100.0 and res["resnet18"]["n"] == 128


def test_resume_onto_other_classes_refused(tmp_path):
    from fastkd.errors import FastKDError

    common = {"model.students": ["resnet18"], "schedule.epochs": 1}
    make_trainer(tmp_path, **common).fit()
    ckpt = load_last(tmp_path / "run/checkpoints/last.pt")
    ckpt["classes"][2] = dict(ckpt["classes"][2], wnid="n99999999")
    with pytest.raises(FastKDError, match=r"label 2: checkpoint n99999999, data synth2"):
        make_trainer(tmp_path, resume=ckpt, **{"model.students": ["resnet18"], "schedule.epochs": 2})


def test_cuda_n_gives_each_rank_its_own_gpu(monkeypatch):
    from fastkd import runtime
    from fastkd.errors import FastKDError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert [runtime.resolve_device("cuda:2", r).index for r in range(3)] == [2, 3, 4]
    assert [runtime.resolve_device("cuda", r).index for r in range(2)] == [0, 1]
    with pytest.raises(FastKDError, match=r"local rank 2 would use cuda:8.*8 GPU"):
        runtime.resolve_device("cuda:6", 2)


def test_final_table_printed_without_live_display(tmp_path, capsys):
    """--run.live false hides the progress bars, not the results; --run.summary false hides the table."""
    make_trainer(tmp_path / "a", **{"model.students": ["resnet18"], "schedule.epochs": 1}).fit()
    out = capsys.readouterr().out
    assert "val accuracy" in out and "resnet18" in out
    make_trainer(tmp_path / "b", **{"model.students": ["resnet18"], "schedule.epochs": 1, "run.summary": False}).fit()
    assert "val accuracy" not in capsys.readouterr().out


def test_ema_evaluated_beside_the_students_and_resumed(tmp_path, capsys):
    """ema.decay: each evaluation scores `<net>-ema` too, its best weights go to
    best-<net>-ema.pt, last.pt carries the EMA, and a resume continues it. The EMA's last and
    best top-1 are in report.json, report.md and the final table."""
    common = {"model.students": ["resnet18"], "schedule.epochs": 2, "ema.decay": 0.9}
    make_trainer(tmp_path, **common, **{"run.stop_after": 1}).fit()
    run = tmp_path / "run"
    evals = records(run, "eval")
    assert "resnet18-ema" in evals[0] and 0 <= evals[0]["resnet18-ema"]["top1"] <= 100
    assert (run / "checkpoints/best-resnet18-ema.pt").exists()
    ckpt = load_last(run / "checkpoints/last.pt")
    resumed = make_trainer(tmp_path, resume=ckpt, **common)
    saved, now = ckpt["ema"], resumed.ema.state_dict()
    assert now["calls"] == saved["calls"] > 0
    for key, value in now["models"]["resnet18"].items():
        assert torch.equal(value, saved["models"]["resnet18"][key]), key
    capsys.readouterr()
    resumed.fit()
    last = records(run, "eval")[-1]
    assert "resnet18-ema" in last
    net = json.loads((run / "report.json").read_text())["networks"]["resnet18"]
    assert net["ema_top1"] == pytest.approx(last["resnet18-ema"]["top1"])
    best = max(r["resnet18-ema"]["top1"] for r in records(run, "eval"))
    assert net["ema_best_top1"] == pytest.approx(best)
    assert "EMA top-1" in (run / "report.md").read_text() and "EMA top-1" in capsys.readouterr().out
