"""The benchmark scripts run end to end in a tiny CPU mode and write the JSON their docs promise.

Speed is never asserted here (DESIGN.md: ratios are measured by benchmarks, not tests); what is
checked is that each script runs, that its rows are the expected ones, and that the numbers are
finite and positive where a measurement was made. run_all.py's bookkeeping (a failing, missing or
hanging benchmark is recorded and the others still run) is checked with stand-in scripts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run_all  # noqa: E402


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def step_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("step") / "step.json"
    run_script("benchmarks/step_throughput.py", "--device", "cpu", "--res", "32", "--batch", "2",
               "--steps", "1", "--windows", "2", "--warmup", "1", "--threads", "1",
               "--variants", "fp32_nchw,bf16_cl_fused", "--json", str(out))
    return json.loads(out.read_text())


def test_step_throughput_rows(step_result):
    assert step_result["benchmark"] == "step_throughput"
    assert step_result["machine"]["device"] == "cpu" and step_result["machine"]["torch"]
    rows = {r["variant"]: r for r in step_result["rows"]}
    assert set(rows) == {"fp32_nchw", "bf16_cl_fused"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert (r["res"], r["batch"]) == (32, 2)
        for key in ("images_per_s", "step_ms", "tflops", "gflop_per_image"):
            assert positive(r[key]), (key, r)
        assert len(r["windows_s"]) == 2 and all(positive(w) for w in r["windows_s"])
        # images/s is the batch over the median window's time per step
        assert r["images_per_s"] == pytest.approx(2 / common.median(r["windows_s"]), rel=1e-3)  # windows_s rounded
    # teacher fwd + 3 x students' fwd at 32 px: about 21 GFLOP/img at 224 px scaled by (32/224)^2
    assert 0.3 < rows["fp32_nchw"]["gflop_per_image"] < 0.6
    assert rows["fp32_nchw"]["gflop_per_image"] == rows["bf16_cl_fused"]["gflop_per_image"]
    assert rows["fp32_nchw"]["ratio"] == pytest.approx(1.0)
    assert positive(rows["bf16_cl_fused"]["ratio"])
    assert "fused op" in rows["bf16_cl_fused"]["loss_impl"]
    assert step_result["headline"] and all(positive(h["value"]) for h in step_result["headline"])


def test_step_throughput_rejects_unknown_variant():
    proc = subprocess.run([sys.executable, "benchmarks/step_throughput.py", "--device", "cpu",
                           "--variants", "fp64_magic"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown variant 'fp64_magic'" in proc.stderr


def test_e2e_throughput_rows(tmp_path):
    src = common.make_synthetic_folder(tmp_path / "src", classes=2, train_per_class=8, val_per_class=2,
                                       size=64, workers=1)
    packed = tmp_path / "packed"
    run_script("-m", "fastkd.cli", "pack", str(src), str(packed), "--classes", "all", "--formats", "dali",
               "--workers", "1", "--quiet")
    out = tmp_path / "e2e.json"
    run_script("benchmarks/e2e_throughput.py", "--device", "cpu", "--data", str(packed),
               "--backends", "torch,nosuch", "--res", "32", "--batch", "4", "--steps", "4", "--warmup", "1",
               "--threads", "1", "--json", str(out))
    result = json.loads(out.read_text())
    rows = {r["source"]: r for r in result["rows"]}
    assert list(rows) == ["torch", "nosuch", "synthetic"]
    assert rows["nosuch"]["status"] == "skipped" and "nosuch" in rows["nosuch"]["error"]
    for name in ("torch", "synthetic"):
        r = rows[name]
        assert r["status"] == "ok" and r["images"] == 4 * 4
        assert positive(r["images_per_s"]) and positive(r["wall_s"]) and positive(r["vs_synthetic"])
        assert 0.0 <= r["wait_frac_steady"] <= r["wait_frac"] <= 1.0
    assert rows["synthetic"]["wait_frac"] < 0.05  # a tuple from a lambda: nothing to wait for
    # 16 train images, batch 4: 4 batches an epoch, so 4 steps after 1 warm-up cross one epoch end
    assert rows["torch"]["epoch_starts"] == 1 and rows["synthetic"]["epoch_starts"] == 0
    assert rows["synthetic"]["vs_synthetic"] == pytest.approx(1.0)


def _fake_result(name: str, rows: list[dict], device: str = "cpu") -> dict:
    return common.write_result(None, name, rows, machine=common.machine_info(device), params={},
                               headline=[{"label": f"{name} x", "value": 12.5, "unit": "img/s"}])


def test_run_all_collect_writes_json_markdown_chart(tmp_path):
    jsons = tmp_path / "json"
    jsons.mkdir()
    step_rows = [dict(variant="fp32_nchw", res=160, batch=256, status="ok", images_per_s=1000.0, ratio=1.0),
                 dict(variant="bf16_cl_fused", res=160, batch=256, status="ok", images_per_s=5000.0, ratio=5.0)]
    (jsons / "step.json").write_text(json.dumps(_fake_result("step_throughput", step_rows)))
    loss = {"meta": {}, "results": [
        {"device": "cuda", "B": 256, "C": 100, "impl": "eager", "median_ms": 1.0, "speedup_vs_eager": 1.0},
        {"device": "cuda", "B": 256, "C": 100, "impl": "fused", "median_ms": 0.1, "speedup_vs_eager": 10.0}]}
    (jsons / "loss.json").write_text(json.dumps(loss))
    (jsons / "broken.json").write_text("{not json")
    stages = tmp_path / "stages.tsv"
    stages.write_text("env\tpass\t1\t\nstep\tpass\t42\t\nkernel\tskip\t0\tneeds CUDA\n")
    out = tmp_path / "results"
    assert run_all.main(["--collect", str(jsons), "--stages", str(stages), "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["benchmarks"]) == {"step", "loss", "broken"}
    assert summary["benchmarks"]["broken"]["status"] == "failed"
    assert summary["benchmarks"]["step"]["seconds"] == "42"
    assert [s["stage"] for s in summary["stages"]] == ["env", "step", "kernel"]
    goals = {g["goal"]: g for g in summary["goals"]}
    assert "5,000" in goals["step 160px bf16 CL >= 6,000 img/s"]["measured"]
    assert "10.00x" in goals["fused loss >= 5x eager (B=256, C=100)"]["measured"]
    assert all(g["met"] is None for g in summary["goals"])  # CPU-measured: shown, never judged
    md = (out / "results.md").read_text()
    assert "## Stages" in md and "## step: ok" in md and "| bf16_cl_fused |" in md
    assert (out / "results.png").stat().st_size > 1000


def test_run_all_records_failures_and_continues(tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "good.py").write_text(
        "import argparse, json\np = argparse.ArgumentParser(); p.add_argument('--json')\n"
        "a = p.parse_args()\njson.dump({'benchmark': 'good', 'rows': [{'images_per_s': 3.0}]}, open(a.json, 'w'))\n")
    (bench / "bad.py").write_text(
        "import argparse, sys\np = argparse.ArgumentParser(); p.add_argument('--json')\np.parse_args()\n"
        "print('boom: something broke'); sys.exit(3)\n")
    (bench / "slow.py").write_text(
        "import argparse, time\np = argparse.ArgumentParser(); p.add_argument('--json')\np.parse_args()\n"
        "time.sleep(60)\n")
    monkeypatch.setattr(run_all, "HERE", bench)
    monkeypatch.setattr(run_all, "SCRIPTS", {"good": "good.py", "bad": "bad.py", "slow": "slow.py",
                                             "gone": "gone.py"})
    out = tmp_path / "out"
    records = {name: run_all.run_one(name, ["--unknown-flag", "1"], out, timeout=8)
               for name in ("good", "bad", "slow", "gone")}
    assert records["good"]["status"] == "ok" and records["good"]["result"]["rows"][0]["images_per_s"] == 3.0
    assert "--unknown-flag" not in records["good"]["command"]  # flags the script lacks are dropped
    assert records["bad"]["status"] == "failed" and records["bad"]["rc"] == 3
    assert "boom" in records["bad"]["error"]
    assert records["slow"]["status"] == "timeout"
    assert records["gone"]["status"] == "missing"
    assert (out / "logs" / "bad.log").read_text().startswith("boom")


def test_filter_flags_keeps_only_documented_flags():
    help_text = "usage: x [--data DATA] [--quick] [--batch-size N] [--json JSON]"
    args = ["--data", "/p", "--batch", "8", "--quick", "--batch-size", "4", "--res", "32"]
    assert run_all.filter_flags(args, help_text) == ["--data", "/p", "--quick", "--batch-size", "4"]


def test_common_helpers():
    calls = []
    windows = common.time_windows(lambda: calls.append(1), "cpu", warmup=2, windows=3, steps=4)
    assert len(windows) == 3 and len(calls) == 2 + 3 * 4 and all(w >= 0 for w in windows)
    assert common.spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    md = common.markdown_table([{"a": 1, "b": 2.345}], [("a", "A"), ("b", "B")])
    assert md.splitlines() == ["| A | B |", "|---|---|", "| 1 | 2.35 |"]
    assert common.device_slug({"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert common.device_slug({"device": "cpu", "cpu": "AMD EPYC", "cpu_count": 2}) == "cpu-amd-epyc-2c"


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
