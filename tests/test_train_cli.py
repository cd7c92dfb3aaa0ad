"""End to end on the embedded digits: `fastkd demo-data` + `fastkd pack`, then `fastkd train` of a
teacher (ce), of two students (uadkd, split across two invocations with --resume auto), `fastkd
eval`, and a 2-rank gloo run under torchrun. CPU, torch backend, 32 px."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd import cli
from fastkd.checkpoint import load_last
from test_train_support import one_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

COMMON = ["--backend", "torch", "--batch-size", "64", "--data.resolution", "32", "--data.val_resolution", "32",
          "--data.num_workers", "1", "--run.device", "cpu", "--run.log_every", "11", "--run.live", "false"]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert cli.main(["demo-data", str(root / "demo"), "--size", "32"]) == 0
    assert cli.main(["pack", str(root / "demo"), str(root / "packed"), "--classes", "all", "--workers", "1",
                     "--quiet"]) == 0
    return root / "packed"


@pytest.fixture(scope="module")
def teacher_run(packed, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    torch.set_num_threads(1)
    rc = cli.main(["train", "--data", str(packed), *COMMON, "--method", "ce", "--students", "resnet18",
                   "--epochs", "3", "--optim.lr_per_256", "0.2", "--out", str(out)])
    assert rc == 0
    return out


def test_teacher_learns(teacher_run):
    steps = records(teacher_run, "step")
    assert steps[-1]["loss"] < 0.9 * steps[0]["loss"]
    assert sum(r["samples"] for r in steps if r["epoch"] == 0) == 1437 // 64 * 64  # whole epoch logged
    evals = records(teacher_run, "eval")
    assert evals[-1]["resnet18"]["top1"] > 40.0  # chance: 10 %
    report = json.loads((teacher_run / "report.json").read_text())
    assert report["networks"]["resnet18"]["top1"] == pytest.approx(evals[-1]["resnet18"]["top1"])
    # the top-1 of a run names the val pipeline that scored it (backends resize differently)
    assert report["val_pipeline"].startswith("torch: ") and "bilinear" in report["val_pipeline"]
    assert f"val pipeline: {report['val_pipeline']}" in (teacher_run / "report.md").read_text()
    for f in ("config.yaml", "report.md", "checkpoints/last.pt", "checkpoints/best-resnet18.pt"):
        assert (teacher_run / f).exists(), f


def test_students_distil_and_resume(teacher_run, packed, tmp_path, capsys):
    out = tmp_path / "students"
    args = ["train", "--data", str(packed), *COMMON, "--method", "uadkd", "--teacher", "resnet18",
            "--teacher-weights", str(teacher_run / "checkpoints/best-resnet18.pt"), "--epochs", "2",
            "--optim.lr_per_256", "0.05", "--out", str(out), "--resume", "auto"]
    assert cli.main(args + ["--run.stop_after", "1"]) == 0  # first job: epoch 1 of 2
    assert load_last(out / "checkpoints/last.pt")["epoch"] == 1
    assert cli.main(args) == 0  # second job continues at epoch 2
    ckpt = load_last(out / "checkpoints/last.pt")
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 2 * (1437 // 64)

    steps = records(out, "step")
    assert [r["epoch"] for r in steps] == [0, 0, 1, 1]  # windows at steps 11 and 22 of each epoch
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["ce"]["resnet18"] < 0.9 * steps[0]["ce"]["resnet18"]
    assert all(v > 0 for v in steps[-1]["kd"].values()) and all(v > 0 for v in steps[-1]["peer"].values())
    assert 0 < steps[-1]["w_mean"] < 1
    final = records(out, "eval")[-1]
    assert final["resnet18"]["top1"] > 30.0  # chance: 10 %
    assert final["teacher"]["top1"] > 40.0 and 0 < final["teacher_w"]["mean"] < 1

    capsys.readouterr()
    assert cli.main(["eval", str(out / "checkpoints/last.pt"), "--data", str(packed), "--backend", "torch",
                     "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "resnet18" in table and "mobilenet_v2" in table
    assert f"{final['resnet18']['top1']:.2f}" in table  # same numbers as the trainer's last eval
    assert cli.main(["eval", str(out / "checkpoints/best-mobilenet_v2.pt"), "--data", str(packed),
                     "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "mobilenet_v2" in table and "32 px" in table  # arch from the file name, settings from config.yaml


def test_bad_teacher_file_is_named(packed, tmp_path, capsys):
    rc = cli.main(["train", "--data", str(packed), *COMMON, "--teacher-weights", str(tmp_path / "none.pt"),
                   "--out", str(tmp_path / "x")])
    assert rc == 2 and "none.pt" in capsys.readouterr().err


WORKER = """
import os, sys, torch
from fastkd import distributed, train_cmd
from fastkd.train import Trainer
cfg, ckpt = train_cmd.resolve(train_cmd.parse(sys.argv[1:]))
trainer = Trainer(cfg, resume=ckpt)
trainer.fit()
params = {k: p.detach() for k, p in trainer.students.named_parameters()}
torch.save(params, os.path.join(cfg.run.out, f"params-rank{trainer.dist.rank}.pt"))
distributed.shutdown()
"""


def test_two_ranks_gloo(packed, tmp_path):
    """2 CPU ranks under torchrun: identical student parameters, metrics cover both shards."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           "--data", str(packed), *COMMON, "--batch-size", "32", "--run.log_every", "5", "--method", "ce",
           "--students", "resnet18", "--epochs", "1", "--optim.lr_per_256", "0.2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(out / "params-rank0.pt", weights_only=True)
    b = torch.load(out / "params-rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = records(out, "step")
    per_rank = 1437 // 2 // 32  # batches per rank (drop_last)
    assert [r["step"] for r in steps] == [5, 10, 15, 20, per_rank]  # rank 0 alone writes
    assert sum(r["samples"] for r in steps) == 2 * per_rank * 32 and all(r["world_size"] == 2 for r in steps)
    assert records(out, "eval")[0]["resnet18"]["n"] == 360  # val shards add up to the whole split


def test_eval_slices_imagenet_head_to_manifest_rows(packed, tmp_path, capsys):
    """A 1000-way torchvision state_dict evaluated on a pack of ImageNet WNIDs scores exactly
    like the full model's logits restricted to those classes' ImageNet rows."""
    import shutil

    import torchvision

    from fastkd.data import build_loader
    from fastkd.resources import imagenet1k_synsets, imagenet100_wnids

    wnids = list(imagenet100_wnids()[:10])
    src = tmp_path / "in10"
    demo = packed.parent / "demo"
    for split in ("train", "val"):
        for digit, wnid in enumerate(wnids):
            shutil.copytree(demo / split / f"digit{digit}", src / split / wnid)
    assert cli.main(["pack", str(src), str(tmp_path / "packed"), "--classes", "all", "--workers", "1", "--quiet"]) == 0
    torch.manual_seed(3)
    full = torchvision.models.get_model("resnet18", num_classes=1000).eval()
    torch.save(full.state_dict(), tmp_path / "resnet18-in1k.pth")

    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "resnet18-in1k.pth"), "--arch", "resnet18", "--data",
                     str(tmp_path / "packed"), "--backend", "torch", "--device", "cpu", "--resolution", "32"]) == 0
    table = capsys.readouterr().out

    rows = [imagenet1k_synsets()[w].imagenet_index for w in sorted(wnids)]
    loader = build_loader(tmp_path / "packed", "val", "torch", 256, 32, "cpu", torch.float32, num_workers=1)
    correct = total = ce = 0
    with torch.no_grad():
        for images, labels in loader:
            logits = full(images)[:, rows]
            correct += int((logits.argmax(1) == labels).sum())
            ce += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            total += labels.numel()
    assert total == 360 and f"{100 * correct / total:.2f}" in table
    assert f"{ce / total:.4f}" in table  # the mean CE pins the rows down (top-1 alone may be flat)


