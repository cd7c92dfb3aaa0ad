"""Every table and path line fastkd prints, on a 60-column terminal ($COLUMNS=60, what rich reads
without a terminal too) with long values: a deep run directory, timm network names. Nothing may be
cut ('…') or wrapped: each value appears whole, each path whole on one line. The commands run
through the CLI as a user calls them; only the work behind the output (training, evaluating,
packing, hashing) is replaced by fixed results, so each test takes milliseconds."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastkd import cli

LONG_NET = "timm:mobilenetv3_large_100"  # 26 characters: wider than a 60-column table's share
DEEP = "a/very/deep/directory/for/testing/the/output/width/of/every/table"


@pytest.fixture(autouse=True)
def narrow_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")


@pytest.fixture
def deep(tmp_path):
    return tmp_path / DEEP


def assert_whole(out: str, values=(), paths=()):
    """No rich ellipsis; every value somewhere in the output; every path whole on one line."""
    assert "…" not in out, out
    for value in values:
        assert value in out, f"{value!r} cut or missing in:\n{out}"
    lines = out.splitlines()
    for path in paths:
        assert any(str(path) in line for line in lines), f"{path} not whole on one line in:\n{out}"


def result(top1: float) -> dict:
    return {"top1": top1, "top5": 99.875, "loss": 0.123456, "ece": 0.0345, "n": 12_345}


def test_eval_table(deep, monkeypatch, capsys):
    """`fastkd eval`: the weights and data paths whole, every network's numbers whole."""
    import fastkd.checkpoint
    import fastkd.data
    import fastkd.evaluate
    import fastkd.packformat
    from fastkd import eval_cmd

    weights = deep / "students" / "checkpoints" / f"best-{LONG_NET}.pt"
    data = deep / "imagenet100-packed"
    names = [LONG_NET, f"{LONG_NET}-ema"]
    monkeypatch.setattr(fastkd.checkpoint, "resolve_weights_path", lambda path, arch: Path(path))
    monkeypatch.setattr(fastkd.packformat, "load_manifest", lambda path: {})
    monkeypatch.setattr(eval_cmd, "load_networks", lambda path, arch, manifest: (
        {n: torch.nn.Identity() for n in names}, {"data": {"val_resolution": 32}}))
    monkeypatch.setattr(fastkd.data, "build_loader", lambda *a, **k: None)
    monkeypatch.setattr(fastkd.evaluate, "evaluate", lambda nets, loader: {
        n: result(91.234 + i) for i, n in enumerate(nets)})
    assert cli.main(["eval", str(weights), "--data", str(data), "--backend", "torch", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert_whole(out, values=[*names, "91.23", "92.23", "99.88", "0.1235", "3.45", "12345", "32 px"],
                 paths=[weights, data])


def test_summary_table(deep, monkeypatch, capsys):
    """The final table (as the quickstart and the end of `fastkd train` print it), EMA included."""
    from fastkd import quickstart

    nets = {name: {"arch": name, "params": 5_483_032, "top1": 81.234, "top5": 95.5, "best_top1": 82.5,
                   "ema_top1": 83.125, "ema_best_top1": 84.0625} for name in (LONG_NET, "timm:resnet10t")}
    report = {"method": "uadkd", "networks": nets, "wall_time_s": 3_723.0, "images_per_s": 12_345.6,
              "teacher": {"arch": "timm:resnet50d", "params": 25_576_264, "top1": 97.125, "top5": 99.9},
              "teacher_report": {"networks": {"timm:resnet50d": {"top1": 97.125}}, "wall_time_s": 60.0},
              "pipeline_wall_time_s": 4_000.0}
    monkeypatch.setattr(quickstart, "run_quickstart", lambda *args: report)
    assert cli.main(["quickstart", "--out", str(deep)]) == 0
    out = capsys.readouterr().out
    values = [LONG_NET, "timm:resnet10t", "timm:resnet50d", "5.48M", "25.58M", "4.66x", "81.23", "95.50",
              "82.50", "97.12", "12,346 img/s", "val accuracy in %", "EMA top-1", "83.12", "84.06"]
    assert_whole(out, values=values, paths=[deep / "students", deep / "teacher"])


def test_pack_summary(deep, monkeypatch, capsys):
    """`fastkd pack`: the output path and the skipped inputs' paths whole, each split's counts whole."""
    from fastkd.preprocess import pack_cmd

    src, out_dir = deep / "raw-images", deep / "packed"
    bad = src / "train" / "n01440764" / "a_rather_long_file_name_that_failed_to_decode.JPEG"
    split = SimpleNamespace(count=1_281_167, skipped=3, ignored_folders=2, jpeg_bytes=150 * 2**30, shards=1_252,
                            seconds=1_234.5)
    manifest = {"classes": [{}] * 100, "params": {"formats": ["ffcv", "dali"], "max_side": 512, "quality": 90},
                "files": [{"path": "ffcv/train.beton", "size": 2**30}, {"path": "dali/train/x.tar", "size": 2**29}],
                "skipped": [{"path": str(bad), "reason": "cannot identify image file"}]}
    fake = SimpleNamespace(manifest=manifest, splits={"train": split, "val": split}, out=out_dir,
                           images=2 * split.count, seconds=2_500.0)
    monkeypatch.setattr(pack_cmd, "pack", lambda *args, **kwargs: fake)
    assert cli.main(["pack", str(src), str(out_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert_whole(out, values=["1,281,167", "150.0 GiB", "1252", "1234.5 s", "1,038", "cannot identify image file"],
                 paths=[out_dir, bad])


def test_verify(deep, monkeypatch, capsys):
    """`fastkd verify`: the pack's path whole, each differing file and its difference whole."""
    from fastkd.preprocess import verify

    files = [{"path": f"dali/train/shard-{i:06d}.tar", "size": 10**9} for i in range(3)]
    problems = [f"{files[0]['path']}: sha256 differs from the manifest's", f"{files[1]['path']}: missing"]
    monkeypatch.setattr(verify, "is_teacher_cache", lambda path: False, raising=False)
    monkeypatch.setattr(verify, "digest_state", lambda manifest: "ok", raising=False)
    monkeypatch.setattr(verify, "load_manifest", lambda path: {"files": files})
    monkeypatch.setattr(verify, "check_outputs", lambda *args, **kwargs: problems)
    assert cli.main(["verify", str(deep / "packed")]) == 1
    assert_whole(capsys.readouterr().out, values=problems, paths=[deep / "packed" / "manifest.json"])
    monkeypatch.setattr(verify, "check_outputs", lambda *args, **kwargs: [])
    assert cli.main(["verify", str(deep / "packed")]) == 0
    assert_whole(capsys.readouterr().out, values=["OK: 3 files", "3,000,000,000 bytes"],
                 paths=[deep / "packed" / "manifest.json"])


def test_benchmark_table(capsys):
    """benchmarks/common.print_table: a row wider than any fixed width stays whole."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    case = f"{LONG_NET} + {LONG_NET}, ffcv, 8 workers, channels_last, bf16, max-autotune"
    rows = [{"name": "e2e", "case": case, "value": 12_345.678, "ratio": 1.2345}]
    common.print_table(rows, [("name", "benchmark"), ("case", "case"), ("value", "img/s"), ("ratio", "x")])
    assert_whole(capsys.readouterr().out, values=[case, "e2e"])
