"""fastkd.evaluate against hand-computed values on tiny fixed logits (stub models)."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastkd.evaluate import evaluate
from fastkd.losses import confidence_weight as teacher_weight

# Four samples, six classes. Student probabilities chosen away from bin edges:
#   s0 conf .88 right | s1 conf .62 wrong (label in top-5) | s2 conf .32 wrong (label last) | s3 conf .66 right
STUDENT_P = torch.tensor(
    [
        [0.88, 0.05, 0.03, 0.02, 0.015, 0.005],
        [0.05, 0.62, 0.18, 0.08, 0.04, 0.03],
        [0.32, 0.25, 0.18, 0.12, 0.08, 0.05],
        [0.02, 0.03, 0.05, 0.09, 0.15, 0.66],
    ],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 2, 5, 5])
# Teacher: s0 ~uniform (w ~ 0), s1 one-hot (w ~ 1), s2/s3 two-way tie (w = 1 - ln2/ln6), 3 of 4 right.
TEACHER_LOGITS = torch.tensor(
    [
        [1e-3, 0, 0, 0, 0, 0],
        [0, 0, 50, 0, 0, 0],
        [1e-3, 0, -100, -100, -100, -100],
        [-100, -100, -100, -100, 0, 1e-3],
    ],
    dtype=torch.float64,
)


class Lookup(nn.Module):
    """Stub network: returns the fixed logits row of the sample index stored in pixel (0, 0, 0)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.float())
        self.scale = nn.Parameter(torch.ones(()))
        self.seen_training = []
        self.seen_autocast = []

    def forward(self, x):
        self.seen_training.append(self.training)
        self.seen_autocast.append(torch.is_autocast_enabled(x.device.type))
        assert torch.is_inference_mode_enabled()
        return self.table[x[:, 0, 0, 0].float().round().long()] * self.scale


def batches(indices, batch_size=2, dtype=torch.float32):
    out = []
    for start in range(0, len(indices), batch_size):
        idx = torch.tensor(indices[start : start + batch_size])
        images = torch.zeros(len(idx), 3, 2, 2, dtype=dtype)
        images[:, 0, 0, 0] = idx.to(dtype)
        out.append((images, LABELS[idx]))
    return out


def check_full_result(res):
    s = res["student"]
    assert s["top1"] == pytest.approx(50.0)
    assert s["top5"] == pytest.approx(75.0)
    assert s["topk"] == 5
    assert s["n"] == 4
    expected_ce = -(math.log(0.88) + math.log(0.18) + math.log(0.05) + math.log(0.66)) / 4
    assert s["loss"] == pytest.approx(expected_ce, rel=1e-5)
    # 10 bins (lo, hi]: .88 -> bin 8 (acc 1); .62, .66 -> bin 6 (acc .5, conf .64); .32 -> bin 3 (acc 0)
    # ECE = 1/4 * |1 - .88| + 2/4 * |.5 - .64| + 1/4 * |0 - .32| = .03 + .07 + .08
    assert s["ece"] == pytest.approx(0.18, abs=1e-5)
    rel = s["reliability"]
    assert rel["count"] == [0, 0, 0, 1, 0, 0, 2, 0, 1, 0]
    assert rel["accuracy"][6] == pytest.approx(0.5)
    assert rel["confidence"][6] == pytest.approx(0.64, abs=1e-5)
    assert rel["accuracy"][8] == 1.0 and rel["accuracy"][3] == 0.0
    assert len(rel["edges"]) == 11

    t = res["teacher"]
    assert t["top1"] == pytest.approx(75.0)
    w = res["teacher_w"]
    w_tie = 1 - math.log(2) / math.log(6)  # two equal classes, the rest ~0
    assert w["mean"] == pytest.approx((0.0 + 1.0 + 2 * w_tie) / 4, abs=1e-4)
    assert w["hist"] == [1, 0, 0, 0, 0, 0, 2, 0, 0, 1]  # w_tie = .613 -> bin 6
    assert w["edges"][0] == 0.0 and w["edges"][-1] == 1.0


def test_hand_computed_metrics():
    student = Lookup(STUDENT_P.log())
    teacher = Lookup(TEACHER_LOGITS)
    student.train()
    teacher.eval()
    res = evaluate({"student": student}, batches([0, 1, 2, 3]), teacher=teacher, num_bins=10)
    check_full_result(res)
    assert set(res) == {"student", "teacher", "teacher_w"}
    # networks ran in eval mode under inference_mode, and their modes are restored afterwards
    assert student.seen_training == [False, False] and student.training
    assert teacher.seen_training == [False, False] and not teacher.training
    assert student.seen_autocast == [False, False]  # fp32 images: no autocast


def test_topk_with_fewer_than_five_classes_and_no_teacher():
    # 3 classes: "top5" is top-3, always 100 %
    table = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    labels = torch.tensor([2, 0])
    images = torch.zeros(2, 3, 2, 2)
    images[1, 0, 0, 0] = 1
    res = evaluate({"a": Lookup(table), "b": Lookup(table.flip(-1))}, [(images, labels)], num_bins=5)
    assert set(res) == {"a", "b"}
    assert res["a"]["topk"] == 3 and res["a"]["top5"] == 100.0
    assert res["a"]["top1"] == 0.0
    assert res["b"]["top1"] == 50.0  # b's logits: [1,2,3] -> 2 right; [2,3,1] -> 1 wrong
    assert sum(res["a"]["reliability"]["count"]) == 2


