"""The six methods of the paper's table on the embedded digits demo, one comparison table.

    .venv/bin/python benchmarks/methods_table.py --out runs/methods \
        --json benchmarks/results/methods_demo.json --md benchmarks/results/methods_demo.md

Data and teacher come from the quickstart's steps 1-3 (`fastkd.quickstart.prepare`: demo folder,
pack, ResNet-18 teacher trained with `ce`; reused when OUT already holds them). Then, with the
quickstart student config (fastkd/configs/quickstart.yaml: ResNet-18 + MobileNetV2, 48 px) and
only `--method` changed, one `fastkd train` run per method into OUT/<method>/:

    ce    cross-entropy only, no teacher          dml   students teach each other, no teacher
    kd    teacher KD per student (w = 1)          dual  teacher KD (w = 1) + peer term
    uakd  teacher KD weighted by w(x)             uadkd teacher KD weighted by w(x) + peer term

The table: final val top-1/top-5 and ECE of each student, the teacher's top-1, wall time.
This is a small-data sanity table (one seed by default, 360 val images: 1 image = 0.28 points),
not the paper's ImageNet-100 claim; --seeds 0,1,2 averages seeds. Extra `fastkd train` flags for
every run follow `--` (e.g. `-- --epochs 4`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fastkd.losses import METHODS, TEACHER_METHODS  # noqa: E402  (the one method table)
COLUMNS = [
    ("method", "method"),
    ("teacher", "teacher"),
    ("peer", "peer"),
    ("w", "w(x)"),
    ("resnet18_top1", "ResNet-18 top-1"),
    ("mobilenet_v2_top1", "MobileNetV2 top-1"),
    ("resnet18_top5", "ResNet-18 top-5"),
    ("mobilenet_v2_top5", "MobileNetV2 top-5"),
    ("resnet18_ece", "ResNet-18 ECE %"),
    ("mobilenet_v2_ece", "MobileNetV2 ECE %"),
    ("seeds", "seeds"),
    ("wall_s", "wall s"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="runs/methods", help="work folder (default runs/methods)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all six)")
    parser.add_argument("--seeds", default="0", help="comma list of run.seed values (default 0)")
    parser.add_argument("--backend", default=None, help="loader backend (default: the quickstart configs')")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: config)")
    parser.add_argument("--json", default=None, help="write the result JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table here")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="`fastkd train` flags after --")
    return parser.parse_args(argv)


def row_for(method: str, reports: list[dict]) -> dict:
    """One schema row (benchmarks/common.py) from the final reports of `method`'s runs (one per
    seed): value = the students' mean val top-1 (%), per-student top-1/top-5/ECE as extras."""
    teacher, peer, weighted = METHODS[method]  # the terms the method turns on
    row = {
        "method": method,
        "teacher": "yes" if teacher else "-",
        "peer": "yes" if peer else "-",
        "w": "yes" if weighted else "-",
        "seeds": len(reports),
        "wall_s": statistics.mean(r["wall_time_s"] for r in reports),
    }
    for name in reports[0]["networks"]:
        for key in ("top1", "top5", "ece"):
            values = [r["networks"][name].get(key) for r in reports]
            if any(v is None for v in values):
                continue
            scale = 100.0 if key == "ece" else 1.0
            row[f"{name}_{key}"] = scale * statistics.mean(values)
            if len(values) > 1:
                row[f"{name}_{key}_std"] = scale * statistics.stdev(values)
    top1 = [row[f"{name}_top1"] for name in reports[0]["networks"] if f"{name}_top1" in row]
    value = statistics.mean(top1) if top1 else None
    return common.row(method, unit="% top-1", value=value, status="ok" if top1 else "failed",
                      **({} if top1 else {"error": "no top-1 in the run reports"}), **row)


def result(rows: list[dict], *, machine: dict, params: dict, notes: list[str], path=None) -> dict:
    """The schema payload of the table (written to `path` when given)."""
    return common.write_result(
        path, "methods_table", rows, machine=machine, params=params,
        headline=[common.head(f"{r['method']} {n} top-1", r[f"{n}_top1"], "%")
                  for r in rows for n in ("resnet18", "mobilenet_v2") if r.get(f"{n}_top1") is not None],
        notes=notes,
    )


def main(argv: list[str] | None = None) -> int:
    from fastkd.quickstart import prepare, train_run

    args = parse_args(argv)
    out = Path(args.out)
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"methods_table: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    seeds = common.parse_int_list(args.seeds)

    start = time.perf_counter()
    packed, teacher_report, weights = prepare(out, args.backend, args.teacher_epochs, train_args=extra)
    rows = []
    for method in methods:
        reports = []
        for seed in seeds:
            run_dir = out / (method if len(seeds) == 1 else f"{method}-seed{seed}")
            flags = ["--method", method, "--run.seed", str(seed), "--run.live", "false"]
            teacher = weights if method in TEACHER_METHODS else "null"
            reports.append(train_run("quickstart", packed, run_dir, args.backend, None, flags + extra,
                                     teacher_weights=teacher))
        rows.append(row_for(method, reports))
        common.print_table(rows, COLUMNS, title="fastkd methods on the digits demo (so far)")
        (out / "methods.partial.md").write_text(common.markdown_table(rows, COLUMNS) + "\n")

    t_name, t_net = next(iter(teacher_report["networks"].items()))
    teacher_line = (f"Teacher: {t_name} trained with ce, val top-1 {t_net['top1']:.2f} %, "
                    f"top-5 {t_net['top5']:.2f} % ({out / 'teacher'}).")
    machine = common.machine_info("cpu" if "cpu" in str(teacher_report.get("device", "cpu")) else "cuda")
    notes = [
        teacher_line,
        "Students: ResNet-18 + MobileNetV2 from fastkd/configs/quickstart.yaml (48 px, 8 epochs), only --method changed.",
        "Digits demo: 1437 train / 360 val images, 10 classes; a small-data sanity table, not the "
        "paper's ImageNet-100 claim.",
        f"Total wall time {time.perf_counter() - start:.0f} s on {machine.get('cpu', 'this machine')}.",
    ]
    table = common.markdown_table(rows, COLUMNS)
    md = "# fastkd methods on the digits demo\n\n" + table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    md += f"\nCommand: `{common.command_line()}`\n"
    print()
    common.print_table(rows, COLUMNS, title="fastkd methods on the digits demo")
    for note in notes:
        print(note)
    payload = result(rows, machine=machine, notes=notes, path=args.json,
                     params={"methods": methods, "seeds": seeds, "train_args": extra, "out": str(out),
                             "teacher": {"arch": t_name, "top1": t_net["top1"], "top5": t_net["top5"]}})
    (out / "methods.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "methods.md").write_text(md)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)
    print(f"wrote {out / 'methods.md'} and {out / 'methods.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
