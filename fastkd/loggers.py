"""TensorBoard and Weights & Biases mirrors of metrics.jsonl (sinks of fastkd.metrics.MetricsLog).

    sinks = build_loggers(cfg.run.log, run_dir, config_to_dict(cfg), enabled=is_main)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main, sinks=sinks)

metrics.jsonl stays the record of truth: a sink only turns the records MetricsLog writes into
its own format, and one that fails is dropped by MetricsLog (reported once), never stopping a run.
Both sinks log the same keys, x axis = the record's global "step":

- step records: train/loss, train/lr, train/images_per_s, train/w_mean, train/<part>/<network>
  for the {network: value} loss parts (ce, kd, peer, ...), train/top1/<network> (train_top1);
  any other number is train/<key>, a list train/<key>/<i>; bookkeeping (epoch, step, time,
  world_size, samples, samples_seen) is not drawn.
- eval records: val/<network>/{top1, top5, ece, loss} for every student and the teacher,
  val/teacher_w/mean, and the histogram val/teacher_w of the teacher confidence weight w(x)
  (from the record's hist/edges: bucket i = [edges[i], edges[i+1])).
- "resume" and unknown kinds are not drawn (TensorBoard uses "resume" to purge, see below).

Files: TensorBoard events in RUN/tensorboard/; W&B in RUN/wandb/ (wandb's own layout) with the W&B
run id in RUN/wandb/fastkd-run-id, so a resumed fastkd run continues the same W&B run. W&B's
mode is WANDB_MODE when set, else "online" when an API key is found (WANDB_API_KEY,
WANDB_IDENTITY_TOKEN_FILE or ~/.netrc) and "offline" otherwise; fastkd never makes wandb prompt.
Project: WANDB_PROJECT, default "fastkd"; run name: the run dir's name.
"""

from __future__ import annotations

import importlib
import json
import netrc
import os
import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastkd.atomic import atomic_write_bytes
from fastkd.errors import FastKDError
from fastkd.metrics import Sink, eval_networks, teacher_w_of
from fastkd.notes import say

LOGGERS = ("tensorboard", "wandb")
DEFAULT_LOGGERS = ["tensorboard"]  # RunConfig.log's default: skipped with a note without the package
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> pip package
TB_DIR = "tensorboard"  # RUN/tensorboard/ (fastkd.run_dir.RUN_FILES removes it on --overwrite)
WANDB_DIR = "wandb"  # RUN/wandb/, made by wandb.init(dir=RUN)
WANDB_ID_FILE = "fastkd-run-id"  # RUN/wandb/fastkd-run-id: the W&B run id a resume continues

# not drawn: bookkeeping of step records
STEP_META = ("kind", "epoch", "step", "time", "world_size", "samples", "samples_seen")
# step record key -> tag prefix where it differs from train/<key>
STEP_RENAME = {"train_top1": "top1"}


def logger_names(names: str | Sequence[str] | None) -> list[str]:
    """run.log (a list, or a comma-separated string) -> the loggers to build, in order, without
    repeats; "none" or [] -> []. Unknown names are a FastKDError naming --log."""
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    wanted = [str(n).strip().lower() for n in names if str(n).strip()]
    if wanted == ["none"]:
        return []
    bad = [n for n in wanted if n not in LOGGERS]
    if bad:
        raise FastKDError(
            f"--log (run.log): unknown logger {', '.join(map(repr, bad))}; choose from "
            f"{', '.join(LOGGERS)}, or none (metrics.jsonl only)"
        )
    return list(dict.fromkeys(wanted))


def build_loggers(names: str | Sequence[str] | None, run_dir: str | os.PathLike, config: Mapping[str, Any],
                  enabled: bool) -> list[Sink]:  # fmt: skip
    """The sinks of run.log for MetricsLog; [] where `enabled` is False (ranks other than 0).

    Every rank checks the names and that the packages import, so all ranks fail alike: a logger
    asked for explicitly whose package is missing is a FastKDError naming --log and the pip
    install; the default (["tensorboard"]) is skipped with one note instead. A sink that fails
    to start (wandb.init raising) is reported and skipped: the run goes on with metrics.jsonl.
    """
    wanted = logger_names(names)
    soft = wanted == DEFAULT_LOGGERS
    usable = []
    for name in wanted:
        try:
            _import_package(name)
        except ImportError:
            if not soft:
                raise FastKDError(
                    f"--log {name}: the {PACKAGES[name]} package is not installed; "
                    f"pip install {PACKAGES[name]} (or drop {name} from --log / run.log)"
                ) from None
            if enabled:
                say(f"fastkd: {name} is not installed: no {name} logs (pip install {PACKAGES[name]}; "
                    f"--log none silences this); metrics.jsonl has every record")  # fmt: skip
            continue
        usable.append(name)
    if not enabled:
        return []
    run_dir = Path(run_dir)
    sinks: list[Sink] = []
    for name in usable:
        try:
            sinks.append(TensorBoardSink(run_dir, config) if name == "tensorboard" else WandbSink(run_dir, config))
        except FastKDError:
            for sink in sinks:
                sink.close()
            raise
        except Exception as e:  # a logger must not stop the run
            say(f"fastkd: the {name} logger did not start ({type(e).__name__}: {e}); the run goes on without it")
    return sinks


def _import_package(name: str) -> None:
    """Raises ImportError where the logger's package is missing (tests set sys.modules[pkg] = None)."""
    importlib.import_module(PACKAGES[name])
    if name == "tensorboard":
        importlib.import_module("torch.utils.tensorboard")


