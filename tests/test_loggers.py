"""fastkd.loggers: TensorBoard and W&B sinks fed by MetricsLog, read back from their own files.

Values are float32-exact (TensorBoard stores scalars as float32), so they are compared with ==.
"""

from __future__ import annotations

import glob
import json
import struct
import sys
import time

import pytest

from fastkd.errors import FastKDError
from fastkd.loggers import TensorBoardSink, build_loggers, logger_names, wandb_mode
from fastkd.metrics import MetricsLog, read_metrics

NETS = ("resnet18", "mobilenet_v2")


def step_record(step, loss, epoch=0):
    return {"kind": "step", "epoch": epoch, "step": step, "lr": 0.125 * step, "images_per_s": 1000.0 + step,
            "world_size": 1, "samples": 64, "samples_seen": 64 * step, "loss": loss,
            "ce": {"resnet18": 1.5, "mobilenet_v2": 1.75}, "kd": {"resnet18": 0.5, "mobilenet_v2": 0.25},
            "w_mean": 0.625, "train_top1": {"resnet18": 12.5, "mobilenet_v2": 10.0}}  # fmt: skip


def eval_record(step, epoch=0):
    net = {"top1": 50.0, "top5": 75.0, "loss": 2.5, "ece": 0.0625,
           "reliability": {"accuracy": [0.5], "confidence": [0.5], "count": [4], "edges": [0.0, 1.0]}}  # fmt: skip
    return {"kind": "eval", "epoch": epoch, "step": step, "resnet18": net,
            "mobilenet_v2": {**net, "top1": 40.0}, "teacher": {**net, "top1": 80.0, "top5": 95.0},
            "teacher_w": {"mean": 0.375, "hist": [1, 0, 3, 4], "edges": [0.0, 0.25, 0.5, 0.75, 1.0]}}  # fmt: skip


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_event_file_holds_the_records(tmp_path, capsys):
    run = tmp_path / "run"
    sinks = build_loggers(["tensorboard"], run, {"run": {"seed": 3}}, enabled=True)
    assert [s.name for s in sinks] == ["tensorboard"]
    with MetricsLog(run / "metrics.jsonl", enabled=True, sinks=sinks) as log:
        log.write({"kind": "note", "step": 1, "text": "unknown kinds are not drawn"})
        log.write(step_record(1, 2.5))
        log.write(step_record(2, 2.0))
        log.write(eval_record(2))
    assert [r["kind"] for r in read_metrics(run / "metrics.jsonl")] == ["note", "step", "step", "eval"]
    files = glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    acc = read_events(run / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert scalars(acc, "train/loss") == [(1, 2.5), (2, 2.0)]
    assert scalars(acc, "train/lr") == [(1, 0.125), (2, 0.25)]
    assert scalars(acc, "train/images_per_s") == [(1, 1001.0), (2, 1002.0)]
    assert scalars(acc, "train/ce/mobilenet_v2") == [(1, 1.75), (2, 1.75)]
    assert scalars(acc, "train/kd/resnet18") == [(1, 0.5), (2, 0.5)]
    assert scalars(acc, "train/w_mean") == [(1, 0.625), (2, 0.625)]
    assert scalars(acc, "train/top1/resnet18") == [(1, 12.5), (2, 12.5)]
    for net, top1 in (("resnet18", 50.0), ("mobilenet_v2", 40.0), ("teacher", 80.0)):
        assert scalars(acc, f"val/{net}/top1") == [(2, top1)]
        assert scalars(acc, f"val/{net}/ece") == [(2, 0.0625)]
        assert scalars(acc, f"val/{net}/loss") == [(2, 2.5)]
    assert scalars(acc, "val/teacher/top5") == [(2, 95.0)]
    assert scalars(acc, "val/resnet18/top5") == [(2, 75.0)]
    assert scalars(acc, "val/teacher_w/mean") == [(2, 0.375)]
    # bookkeeping and unknown kinds are not drawn
    meta = ("epoch", "step", "samples", "samples_seen", "world_size", "time")
    assert not {t for t in tags if t.split("/")[-1] in meta}
    assert not any(t.startswith("val/teacher_w/") and t != "val/teacher_w/mean" for t in tags)
    assert "text" not in " ".join(tags)
    (hist,) = acc.Histograms("val/teacher_w")
    h = hist.histogram_value
    assert hist.step == 2
    assert list(h.bucket) == [1.0, 0.0, 3.0, 4.0]
    assert list(h.bucket_limit) == [0.25, 0.5, 0.75, 1.0]
    assert (h.min, h.max, h.num) == (0.0, 1.0, 8.0)
    assert h.sum == pytest.approx(1 * 0.125 + 3 * 0.625 + 4 * 0.875)
    assert capsys.readouterr().err == ""


def test_tensorboard_resume_replaces_the_steps_past_the_checkpoint(tmp_path):
    """A run killed at step 4 with its checkpoint at step 2 logs 3 and 4 again after the resume:
    TensorBoard shows the new values once (purge_step), like truncate_metrics does for the jsonl."""
    run = tmp_path / "run"
    with MetricsLog(run / "metrics.jsonl", enabled=True, sinks=[TensorBoardSink(run)]) as log:
        for step in (1, 2, 3, 4):
            log.write(step_record(step, float(step)))
    time.sleep(1.1)  # event files sort by name: seconds, host, pid, a counter
    with MetricsLog(run / "metrics.jsonl", enabled=True, sinks=[TensorBoardSink(run)]) as log:
        log.write({"kind": "resume", "epoch": 0, "step": 2, "notes": []})
        for step in (3, 4):
            log.write(step_record(step, 10.0 * step))
    assert scalars(read_events(run / "tensorboard"), "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    # without a resume record, the first step written again is where the purge starts
    time.sleep(1.1)
    with MetricsLog(run / "metrics.jsonl", enabled=True, sinks=[TensorBoardSink(run)]) as log:
        log.write(step_record(4, 400.0))
    assert scalars(read_events(run / "tensorboard"), "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 400.0)]


class Boom:
    name = "boom"

    def __init__(self):
        self.calls, self.closed = 0, 0

    def write(self, record):
        self.calls += 1
        raise RuntimeError("disk full")

    def close(self):
        self.closed += 1


class Keep:
    name = "keep"

    def __init__(self):
        self.records, self.closed = [], 0

    def write(self, record):
        self.records.append(record)

    def close(self):
        self.closed += 1


def test_a_failing_sink_is_reported_once_and_dropped(tmp_path, capsys):
    boom, keep = Boom(), Keep()
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, enabled=True, sinks=[boom, keep]) as log:
        log.write(step_record(1, 2.5))
        log.write(step_record(2, 2.0))
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert boom.calls == 1 and boom.closed == 1  # dropped after the first failure, closed once
    assert [r["step"] for r in keep.records] == [1, 2] and keep.closed == 1
    assert keep.records[0] == read_metrics(path)[0]  # the same record, "time" included
    err = capsys.readouterr().err
    assert err.count("boom logger failed") == 1 and "disk full" in err and "metrics.jsonl" in err


def test_sinks_only_where_the_log_is_enabled(tmp_path):
    keep = Keep()
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False, sinks=[keep])
    log.write(step_record(1, 2.5))
    log.close()
    assert keep.records == [] and keep.closed == 1
    assert build_loggers(["tensorboard"], tmp_path / "run", {}, enabled=False) == []
    assert not (tmp_path / "run").exists()


def test_logger_names():
    assert logger_names(["tensorboard"]) == ["tensorboard"]
    assert logger_names("wandb,tensorboard") == ["wandb", "tensorboard"]
    assert logger_names(["none"]) == [] and logger_names([]) == [] and logger_names(None) == []
    with pytest.raises(FastKDError, match=r"--log.*'mlflow'.*tensorboard, wandb"):
        logger_names(["mlflow"])


def test_missing_logger_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    for enabled in (True, False):  # every rank fails alike
        with pytest.raises(FastKDError, match=r"--log wandb.*pip install wandb"):
            build_loggers(["wandb"], tmp_path / "run", {}, enabled=enabled)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(FastKDError, match=r"--log tensorboard.*pip install tensorboard"):
        build_loggers(["tensorboard", "wandb"], tmp_path / "run", {}, enabled=True)  # explicit: not the default
    capsys.readouterr()
    # the default is skipped with one note
    assert build_loggers(["tensorboard"], tmp_path / "run", {}, enabled=True) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorboard is not installed" in err and "pip install tensorboard" in err
    assert build_loggers(["tensorboard"], tmp_path / "run", {}, enabled=False) == []
    assert capsys.readouterr().err == ""  # the note only on rank 0
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- W&B, offline


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    return home


def wandb_records(path):
    """The protobuf records of a run-<id>.wandb file: a 7-byte header, then LevelDB-log chunks
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def wandb_history(path):
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def wandb_history_of(paths):
    return len(paths) == 1 and wandb_history(paths[0])


def settled(probe, seconds: float = 20.0):
    """probe()'s first truthy value: wandb's service process writes the offline run file
    asynchronously, after finish() returns; polled, not timed (None after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = probe()
        except Exception:  # a file caught half-written: not settled yet
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_wandb_mode_never_prompts(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"  # no key anywhere
    (wandb_env / ".netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_mode() == "online"
    (wandb_env / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(FastKDError, match=r"--log wandb.*WANDB_MODE=online.*WANDB_MODE=offline"):
        wandb_mode()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"


def test_wandb_offline_run_writes_its_files_and_resumes_the_same_run(tmp_path, wandb_env):
    run = tmp_path / "run"
    start = time.perf_counter()
    sinks = build_loggers(["wandb"], run, {"run": {"seed": 3}, "model": {"students": list(NETS)}}, enabled=True)
    assert [s.name for s in sinks] == ["wandb"]
    with MetricsLog(run / "metrics.jsonl", enabled=True, sinks=sinks) as log:
        log.write(step_record(1, 2.5))
        log.write(step_record(2, 2.0))
        log.write(eval_record(2))
    seconds = time.perf_counter() - start
    assert seconds < 60, f"wandb offline init + finish took {seconds:.1f} s"
    run_id = (run / "wandb" / "fastkd-run-id").read_text().strip()
    pattern = str(run / "wandb" / f"offline-run-*-{run_id}*" / f"run-{run_id}.wandb")
    (path,) = settled(lambda: glob.glob(pattern) if wandb_history_of(glob.glob(pattern)) else None)
    records = wandb_records(path)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.run_id, info.project, info.display_name) == (run_id, "fastkd", "run")
    config = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert config["run"] == {"seed": 3} and config["model"] == {"students": list(NETS)}
    rows = {row["_step"]: row for row in wandb_history(path)}
    assert sorted(rows) == [1, 2]
    assert rows[1]["train/loss"] == 2.5 and rows[1]["train/lr"] == 0.125 and rows[1]["train/ce/mobilenet_v2"] == 1.75
    assert rows[2]["train/loss"] == 2.0 and rows[2]["train/top1/resnet18"] == 12.5  # step and eval share step 2
    assert rows[2]["val/teacher/top1"] == 80.0 and rows[2]["val/mobilenet_v2/ece"] == 0.0625
    assert rows[2]["val/teacher_w/mean"] == 0.375
    assert rows[2]["val/teacher_w/values"] == [1, 0, 3, 4] and rows[2]["val/teacher_w/bins"] == [0, 0.25, 0.5, 0.75, 1]
    assert "train/epoch" not in rows[1] and "train/samples" not in rows[1]
    # a resumed fastkd run continues the same W&B run
    with MetricsLog(run / "metrics.jsonl", enabled=True, sinks=build_loggers(["wandb"], run, {}, True)) as log:
        log.write(step_record(3, 1.5, epoch=1))
    assert (run / "wandb" / "fastkd-run-id").read_text().strip() == run_id
    resumed = settled(lambda: [p for p in glob.glob(pattern) if p != path and wandb_history(p)] or None)
    assert len(resumed) == 1 and resumed[0].endswith(f"run-{run_id}.wandb")
    assert [row["train/loss"] for row in wandb_history(resumed[0])] == [1.5]
