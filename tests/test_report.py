"""fastkd.metrics (metrics.jsonl), fastkd.live (live display) and fastkd.report (summary table,
report.json/.md and PNG plots)."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

import fastkd.report
from fastkd.live import LiveDisplay
from fastkd.metrics import MetricsLog, read_metrics, truncate_metrics
from fastkd.report import config_digest, summary_table, write_report

NETS = ("resnet18", "mobilenet_v2")


def fake_eval(epoch, with_teacher=True):
    res = {}
    for i, name in enumerate(NETS):
        top1 = min(99.0, 40 + 15 * epoch - 3 * i)
        res[name] = {
            "top1": top1,
            "top5": min(100.0, top1 + 20),
            "loss": 2.0 / (epoch + 1) + 0.1 * i,
            "ece": 0.05 + 0.01 * i,
            "reliability": {
                "confidence": [0.05 + 0.1 * b for b in range(10)],
                "accuracy": [max(0.0, 0.1 * b - 0.05) for b in range(10)],
                "count": [0, 1, 2, 4, 8, 10, 20, 30, 50, 75],
                "edges": [b / 10 for b in range(11)],
            },
        }
    if with_teacher:
        res["teacher"] = dict(res["resnet18"], top1=97.5, top5=100.0)
        res["teacher_w"] = {"mean": 0.71, "hist": [1, 2, 3, 5, 8, 13, 21, 34, 55, 89], "edges": [b / 10 for b in range(11)]}
    return res


def fabricate_metrics(path, epochs=4, steps_per_epoch=5, with_teacher=True):
    log = MetricsLog(path, enabled=True)
    for epoch in range(epochs):
        for s in range(1, steps_per_epoch + 1):
            step = epoch * steps_per_epoch + s
            log.write({
                "kind": "step", "epoch": epoch, "step": step, "lr": 0.1 * (1 - step / 40),
                "images_per_s": 800.0 + step, "loss": 3.0 * math.exp(-step / 8),
                "ce": {n: 1.5 * math.exp(-step / 8) for n in NETS},
                "kd": torch.tensor([0.5 * math.exp(-step / 10), 0.6 * math.exp(-step / 10)]),
                "peer": [0.2, 0.25],
                "train_top1": {n: min(100.0, 30 + 3 * step) for n in NETS},
                "w_mean": 0.7,
            })
        log.write({"kind": "eval", "epoch": epoch, "step": (epoch + 1) * steps_per_epoch, **fake_eval(epoch, with_teacher)})
    log.close()


def make_summary(with_teacher=True):
    last = fake_eval(3)
    return {
        "method": "uadkd" if with_teacher else "ce",
        "networks": {
            "resnet18": {"arch": "resnet18", "params": 11_181_642, "top1": last["resnet18"]["top1"],
                         "top5": last["resnet18"]["top5"], "best_top1": 85.0},
            "mobilenet_v2": {"arch": "mobilenet_v2", "params": 2_236_682, "top1": last["mobilenet_v2"]["top1"],
                             "top5": last["mobilenet_v2"]["top5"], "best_top1": 82.0},
        },
        "teacher": {"arch": "resnet50", "params": 23_528_522, "top1": 97.5, "top5": 100.0} if with_teacher else None,
        "images_per_s": 812.5,
        "wall_time_s": 123.4,
        "config": {"loss": {"method": "uadkd", "temperature": 4.0}, "optim": {"lr": 0.5}},
    }


def assert_real_png(path, min_colors=40):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[0] >= 300 and rgb.shape[1] >= 400
    non_white = (rgb < 245).any(axis=-1).mean()
    assert 0.02 < non_white < 0.9, f"{path.name}: {non_white:.3f} of pixels drawn"
    colors = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert colors >= min_colors, f"{path.name}: only {colors} colours"


def test_write_report_files_numbers_and_plots(tmp_path):
    fabricate_metrics(tmp_path / "metrics.jsonl")
    summary = make_summary()
    report = write_report(tmp_path, summary)

    data = json.loads((tmp_path / "report.json").read_text())
    assert data == json.loads(json.dumps(report))
    for name, net in summary["networks"].items():
        for key, value in net.items():
            assert data["networks"][name][key] == value
    assert data["teacher"] == summary["teacher"]
    assert data["images_per_s"] == 812.5 and data["wall_time_s"] == 123.4
    assert data["method"] == "uadkd"
    assert data["networks"]["resnet18"]["compression"] == pytest.approx(23_528_522 / 11_181_642)
    assert data["networks"]["mobilenet_v2"]["compression"] == pytest.approx(23_528_522 / 2_236_682)
    assert data["config_digest"] == config_digest(summary["config"])
    assert data["fastkd_version"]
    assert data["plots"] == [f"plots/{n}.png" for n in ("loss", "accuracy", "w_hist", "reliability")]

    md = (tmp_path / "report.md").read_text()
    for text in ("uadkd", "resnet18", "mobilenet_v2", "resnet50", "11.18M", "2.10x", "10.52x",
                 "2:03", "812 images/s", data["config_digest"], "plots/reliability.png"):
        assert text in md, text
    for rel in data["plots"]:
        assert_real_png(tmp_path / rel)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_report_without_teacher_leaves_out_w_hist(tmp_path):
    fabricate_metrics(tmp_path / "metrics.jsonl", with_teacher=False)
    report = write_report(tmp_path, make_summary(with_teacher=False))
    assert "plots/w_hist.png" not in report["plots"]
    assert not (tmp_path / "plots" / "w_hist.png").exists()
    assert "compression" not in report["networks"]["resnet18"] or report["networks"]["resnet18"]["compression"] is None
    assert (tmp_path / "plots" / "loss.png").exists()


def test_plots_differ_with_the_data(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fabricate_metrics(a / "metrics.jsonl", epochs=4)
    fabricate_metrics(b / "metrics.jsonl", epochs=2)
    write_report(a, make_summary())
    write_report(b, make_summary())
    assert (a / "plots/accuracy.png").read_bytes() != (b / "plots/accuracy.png").read_bytes()


def test_metrics_log_appends_converts_and_dedupes(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLog(path, enabled=True) as log:
        log.write({"kind": "step", "epoch": 0, "step": 1, "loss": torch.tensor(2.5)})
        log.write({"kind": "step", "epoch": 0, "step": 2, "loss": 2.0})
        assert len(path.read_text().splitlines()) == 2  # flushed at once
    # a resumed run appends; its repeated step replaces the killed run's record
    with MetricsLog(path, enabled=True) as log:
        log.write({"kind": "step", "epoch": 0, "step": 2, "loss": 1.9})
        log.write({"kind": "eval", "epoch": 0, "step": 2, "resnet18": {"top1": 50.0}})
    with open(path, "a") as f:
        f.write('{"kind": "step", "epo')  # cut off by a kill
    records = read_metrics(path)
    assert [r["loss"] for r in records if r["kind"] == "step"] == [2.5, 1.9]
    assert len(records) == 3 and all("time" in r for r in records)

    disabled = MetricsLog(tmp_path / "other.jsonl", enabled=False)
    disabled.write({"kind": "step"})
    disabled.close()
    assert not (tmp_path / "other.jsonl").exists()


def test_append_after_a_cut_off_line_keeps_the_next_record(tmp_path):
    """kill -9 mid-write leaves a last line without newline; the resumed run's first record must
    start on a line of its own instead of being glued to the fragment (and lost)."""
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, enabled=True) as log:
        log.write({"kind": "step", "epoch": 0, "step": 1, "loss": 2.0})
    with open(path, "a") as f:
        f.write('{"kind": "step", "epoch": 0, "st')
    with MetricsLog(path, enabled=True) as log:
        log.write({"kind": "step", "epoch": 0, "step": 2, "loss": 1.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_truncate_metrics_drops_records_past_the_checkpoint(tmp_path):
    """Killed in epoch 2 (0-based) after step 8; the checkpoint stands at 2 epochs done, global
    step 6 (3 steps per epoch): steps 7, 8, the eval of epoch 2 and the cut-off line go."""
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, enabled=True) as log:
        log.write({"kind": "note", "text": "started"})
        for epoch in range(3):
            for s in range(1, 4):
                step = epoch * 3 + s
                if step <= 8:
                    log.write({"kind": "step", "epoch": epoch, "step": step, "loss": 1.0 / step})
            if epoch < 2:
                log.write({"kind": "eval", "epoch": epoch, "step": (epoch + 1) * 3, "resnet18": {"top1": 50.0}})
        # an eval of epoch 2 at a step <= 6 cannot happen in order, but goes by its epoch
        log.write({"kind": "eval", "epoch": 2, "step": 6, "resnet18": {"top1": 60.0}})
    with open(path, "a") as f:
        f.write('{"kind": "step", "ep')
    lines = path.read_bytes().splitlines(keepends=True)

    assert truncate_metrics(path, keep_through_step=6, keep_epoch_evals_before=2) == 4
    assert path.read_bytes() == b"".join(lines[:9])  # kept lines byte for byte
    records = read_metrics(path)
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [0, 1]
    assert records[0]["kind"] == "note"

    # the resumed run appends steps 7.. again: each step once
    with MetricsLog(path, enabled=True) as log:
        log.write({"kind": "step", "epoch": 2, "step": 7, "loss": 0.1})
    steps = [r["step"] for r in read_metrics(path) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    mtime = path.stat().st_mtime_ns
    assert truncate_metrics(path, 7, 3) == 0 and path.stat().st_mtime_ns == mtime  # nothing to do
    assert truncate_metrics(tmp_path / "missing.jsonl", 0, 0) == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_module_keeps_the_old_names():
    from fastkd import live, metrics

    assert fastkd.report.LiveDisplay is live.LiveDisplay and fastkd.report.MetricsLog is metrics.MetricsLog
    assert fastkd.report.read_metrics is metrics.read_metrics


def test_live_display_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with LiveDisplay(enabled=True, total_epochs=3, file=out) as live:
        live.start_epoch(0, 10)
        live.update(5, {"loss": 1.2345, "ce": [0.5, 0.6], "lr": 0.1}, images_per_s=1234.0)
        live.update(10, {"loss": 1.0, "ce": {"a": 0.4, "b": 0.5}, "lr": 0.05}, images_per_s=1300.0)
        live.end_epoch(fake_eval(1))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "epoch 1/3 step 5/10" in lines[0] and "loss 1.234" in lines[0] and "ce 0.5/0.6" in lines[0]
    assert "1,234 img/s" in lines[0] and "eta" in lines[0] and "lr 0.1" in lines[0]
    assert "resnet18 55.00/75.00" in lines[2] and "w 0.710" in lines[2]

    quiet = io.StringIO()
    with LiveDisplay(enabled=False, file=quiet) as live:
        live.start_epoch(0, 10)
        live.update(5, {"loss": 1.0}, 100.0)
        live.end_epoch(fake_eval(0))
    assert quiet.getvalue() == ""


def test_live_display_rich_progress_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with LiveDisplay(enabled=True, total_epochs=2, console=console) as live:
        for epoch in range(2):
            live.start_epoch(epoch, 4)
            for step in range(1, 5):
                live.update(step, {"loss": 1.0 / step, "lr": 0.1}, images_per_s=999.0)
            live.end_epoch(fake_eval(epoch))
    text = out.getvalue()
    assert "img/s" in text and "epoch 2/2 done" in text and "mobilenet_v2" in text


def test_summary_table_rows():
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(make_summary()))
    text = out.getvalue()
    for needle in ("teacher", "resnet50", "23.53M", "resnet18", "2.10x", "mobilenet_v2", "10.52x",
                   "82.00", "812 img/s"):
        assert needle in text, needle


def test_ema_accuracy_in_table_markdown_and_json(tmp_path):
    """With an EMA of the students, its last and best top-1 are columns of the final table and of
    report.md, and keys of report.json; without one, neither column is shown."""
    fabricate_metrics(tmp_path / "metrics.jsonl")
    summary = make_summary()
    for i, net in enumerate(summary["networks"].values()):
        net.update(ema_top1=71.125 + i, ema_top5=90.0, ema_best_top1=72.375 + i)
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(summary))
    table = out.getvalue()
    write_report(tmp_path, summary)
    md = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    for text in (table, md):
        assert "EMA top-1" in text and "EMA best" in text
    rows = [line for line in md.splitlines() if line.startswith("| mobilenet_v2 |")]
    assert rows and rows[0].endswith("| 72.12 | 73.38 |")  # last cells: EMA top-1, EMA best top-1
    row = next(line for line in table.splitlines() if "mobilenet_v2" in line)
    assert [cell.strip() for cell in row.split("│")][-3:-1] == ["72.12", "73.38"]
    assert data["networks"]["mobilenet_v2"]["ema_top1"] == 72.125
    assert data["networks"]["resnet18"]["ema_best_top1"] == 72.375

    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(make_summary()))
    assert "EMA" not in out.getvalue()