def test_half_precision_images_run_under_autocast():
    student = Lookup(STUDENT_P.log())
    res = evaluate({"student": student}, batches([0, 1, 2, 3], dtype=torch.bfloat16), num_bins=10)
    assert student.seen_autocast == [True, True]
    assert res["student"]["top1"] == pytest.approx(50.0)


def test_teacher_weight_bounds():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0]])
    w = teacher_weight(logits)
    assert w[0].item() == pytest.approx(0.0, abs=1e-6)
    assert w[1].item() == pytest.approx(1.0, abs=1e-6)
    # a higher temperature flattens the teacher: less confidence
    peaked = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    assert teacher_weight(peaked, 4.0).item() < teacher_weight(peaked, 1.0).item()


def test_reserved_names_rejected():
    with pytest.raises(ValueError, match="reserved"):
        evaluate({"teacher": Lookup(STUDENT_P)}, [], teacher=Lookup(TEACHER_LOGITS))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world_size, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        shards = [[0, 1, 2], [3]]  # unequal shards: a mean of means would be wrong
        res = evaluate(
            {"student": Lookup(STUDENT_P.log())},
            batches(shards[rank]),
            teacher=Lookup(TEACHER_LOGITS),
            num_bins=10,
        )
        queue.put((rank, res))
    finally:
        dist.destroy_process_group()


def test_sums_all_reduced_across_two_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_rank_worker, args=(2, _free_port(), queue), nprocs=2, join=True)
    results = dict(queue.get(timeout=30) for _ in range(2))
    for rank in (0, 1):
        check_full_result(results[rank])


# ---------------------------------------------------------------- `fastkd eval` (fastkd.eval_cmd)


def eval_args(*argv):
    import argparse

    from fastkd import eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_eval_cuda_hint_names_its_own_flag(tmp_path, monkeypatch):
    from fastkd import eval_cmd
    from fastkd.errors import FastKDError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FastKDError) as info:
        eval_cmd.run(eval_args(str(tmp_path / "last.pt"), "--data", str(tmp_path / "data"), "--device", "cuda"))
    assert "--device cpu" in str(info.value) and "--run.device" not in str(info.value)
    assert eval_cmd.resolve_device("auto").type == "cpu"


def _packed_classes(monkeypatch, wnids):
    """`fastkd eval` reads this class list as the pack's manifest (no pack written)."""
    import fastkd.packformat as manifest_module

    classes = [{"label": i, "wnid": w, "name": w, "imagenet_index": None} for i, w in enumerate(wnids)]
    monkeypatch.setattr(manifest_module, "load_manifest", lambda root: {"classes": classes})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_eval_refuses_checkpoint_trained_on_other_classes(tmp_path, monkeypatch):
    from test_checkpoint import classes_of, tiny_last

    from fastkd import eval_cmd
    from fastkd.checkpoint import save_atomic
    from fastkd.errors import FastKDError
    from fastkd.models import build_model

    net = build_model("resnet18", 3, channels_last=False)
    run = tmp_path / "run"
    save_atomic(tiny_last({"resnet18": net}, classes_of(["n01", "n02", "n03"])), run / "checkpoints" / "last.pt")
    save_atomic(net.state_dict(), run / "checkpoints" / "best-resnet18.pt")
    _packed_classes(monkeypatch, ["n01", "n09", "n03"])  # same count, one other class
    for target in (run, run / "checkpoints" / "best-resnet18.pt"):
        with pytest.raises(FastKDError, match=r"first differing class at label 1: checkpoint n02, data n09"):
            eval_cmd.run(eval_args(str(target), "--data", str(tmp_path), "--device", "cpu"))


def test_best_checkpoint_arch_from_the_runs_config(tmp_path):
    """best-<net>.pt (and its -ema twin) of a timm student: the architecture comes from the
    run's config.yaml, not from guessing at the file name."""
    import yaml

    from fastkd.eval_cmd import arch_of_best

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"students": ["timm:resnet10t", "resnet18"]}}))
    assert arch_of_best(tmp_path / "checkpoints/best-resnet10t.pt", yaml.safe_load((tmp_path / "config.yaml").read_text())) == "timm:resnet10t"
    assert arch_of_best(tmp_path / "checkpoints/best-resnet18-ema.pt", {"model": {"students": ["resnet18", "resnet18"]}}) == "resnet18"
    assert arch_of_best(tmp_path / "checkpoints/best-resnet18-2.pt", {}) == "resnet18"


def test_eval_names_the_val_pipeline_of_its_backend():
    """ffcv resizes with INTER_AREA, the others with antialiased bilinear: eval says which scored."""
    from fastkd.data.spec import val_pipeline

    def loader_of(module):
        return type("Loader", (), {"__module__": module})()

    ffcv = val_pipeline(loader_of("fastkd.data.ffcv_loader"))
    torch_ = val_pipeline(loader_of("fastkd.data.torch_loader"))
    assert ffcv.startswith("ffcv: centre square int(0.875 x shorter side)") and "INTER_AREA" in ffcv
    assert torch_ == "torch: centre square int(0.875 x shorter side) of the packed JPEG, antialiased bilinear resize"
