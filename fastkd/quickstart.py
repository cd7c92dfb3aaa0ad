"""The whole pipeline on the embedded digits demo, in minutes on a laptop CPU:

    fastkd quickstart                           # everything under runs/quickstart/
    fastkd quickstart --out /tmp/qs --backend ffcv

1. `fastkd demo-data OUT/demo`                     scikit-learn's 1797 digits as an ImageNet-style folder
2. `fastkd pack OUT/demo OUT/packed --classes all`  FFCV + DALI formats, one manifest
3. `fastkd train --config quickstart_teacher.yaml`  a ResNet-18 teacher, plain cross-entropy -> OUT/teacher
4. `fastkd train --config quickstart.yaml`          ResNet-18 + MobileNetV2 students with uadkd from that
                                                    teacher -> OUT/students (report.md, plots/)

Then one report table (teacher, both students, compression, top-1/top-5; the training runs print
none of their own, `--run.summary false`) and the run directory.
Goal on a 2-core CPU: under 5 minutes, both students >= 90 % val top-1.

Re-running with the same OUT reuses every finished step (a step is finished when its output
is complete: manifest.json, report.json) and resumes an interrupted training run; --fresh
starts again. The configs are fastkd/configs/quickstart_teacher.yaml and quickstart.yaml; any
`fastkd train` flag for both training runs can follow `--`, e.g. `-- --run.device cpu`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib import resources
from pathlib import Path

from fastkd.data.spec import AUTO, BACKENDS
from fastkd.errors import FastKDError
from fastkd.notes import say, show
from fastkd.run_layout import RunLayout

STEPS = ("demo", "packed", "teacher", "students")


def config_path(name: str) -> Path:
    """A shipped config file: fastkd/configs/<name>.yaml."""
    path = Path(str(resources.files("fastkd") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise FastKDError(f"shipped config {path} is missing (reinstall fastkd)")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", metavar="DIR",
                        help="folder for demo/, packed/, teacher/, students/ (default runs/quickstart)")
    parser.add_argument("--backend", default=None, choices=(*BACKENDS, AUTO),
                        help="loader backend for both training runs (default: the configs' choice)")
    parser.add_argument("--teacher-epochs", type=int, default=None, metavar="N",
                        help="teacher epochs (default: quickstart_teacher.yaml)")
    parser.add_argument("--epochs", type=int, default=None, metavar="N",
                        help="student epochs (default: quickstart.yaml)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete OUT's demo/, packed/, teacher/, students/ first and redo every step")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN FLAGS",
                        help="extra `fastkd train` flags for both training runs, after `--`")


def _cli(argv: list[str], what: str) -> None:
    from fastkd.cli import main

    say(f"\n[quickstart] {what}: fastkd {' '.join(argv)}", err=False)
    rc = main(argv)
    if rc != 0:
        raise FastKDError(f"{what} failed (fastkd {argv[0]} exit status {rc}); see the messages above")


def train_argv(config: str, data: Path, out: Path, backend: str | None, epochs: int | None,
               extra: list[str], teacher_weights: Path | str | None = None) -> list[str]:
    """The `fastkd train` argv of one quickstart run into `out`.

    --resume auto: an interrupted quickstart continues where it stopped. --overwrite where `out`
    has no checkpoints/last.pt: a run killed before its first checkpoint has nothing to continue,
    and `out` is the quickstart's own folder. --run.summary false: the quickstart prints one
    table of its own (teacher + students) at the end instead of one per training run. `extra`
    (the user's flags after `--`) comes last, so it can override any of these."""
    argv = ["train", "--config", str(config_path(config)), "--data", str(data), "--out", str(out),
            "--resume", "auto", "--run.summary", "false"]
    if not RunLayout(out).last.is_file():
        argv.append("--overwrite")
    if backend:
        argv += ["--backend", backend]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    if teacher_weights is not None:
        argv += ["--teacher-weights", str(teacher_weights)]
    return argv + list(extra)


def train_run(config: str, data: Path, out: Path, backend: str | None, epochs: int | None,
              extra: list[str], teacher_weights: Path | str | None = None) -> dict:
    """One `fastkd train` run into `out` unless its report.json already exists; returns the report."""
    report = RunLayout(out).report_json
    if report.is_file():
        say(f"\n[quickstart] reusing {out} (report.json present; --fresh to retrain)", err=False)
    else:
        _cli(train_argv(config, data, out, backend, epochs, extra, teacher_weights), f"train {out.name}")
    try:
        return json.loads(report.read_text())
    except (OSError, ValueError) as error:
        raise FastKDError(f"{report}: cannot read the run report ({error})") from None


def teacher_checkpoint(run: Path, report: dict) -> Path:
    """The teacher run's best checkpoint of its (single) network: a plain state_dict."""
    names = list(report.get("networks", {}))
    if len(names) != 1:
        raise FastKDError(f"{run}/report.json: expected one teacher network, found {names}")
    path = RunLayout(run).best(names[0])
    if not path.is_file():
        raise FastKDError(f"teacher checkpoint {path} is missing; rerun with --fresh")
    return path


def prepare(out: str | Path, backend: str | None = None, teacher_epochs: int | None = None,
            fresh: bool = False, train_args: list[str] | None = None) -> tuple[Path, dict, Path]:
    """Steps 1-3: demo folder, pack, teacher. Returns (packed dir, teacher report, teacher
    checkpoint). Finished steps are reused; `fresh` deletes OUT's step folders first."""
    out = Path(out)
    extra = _extra(train_args)
    if fresh:
        for step in STEPS:
            shutil.rmtree(out / step, ignore_errors=True)
    demo, packed = out / "demo", out / "packed"
    if (packed / "manifest.json").is_file():
        say(f"[quickstart] reusing {packed} (manifest.json present)", err=False)
    else:
        if not (demo / "train").is_dir() or not (demo / "val").is_dir():
            _cli(["demo-data", str(demo), "--overwrite"], "demo data")
        _cli(["pack", str(demo), str(packed), "--classes", "all", "--max-side", "64", "--overwrite"], "pack")
    teacher_report = train_run("quickstart_teacher", packed, out / "teacher", backend, teacher_epochs, extra)
    return packed, teacher_report, teacher_checkpoint(out / "teacher", teacher_report)


def run_quickstart(out: str | Path, backend: str | None = None, teacher_epochs: int | None = None,
                   epochs: int | None = None, fresh: bool = False, train_args: list[str] | None = None,
                   ) -> dict:
    """Demo data -> pack -> teacher (ce) -> two students (uadkd). Returns the students' report
    with "teacher_report" (the teacher run's report) and "pipeline_wall_time_s" (all steps)."""
    start = time.perf_counter()
    out = Path(out)
    packed, teacher_report, weights = prepare(out, backend, teacher_epochs, fresh, train_args)
    report = train_run("quickstart", packed, out / "students", backend, epochs, _extra(train_args),
                       teacher_weights=weights)
    report["teacher_report"] = teacher_report
    report["pipeline_wall_time_s"] = time.perf_counter() - start
    return report


def _extra(train_args: list[str] | None) -> list[str]:
    extra = list(train_args or [])
    return extra[1:] if extra[:1] == ["--"] else extra


def run(args: argparse.Namespace) -> int:
    from fastkd.live import format_duration
    from fastkd.report import summary_table

    report = run_quickstart(args.out, args.backend, args.teacher_epochs, args.epochs, args.fresh,
                            args.train_args)
    teacher_run = report["teacher_report"]
    t_name, t_net = next(iter(teacher_run["networks"].items()))
    show("")
    show(summary_table(report))
    # plain lines: paths stay on one line (copy-pasteable), whatever the terminal width
    show(
        f"teacher {t_name} trained with ce: val top-1 {t_net.get('top1') or float('nan'):.2f} % in "
        f"{format_duration(teacher_run.get('wall_time_s'))}; students ({report['method']}) in "
        f"{format_duration(report.get('wall_time_s'))}; whole quickstart "
        f"{format_duration(report['pipeline_wall_time_s'])}"
    )
    out = Path(args.out)
    show(f"run directory: {out / 'students'} (report.md, plots/, checkpoints/)")
    show(f"teacher run: {out / 'teacher'}")
    return 0