def test_ctrl_c_under_gpus_2_saves_agreed_checkpoint(packed, tmp_path):
    """`fastkd train --gpus 2` (CPU ranks) hit by Ctrl-C: the ranks agree on a step, rank 0
    saves last.pt with both ranks' RNG states, and the command exits 130."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastkd.cli", "train", "--gpus", "2", "--data", str(packed), *COMMON,
           "--batch-size", "16", "--run.log_every", "4", "--method", "ce", "--students", "resnet18",
           "--epochs", "2", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, output[-3000:]
    ckpt = load_last(out / "checkpoints/last.pt")
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] > 0 and len(ckpt["rng"]) == 2
    assert ckpt["step_in_epoch"] % 4 == 0  # a log read, where the ranks agreed


# ---------------------------------------------------------------- one run per run dir, resume anywhere

SMALL = ["--method", "ce", "--students", "resnet18", "--optim.lr_per_256", "0.2"]


def test_finished_run_left_untouched_and_second_run_refused(packed, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(packed), *COMMON, *SMALL, "--epochs", "1", "--out", str(out)]
    assert cli.main(args) == 0
    report, metrics = (out / "report.json").read_bytes(), (out / "metrics.jsonl").read_bytes()
    last = (out / "checkpoints/last.pt").read_bytes()
    capsys.readouterr()
    assert cli.main(args + ["--resume", "auto"]) == 0  # finished: nothing to do, nothing rewritten
    assert "finished" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == report and (out / "metrics.jsonl").read_bytes() == metrics
    assert (out / "checkpoints/last.pt").read_bytes() == last
    assert json.loads(report)["networks"]["resnet18"]["top1"] is not None
    assert cli.main(args) == 2  # a fresh run into a dir that holds one
    err = capsys.readouterr().err
    assert str(out) in err and "--resume auto" in err and "--overwrite" in err and "--out" in err
    assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing appended


def test_resume_path_continues_the_copied_run_from_anywhere(packed, tmp_path, monkeypatch):
    """A run started with relative paths, copied elsewhere, resumed by path from another
    directory: the copy is continued (not the original), and the relative data path still works.
    The copy's metrics.jsonl ends as a run killed (kill -9) after its checkpoint leaves it: those
    records are dropped on resume, no step appears twice. (One stopped run serves both checks.)"""
    import shutil

    monkeypatch.chdir(packed.parent)
    args = ["train", "--data", packed.name, *COMMON, *SMALL, "--epochs", "2", "--run.stop_after", "1",
            "--out", "orig"]  # fmt: skip
    assert cli.main(args) == 0
    original = packed.parent / "orig"
    before = (original / "checkpoints/last.pt").read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    ckpt_step = load_last(copy / "checkpoints/last.pt")["global_step"]
    with open(copy / "metrics.jsonl", "a") as f:  # what the killed second epoch had logged
        f.write(json.dumps({"kind": "step", "epoch": 1, "step": ckpt_step + 11, "lr": 0.1, "loss": 9.0}) + "\n")
        f.write('{"kind": "step", "epoch": 1, "st')  # cut off by the kill
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--resume", str(copy / "checkpoints/last.pt")]) == 0
    assert load_last(copy / "checkpoints/last.pt")["epoch"] == 2
    assert (original / "checkpoints/last.pt").read_bytes() == before  # the original is untouched
    assert not (tmp_path / "orig").exists()
    lines = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["epoch"], r["step"]) for r in lines if r["kind"] == "step"]
    assert len(keys) == len(set(keys)) and all(r.get("loss") != 9.0 for r in lines)
    assert [r["epoch"] for r in lines if r["kind"] == "step"] == [0, 0, 1, 1]  # both epochs logged once


def test_one_rank_to_two_ranks_continues_the_lr_curve(packed, tmp_path):
    """Epoch 1 of 2 on one rank, epoch 2 on two gloo ranks (`--gpus 2 --resume auto`): the
    schedule continues at half the run with the peak lr doubled (linear scaling), never 0."""
    from fastkd.schedule import lr_at

    out = tmp_path / "run"
    args = ["train", "--data", str(packed), *COMMON, *SMALL, "--epochs", "2", "--out", str(out),
            "--schedule.warmup_epochs", "0", "--run.log_every", "2"]  # fmt: skip
    assert cli.main(args + ["--run.stop_after", "1"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fastkd.cli", *args, "--gpus", "2", "--resume", "auto"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 1 -> 2" in proc.stderr
    spe1, spe2 = 1437 // 64, 1437 // 2 // 64  # 22 steps per epoch on one rank, 11 on two
    peak2 = 0.2 * 64 * 2 / 256
    second = [r for r in records(out, "step") if r["epoch"] == 1]
    assert second and all(r["world_size"] == 2 for r in second)
    for r in second:
        done_in_epoch = r["step"] - spe1
        assert r["lr"] == pytest.approx(lr_at(spe2 + done_in_epoch - 1, 2 * spe2, 0, peak2)), r
    assert second[0]["lr"] > 0.3 * peak2  # cosine half-way is peak / 2, not 0
    assert records(out, "resume")[0]["world_size"] == 2
    ckpt = load_last(out / "checkpoints/last.pt")
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and ckpt["samples_seen"] == spe1 * 64 + spe2 * 128