# ---------------------------------------------------------------- records -> scalars, histograms


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """{tag: value} drawn from one metrics.jsonl record (see the module docstring); {} for kinds
    that are not drawn. Values that are not numbers (None, strings) are left out."""
    out: dict[str, float] = {}
    kind = record.get("kind")
    if kind == "step":
        for key, value in record.items():
            if key in STEP_META:
                continue
            prefix = f"train/{STEP_RENAME.get(key, key)}"
            if isinstance(value, Mapping):
                items = value.items()
            elif isinstance(value, (list, tuple)):
                items = enumerate(value)
            else:
                items = [(None, value)]
            for sub, v in items:
                if (x := _number(v)) is not None:
                    out[prefix if sub is None else f"{prefix}/{sub}"] = x
    elif kind == "eval":
        for network, metrics in eval_networks(record).items():
            for key, v in metrics.items():
                if (x := _number(v)) is not None:
                    out[f"val/{network}/{key}"] = x
        w = teacher_w_of(record)
        if w is not None and (x := _number(w.get("mean"))) is not None:
            out["val/teacher_w/mean"] = x
    return out


def teacher_w_histogram(record: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """(counts[B], edges[B+1]) of an eval record's teacher_w, or None (no teacher, empty, bad)."""
    if record.get("kind") != "eval" or (w := teacher_w_of(record)) is None:
        return None
    counts, edges = list(w.get("hist") or []), list(w.get("edges") or [])
    if not counts or len(edges) != len(counts) + 1 or sum(counts) <= 0:
        return None
    return [float(c) for c in counts], [float(e) for e in edges]


# ---------------------------------------------------------------- TensorBoard


class TensorBoardSink:
    """Event files in RUN/tensorboard/ via torch.utils.tensorboard.SummaryWriter.

    The writer opens at the first record. In a resumed run (event files already there) it opens
    with purge_step = the first step about to be written again ("resume" record step + 1, else the
    first record's step), so TensorBoard drops the events logged past the checkpoint before the
    kill, as truncate_metrics does for metrics.jsonl.
    """

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: Mapping[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.log_dir = Path(run_dir) / TB_DIR
        self._resumed = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        self._config = dict(config or {})
        self._writer = None

    def _open(self, purge_step: int | None):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = self._writer_cls(str(self.log_dir), purge_step=purge_step if self._resumed else None)
        if self._config and not self._resumed:
            text = json.dumps(self._config, indent=2, default=str)
            self._writer.add_text("config", "    " + text.replace("\n", "\n    "), global_step=0)
        return self._writer

    def write(self, record: Mapping[str, Any]) -> None:
        kind, step = record.get("kind"), record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        if kind == "resume":
            if self._writer is None:
                self._open(step + 1)
            return
        if kind not in ("step", "eval"):
            return
        writer = self._writer or self._open(step)
        wall = _number(record.get("time"))
        for tag, value in scalars_of(record).items():
            writer.add_scalar(tag, value, global_step=step, walltime=wall)
        hist = teacher_w_histogram(record)
        if hist is not None:
            counts, edges = hist
            centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
            # TensorBoard's buckets: bucket_limits[i] = right edge of bucket i, min = left edge of
            # the first; sum and sum_squares are estimated from the bucket centres
            writer.add_histogram_raw(
                "val/teacher_w", min=edges[0], max=edges[-1], num=sum(counts),
                sum=sum(c * x for c, x in zip(counts, centers)),
                sum_squares=sum(c * x * x for c, x in zip(counts, centers)),
                bucket_limits=edges[1:], bucket_counts=counts, global_step=step, walltime=wall,
            )  # fmt: skip
        writer.flush()  # one write per logged window or eval: cheap, and a kill loses nothing

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------- Weights & Biases


def wandb_api_key_found() -> bool:
    """Whether wandb would find credentials without asking: WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, or a .netrc entry for WANDB_BASE_URL's host (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set, else online with credentials and offline without; an online mode
    without credentials is a FastKDError (wandb would prompt for a login)."""
    mode = (os.environ.get("WANDB_MODE") or "").strip().lower()
    if not mode:
        return "online" if wandb_api_key_found() else "offline"
    if mode in ("online", "run") and not wandb_api_key_found():
        raise FastKDError(
            f"--log wandb: WANDB_MODE={mode} but no W&B API key was found; run `wandb login`, set "
            "WANDB_API_KEY, or set WANDB_MODE=offline (then `wandb sync RUN/wandb/offline-run-*`)"
        )
    return mode


class WandbSink:
    """A W&B run in RUN/wandb/ logging the same keys as TensorBoardSink; the run id is kept in
    RUN/wandb/fastkd-run-id so a resumed fastkd run continues the same W&B run (resume="allow";
    W&B drops steps it already has, the ones past the checkpoint)."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: Mapping[str, Any] | None = None):
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        mode = wandb_mode()
        id_file = run_dir / WANDB_DIR / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            atomic_write_bytes(id_file, run_id.encode())  # makes RUN/wandb/
        self.run_id = run_id
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "fastkd", name=run_dir.name, dir=str(run_dir),
            id=run_id, resume="allow", mode=mode, config=dict(config or {}),
            # console="off": the rich live display owns the terminal; no system-stats thread
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )  # fmt: skip

    def write(self, record: Mapping[str, Any]) -> None:
        step = record.get("step")
        if record.get("kind") not in ("step", "eval") or not isinstance(step, int) or isinstance(step, bool):
            return
        data: dict[str, Any] = dict(scalars_of(record))
        hist = teacher_w_histogram(record)
        if hist is not None:
            data["val/teacher_w"] = self._wandb.Histogram(np_histogram=hist)
        if data:
            self.run.log(data, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
