"""The benchmark scripts run end to end in a tiny CPU mode and write the JSON their docs promise.

Speed is never asserted here (ratios are measured by benchmarks, not tests); what is checked is
that each script runs the trainer's own code (step_throughput and e2e_throughput time
fastkd.step.build_step's step), that its rows are the expected ones, that every script's JSON
follows benchmarks/common.py's result schema, and that the numbers are finite and positive where
a measurement was made. run_all.py's bookkeeping (a failing, missing, hanging or schema-breaking
benchmark is recorded and the others still run) is checked with stand-in scripts.
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


STEP_VARIANTS = ("fp32_nchw", "bf16_cl_fused", "bf16_cl_compiled")


@pytest.fixture(scope="module")
def step_result(tmp_path_factory) -> tuple[dict, list]:
    """step_throughput.main in this process, with fastkd.step.build_step spied on: (result, the
    configs build_step was called with). The compiled variant uses compile.mode cudagraphs (on CPU:
    dynamo + AOT autograd without CUDA graphs, ~40 s; inductor's C++ compile takes minutes)."""
    import step_throughput

    out = tmp_path_factory.mktemp("step") / "step.json"
    calls = []
    real = step_throughput.build_step

    def spy(cfg, num_classes, device, **kwargs):
        calls.append(cfg)
        return real(cfg, num_classes, device, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_throughput, "build_step", spy)
        # 64 px: at 32 px with batch 2 MobileNetV2's 1x1 last stages turn NaN within two SGD steps
        assert step_throughput.main(["--device", "cpu", "--res", "64", "--batch", "2", "--steps", "1",
                                     "--windows", "2", "--warmup", "1", "--threads", "1",
                                     "--compile-mode", "cudagraphs", "--variants", ",".join(STEP_VARIANTS),
                                     "--json", str(out)]) == 0
    return json.loads(out.read_text()), calls


def test_step_throughput_times_the_trainers_step(step_result):
    """One fastkd.step.build_step per variant, each with the variant's config keys."""
    result, calls = step_result
    from fastkd.step import build_step

    import step_throughput

    assert step_throughput.build_step is build_step  # the spy is gone, the real one is imported
    assert len(calls) == len(STEP_VARIANTS)
    got = [(c.precision.amp, c.precision.channels_last, c.loss.fused, c.compile.mode, c.loss.method,
            c.model.teacher, list(c.model.students)) for c in calls]
    students = ["resnet18", "mobilenet_v2"]
    assert got == [("fp32", False, False, "none", "uadkd", "resnet50", students),
                   ("bf16", True, True, "none", "uadkd", "resnet50", students),
                   ("bf16", True, False, "cudagraphs", "uadkd", "resnet50", students)]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["bf16_cl_compiled"]["config"] == {"precision.amp": "bf16", "precision.channels_last": "true",
                                                  "loss.fused": "false", "compile.mode": "cudagraphs"}
    assert "reference" in rows["bf16_cl_compiled"]["loss_impl"]


def test_step_throughput_rows(step_result):
    step_result, _ = step_result
    assert common.validate_result(step_result) == []
    assert step_result["benchmark"] == "step_throughput"
    assert step_result["machine"]["device"] == "cpu" and step_result["machine"]["torch"]
    rows = {r["name"]: r for r in step_result["rows"]}
    assert list(rows) == list(STEP_VARIANTS)  # the new compiled-reference variant is in the CPU table
    for r in rows.values():
        assert r["status"] == "ok", r
        assert (r["res"], r["batch"], r["case"], r["unit"]) == (64, 2, "64px b2", "img/s")
        for key in ("value", "step_ms", "tflops", "gflop_per_image"):
            assert positive(r[key]), (key, r)
        assert len(r["windows_s"]) == 2 and all(positive(w) for w in r["windows_s"])
        # images/s is the batch over the median window's time per step
        assert r["value"] == pytest.approx(2 / common.median(r["windows_s"]), rel=1e-3)  # windows_s rounded
        assert math.isfinite(r["loss"]) and r["loss"] > 0  # the meter's read after the timed steps
        assert r["baseline"] == "fp32_nchw"
    # teacher fwd + 3 x students' fwd at 64 px: about 21 GFLOP/img at 224 px scaled by (64/224)^2
    assert 1.2 < rows["fp32_nchw"]["gflop_per_image"] < 2.4
    assert rows["fp32_nchw"]["gflop_per_image"] == rows["bf16_cl_fused"]["gflop_per_image"]
    assert rows["fp32_nchw"]["ratio"] == pytest.approx(1.0)
    assert rows["bf16_cl_fused"]["ratio"] == pytest.approx(rows["bf16_cl_fused"]["value"] / rows["fp32_nchw"]["value"])
    assert "fused op" in rows["bf16_cl_fused"]["loss_impl"]
    assert positive(rows["bf16_cl_compiled"]["compile_s"])
    assert step_result["headline"] and all(positive(h["value"]) for h in step_result["headline"])
    goals = step_result["goals"]  # GPU goals, a CPU run: shown, never judged
    assert goals and all(g["met"] is None and "not a GPU run" in g["measured"] for g in goals)


def test_step_goals_judge_the_default_step_on_a_gpu_row_and_list_every_goal_without_one():
    """The 12,000 / 15,000 img/s goals judge the trainer's default step at 160 px b256 (not the
    fastest variant: a faster non-default variant does not meet them); with no row at 160 px
    every goal is still listed, as not measured."""
    import step_throughput

    gpu = {"device": "cuda:0"}

    def row(name, value, ratio):
        return dict(name=name, status="ok", res=160, batch=256, value=value, ratio=ratio)

    rows = [row("fp32_nchw", 2600.0, 1.0), row("bf16_cl_fused", 6400.0, 2.46), row("default", 12500.0, 4.8),
            row("bf16_cl_fused_graphs", 15500.0, 5.9)]
    goals = {g["goal"]: g for g in step_throughput.goals(rows, gpu)}
    assert goals["default step >= 12,000 img/s at 160 px b256"]["met"] is True
    assert "12,500 img/s" in goals["default step >= 12,000 img/s at 160 px b256"]["measured"]
    assert goals["stretch: default step >= 15,000 img/s at 160 px b256"]["met"] is False
    assert goals["step >= 4x the fp32 NCHW eager baseline, same run"]["met"] is True
    empty = step_throughput.goals([], gpu)
    assert len(empty) == 4 and all(g["met"] is None and "not measured" in g["measured"] for g in empty)


def test_step_throughput_compiled_variants_skipped_off_compile_shapes(tmp_path):
    """A compiled variant at a shape outside --compile-shapes is a skipped row, not a missing one."""
    import step_throughput

    out = tmp_path / "step.json"
    step_throughput.main(["--device", "cpu", "--res", "32", "--batch", "2", "--compile-shapes", "64x8",
                          "--variants", "bf16_cl_compiled", "--json", str(out)])
    result = json.loads(out.read_text())
    assert common.validate_result(result) == []
    (row,) = result["rows"]
    assert (row["name"], row["status"], row["value"]) == ("bf16_cl_compiled", "skipped", None)
    assert "--compile-shapes" in row["error"]


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
    assert common.validate_result(result) == []
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["torch", "nosuch", "synthetic"]
    assert rows["nosuch"]["status"] == "skipped" and "nosuch" in rows["nosuch"]["error"]
    for name in ("torch", "synthetic"):
        r = rows[name]
        assert r["status"] == "ok" and r["images"] == 4 * 4 and r["baseline"] == "synthetic"
        assert positive(r["value"]) and positive(r["wall_s"]) and positive(r["ratio"])
        assert 0.0 <= r["wait_frac_steady"] <= r["wait_frac"] <= 1.0
    assert rows["synthetic"]["wait_frac"] < 0.05  # a tuple from a lambda: nothing to wait for
    # 16 train images, batch 4: 4 batches an epoch, so 4 steps after 1 warm-up cross one epoch end
    assert rows["torch"]["epoch_starts"] == 1 and rows["synthetic"]["epoch_starts"] == 0
    assert rows["synthetic"]["ratio"] == pytest.approx(1.0)
    assert "reference" in result["notes"][0]  # fp32_nchw on CPU: the trainer's step, reference loss
    loader = tmp_path / "loader.json"
    run_script("benchmarks/loader_throughput.py", "--device", "cpu", "--data", str(packed),
               "--backends", "folder,torch,nosuch", "--batch-size", "4", "--resolution", "32",
               "--epochs", "1", "--workers", "1", "--json", str(loader))
    result = json.loads(loader.read_text())
    assert common.validate_result(result) == []
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["folder"]["ratio"] == pytest.approx(1.0) and positive(rows["torch"]["ratio"])
    assert rows["nosuch"]["status"] == "skipped"


def test_loss_kernel_json_follows_schema(tmp_path):
    out = tmp_path / "loss.json"
    run_script("benchmarks/loss_kernel.py", "--device", "cpu", "--quick", "--no-compile", "--warmup", "1",
               "--iters", "2", "--threads", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert common.validate_result(result) == []
    rows = {(r["name"], r["case"]): r for r in result["rows"]}
    shapes = ((256, 100), (1024, 1000))
    assert set(rows) == {(impl, f"cpu B={b} C={c}") for impl in ("eager", "fused") for b, c in shapes}
    eager, fused = rows[("eager", "cpu B=256 C=100")], rows[("fused", "cpu B=256 C=100")]
    assert eager["unit"] == "ms" and eager["ratio"] == pytest.approx(1.0)
    assert fused["ratio"] == pytest.approx(eager["value"] / fused["value"])  # a time: base / value
    assert result["goals"][0]["met"] is None  # no GPU row


def test_pack_and_methods_results_follow_schema():
    """pack_throughput and methods_table build their payloads through common (no FFCV run or
    training here): a row of each, as the scripts make them, validates."""
    import methods_table

    report = {"wall_time_s": 3.0, "networks": {"resnet18": {"top1": 90.0, "top5": 99.0, "ece": 0.05},
                                               "mobilenet_v2": {"top1": 80.0, "top5": 98.0, "ece": 0.04}}}
    row = methods_table.row_for("uadkd", [report])
    assert (row["name"], row["value"], row["unit"], row["status"]) == ("uadkd", 85.0, "% top-1", "ok")
    payload = methods_table.result([row], machine=common.machine_info("cpu"), params={}, notes=["n"])
    assert common.validate_result(payload) == []
    assert payload["headline"][0] == {"label": "uadkd resnet18 top-1", "value": 90.0, "unit": "%", "ratio": None}
    source = (BENCH / "pack_throughput.py").read_text()
    assert "common.write_result(" in source and "common.row(" in source


def test_schema_rejects_what_run_all_cannot_read():
    good = _fake_result("x", [common.row("a", unit="img/s", value=2.0, baseline="a")])
    assert common.validate_result(good) == []
    bad_rows = [
        {"name": "a", "case": "", "status": "ok", "unit": "img/s", "value": None, "baseline": None, "ratio": None},
        {"name": "a", "case": "", "status": "done", "unit": "img/s", "value": 1.0, "baseline": None, "ratio": None},
        {"images_per_s": 3.0},  # an old-style row: no name, unit, value
    ]
    for r in bad_rows:
        assert common.validate_result(dict(good, rows=[r])), r
    assert common.validate_result(dict(good, schema=1))
    dup = [common.row("a", unit="x", value=1.0), common.row("a", unit="x", value=2.0)]
    assert any("repeated" in e for e in common.validate_result(dict(good, rows=dup)))
    with pytest.raises(ValueError, match="schema"):
        common.write_result(None, "x", bad_rows[:1], machine={}, params={})
    rows = common.fill_ratios([common.row("base", unit="ms", value=4.0, baseline="base"),
                               common.row("fast", unit="ms", value=1.0, baseline="base"),
                               common.row("gone", unit="ms", status="skipped", baseline="base")])
    assert [r["ratio"] for r in rows] == [1.0, 4.0, None]


def _fake_result(name: str, rows: list[dict], device: str = "cpu", goals=None) -> dict:
    return common.write_result(None, name, rows, machine=common.machine_info(device), params={},
                               headline=[common.head(f"{name} x", 12.5, "img/s")], goals=goals)


def test_run_all_collect_writes_json_markdown_chart(tmp_path):
    jsons = tmp_path / "json"
    jsons.mkdir()
    step_rows = common.fill_ratios([
        common.row("fp32_nchw", case="160px b256", unit="img/s", value=1000.0, baseline="fp32_nchw"),
        common.row("bf16_cl_fused", case="160px b256", unit="img/s", value=5000.0, baseline="fp32_nchw")])
    goal = common.goal("step >= 6,000 img/s", "5,000 img/s", False, common.machine_info("cpu"))
    (jsons / "step.json").write_text(json.dumps(_fake_result("step_throughput", step_rows, goals=[goal])))
    case = "cuda B=256 C=100"
    loss_rows = common.fill_ratios([common.row("eager", case=case, unit="ms", value=1.0, baseline="eager"),
                                    common.row("fused", case=case, unit="ms", value=0.1, baseline="eager")])
    (jsons / "loss.json").write_text(json.dumps(_fake_result("loss_kernel", loss_rows)))
    old = {"meta": {}, "results": [{"device": "cuda", "B": 256, "C": 100, "impl": "fused", "speedup": 10.0}]}
    (jsons / "old.json").write_text(json.dumps(old))  # another schema: reported, never guessed at
    (jsons / "broken.json").write_text("{not json")
    stages = tmp_path / "stages.tsv"
    stages.write_text("env\tpass\t1\t\nstep\tpass\t42\t\nkernel\tskip\t0\tneeds CUDA\n")
    out = tmp_path / "results"
    assert run_all.main(["--collect", str(jsons), "--stages", str(stages), "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["benchmarks"]) == {"step", "loss", "old", "broken"}
    assert summary["benchmarks"]["broken"]["status"] == "failed"
    assert summary["benchmarks"]["old"]["status"] == "failed"
    assert "schema" in summary["benchmarks"]["old"]["error"]
    assert summary["benchmarks"]["step"]["seconds"] == "42"
    assert [s["stage"] for s in summary["stages"]] == ["env", "step", "kernel"]
    # goals come from the result files only
    assert summary["goals"] == [dict(goal, benchmark="step")]
    assert goal["met"] is None and "not a GPU run" in goal["measured"]
    assert summary["benchmarks"]["loss"]["result"]["rows"][1]["ratio"] == pytest.approx(10.0)
    md = (out / "results.md").read_text()
    assert "## Stages" in md and "## step: ok" in md and "| bf16_cl_fused |" in md
    assert (out / "results.png").stat().st_size > 1000
    table, columns = run_all.pivot(step_rows)
    assert columns == [("name", "name"), ("160px b256", "160px b256")]
    assert table[1] == {"name": "bf16_cl_fused", "160px b256": "5,000 (5.00x)"}


def test_run_all_records_failures_and_continues(tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    bench.mkdir()
    good = _fake_result("good", [common.row("a", unit="img/s", value=3.0)])
    (bench / "good.py").write_text(
        "import argparse, json\np = argparse.ArgumentParser(); p.add_argument('--json')\n"
        f"a = p.parse_args()\njson.dump({good!r}, open(a.json, 'w'))\n")
    (bench / "oldschema.py").write_text(
        "import argparse, json\np = argparse.ArgumentParser(); p.add_argument('--json')\n"
        "a = p.parse_args()\njson.dump({'benchmark': 'x', 'rows': [{'images_per_s': 3.0}]}, open(a.json, 'w'))\n")
    (bench / "bad.py").write_text(
        "import argparse, sys\np = argparse.ArgumentParser(); p.add_argument('--json')\np.parse_args()\n"
        "print('boom: something broke'); sys.exit(3)\n")
    (bench / "slow.py").write_text(
        "import argparse, time\np = argparse.ArgumentParser(); p.add_argument('--json')\np.parse_args()\n"
        "time.sleep(60)\n")
    monkeypatch.setattr(run_all, "HERE", bench)
    monkeypatch.setattr(run_all, "SCRIPTS", {"good": "good.py", "bad": "bad.py", "slow": "slow.py",
                                             "gone": "gone.py", "oldschema": "oldschema.py"})
    out = tmp_path / "out"
    records = {name: run_all.run_one(name, [], out, timeout=8)
               for name in ("good", "bad", "slow", "gone", "oldschema")}
    assert records["good"]["status"] == "ok" and records["good"]["result"]["rows"][0]["value"] == 3.0
    assert records["oldschema"]["status"] == "failed" and "schema" in records["oldschema"]["error"]
    assert records["bad"]["status"] == "failed" and records["bad"]["rc"] == 3
    assert "boom" in records["bad"]["error"]
    assert records["slow"]["status"] == "timeout"
    assert records["gone"]["status"] == "missing"
    assert (out / "logs" / "bad.log").read_text().startswith("boom")


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


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """gpu_check.sh's CPU dry run (the mode it takes without CUDA), cut to the loss and step
    stages: both pass, and the collected results.json holds their schema results."""
    import os

    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), ONLY="loss step", BUDGET_S="500",
               STEP_VARIANTS="fp32_nchw,bf16_cl_fused", PY=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    stages = {line.split("\t")[0]: line.split("\t")[1]
              for line in (tmp_path / "work" / "stages.tsv").read_text().splitlines()}
    assert stages["loss"] == "pass" and stages["step"] == "pass", stages
    assert stages["kernel"] == "skip"  # needs CUDA
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in ("loss", "step"):
        assert summary["benchmarks"][name]["status"] == "ok"
        assert common.validate_result(summary["benchmarks"][name]["result"]) == []
    names = [r["name"] for r in summary["benchmarks"]["step"]["result"]["rows"]]
    assert names == ["fp32_nchw", "bf16_cl_fused"]


# A recorded `nvidia-smi dmon -s u` sample (the format of 5xx drivers): the header repeats, and a
# counter the driver does not report reads "-".
DMON_SAMPLE = """\
# gpu    sm   mem   enc   dec   jpg   ofa
# Idx     %     %     %     %     %     %
    0    35     4     0     0    62     0
    0    12     2     0     0     -     0
# gpu    sm   mem   enc   dec   jpg   ofa
# Idx     %     %     %     %     %     %
    0    41     5     0     0    70     0
    0    4"""


def test_jpeg_engines_parses_dmon_and_judges_the_engines():
    import jpeg_engines as je

    columns, rows = je.parse_dmon(DMON_SAMPLE.splitlines())
    assert columns == ["gpu", "sm", "mem", "enc", "dec", "jpg", "ofa"]
    assert len(rows) == 3  # repeated header skipped, the cut last line dropped
    assert rows[1]["jpg"] is None and rows[1]["sm"] == 12.0
    s = je.summarise(columns, rows)
    assert s["engines"] == "yes" and s["jpg_util_max"] == 70.0 and s["jpg_util_mean"] == pytest.approx(66.0)
    assert s["sm_util_max"] == 41.0 and s["jpg_samples"] == [62.0, 70.0] and s["samples"] == 3
    idle = DMON_SAMPLE.replace("   62 ", "    0 ").replace("   70 ", "    0 ")
    assert je.summarise(*je.parse_dmon(idle.splitlines()))["engines"] == "no"
    # an older driver without the JPEG column: the engines are unknown, never "no"
    old = ["# gpu    sm   mem   enc   dec", "# Idx     %     %     %     %", "    0    50     3     0     0"]
    s = je.summarise(*je.parse_dmon(old))
    assert s["engines"] == "unknown" and s["jpg_util_max"] is None and s["sm_util_max"] == 50.0
    assert je.summarise(*je.parse_dmon(["nvidia-smi: command failed"]))["engines"] == "unknown"


def test_jpeg_engines_loop_samples_while_decoding_and_reads_subsampling():
    """sampled_loop with a stand-in dmon that prints the recorded sample after 0.3 s: the loop
    decodes until the stand-in has exited, and the summary comes from its output."""
    import io

    import jpeg_engines as je
    from PIL import Image

    calls = []
    fake = ["bash", "-c", f"sleep 0.3; printf '%s\\n' {' '.join(repr(x) for x in DMON_SAMPLE.splitlines())}"]
    result = je.sampled_loop(lambda: calls.append(1) or 4, lambda: None, 0.0, fake)
    assert result["dmon_error"] is None and result["engines"] == "yes" and result["samples"] == 3
    assert result["images"] == 4 * len(calls) and result["seconds"] >= 0.3 and result["rate"] > 0
    missing = je.sampled_loop(lambda: 1, lambda: None, 0.05, ["/nonexistent/nvidia-smi"])
    assert missing["engines"] == "unknown" and "nvidia-smi" in missing["dmon_error"]
    assert je.smi_gpu_id(0) in (__import__("os").environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip(), "0")
    for sub, want in ((2, "4:2:0"), (0, "4:4:4")):
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (200, 30, 90)).save(buf, format="JPEG", quality=90, subsampling=sub)
        assert je.jpeg_subsampling(buf.getvalue()) == want


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU run: a GPU would measure")
def test_jpeg_engines_cpu_run_records_skipped_paths(tmp_path):
    import jpeg_engines as je

    out = tmp_path / "engines.json"
    assert je.main(["--device", "cpu", "--json", str(out)]) == 0
    payload = common.read_result(out)
    assert common.validate_result(payload) == [] and payload["benchmark"] == "jpeg_engines"
    assert [r["name"] for r in payload["rows"]] == ["torch", "nvimgcodec-gpu", "nvimgcodec"]
    for r in payload["rows"]:
        assert r["status"] == "skipped" and "CUDA" in r["error"] and r["engines"] == "unknown"
    with pytest.raises(SystemExit):
        je.main(["--device", "cpu", "--paths", "torch,bogus"])


def test_decode_table_labels_gpu_paths_by_the_engines_that_ran():
    import decode_table
    import jpeg_engines as je

    gpu = {"device": "cuda", "gpu": "NVIDIA H200"}
    rows = [common.row("torch", case="400px b256", unit="img/s", value=3000.0, engines="no",
                       jpg_util_max=0.0, sm_util_max=88.0),
            common.row("nvimgcodec", case="400px b256", unit="img/s", value=5000.0, engines="yes",
                       jpg_util_max=62.0, sm_util_max=5.0),
            common.row("nvimgcodec-gpu", case="400px b256", unit="img/s", status="skipped",
                       error="nvImageCodec is not importable (ModuleNotFoundError: No module named 'nvidia')")]
    result = common.write_result(None, "jpeg_engines", rows, machine=gpu, params={})
    loader = common.write_result(None, "loader_throughput",
                                 [common.row("torch", unit="img/s", value=2500.0, res=160)],
                                 machine=gpu, params={"resolution": 160})
    kinds = {r["path"]: r["kind"] for r in decode_table.build([loader, result], resolutions=(160,))}
    assert kinds["torch"] == "nvJPEG CUDA, engines: no"
    assert kinds["nvimgcodec"] == "hardware engines, engines: yes"
    assert kinds["nvimgcodec-gpu"] == "nvImageCodec CUDA"  # not measured: no label
    used, lines = decode_table.engines([result])
    assert used == {"torch": "no", "nvimgcodec": "yes"}
    assert all(len(line) <= 60 for line in lines) and any("nvimgcodec-gpu: not measured" in x for x in lines)
    # a CPU run measured nothing: no GPU row is labelled
    cpu = common.write_result(None, "jpeg_engines", [dict(r, status="skipped", value=None) for r in rows[:1]],
                              machine={"device": "cpu"}, params={})
    assert decode_table.engines([cpu])[0] == {}
    assert je.PATHS[0] == "torch"  # measured first: no earlier engine work can show in its samples
