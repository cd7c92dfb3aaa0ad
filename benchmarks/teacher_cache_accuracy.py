"""Does a teacher cache cost accuracy? uadkd students with the live teacher vs a K-view cache,
same epochs and seeds, on the embedded digits demo.

    .venv/bin/python benchmarks/teacher_cache_accuracy.py --out benchmarks/scratch/cache_acc \
        --views 8 --seeds 0,1,2 --json benchmarks/results/teacher_cache_demo.json \
        --md benchmarks/results/teacher_cache_demo.md

Data and teacher come from the quickstart's steps 1-3 (`fastkd.quickstart.prepare`: demo folder,
pack, ResNet-18 teacher trained with `ce`; reused when OUT already holds them). The cache is built
once from that teacher at the students' resolution (`fastkd.cache_cmd.build_cache`, K views per
image). Then, per seed, the quickstart student config (fastkd/configs/quickstart.yaml: ResNet-18 +
MobileNetV2, uadkd, 48 px, 8 epochs) runs twice: with the live teacher and with
`--teacher-cache`, everything else equal. The table: final val top-1 of each student per mode, and
cache minus live per student (mean over seeds; the goal is within 1 point). 360 val images: one
image is 0.28 points, so single-seed gaps are mostly noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STUDENTS = ("resnet18", "mobilenet_v2")
COLUMNS = [("mode", "mode"), ("seeds", "seeds")] + [
    (f"{n}_{k}", f"{label} {k}") for n, label in (("resnet18", "ResNet-18"), ("mobilenet_v2", "MobileNetV2"))
    for k in ("top1", "top1_std")
] + [("wall_s", "wall s / run")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="benchmarks/scratch/cache_acc", help="work folder")
    parser.add_argument("--views", type=int, default=8, help="K views per image (default 8)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of run.seed values (default 0,1,2)")
    parser.add_argument("--json", default=None, help="write the result JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table here")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="`fastkd train` flags after --")
    return parser.parse_args(argv)


def mode_row(mode: str, reports: list[dict]) -> dict:
    """One schema row: value = the students' mean final val top-1 (%) over the seeds."""
    extras: dict = {"mode": mode, "seeds": len(reports), "wall_s": statistics.mean(r["wall_time_s"] for r in reports)}
    for name in STUDENTS:
        values = [r["networks"][name]["top1"] for r in reports]
        extras[f"{name}_top1"] = statistics.mean(values)
        extras[f"{name}_top1_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        extras[f"{name}_top1_runs"] = values
    value = statistics.mean(extras[f"{n}_top1"] for n in STUDENTS)
    return common.row(mode, unit="% top-1", value=value, **extras)


def main(argv: list[str] | None = None) -> int:
    from fastkd.cache_cmd import build_cache
    from fastkd.config import resolve_config
    from fastkd.quickstart import config_path, prepare, train_run

    args = parse_args(argv)
    out = Path(args.out)
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    seeds = common.parse_int_list(args.seeds)
    start = time.perf_counter()
    packed, teacher_report, weights = prepare(out, None, None, train_args=extra)
    student_cfg = resolve_config(config_path("quickstart"), {})
    cache_dir = out / f"cache-k{args.views}"
    t0 = time.perf_counter()
    manifest = build_cache(packed, student_cfg.model.teacher, str(weights), args.views, cache_dir,
                           resolution=student_cfg.data.resolution, seed=0, batch_size=256, device="cpu",
                           num_workers=1, progress=True)  # fmt: skip
    build_s = time.perf_counter() - t0
    reports: dict[str, list[dict]] = {"live teacher": [], f"cache K={args.views}": []}
    for seed in seeds:
        flags = ["--run.seed", str(seed), "--run.live", "false", "--log", "none"]
        reports["live teacher"].append(
            train_run("quickstart", packed, out / f"live-seed{seed}", None, None, flags + extra, teacher_weights=weights))
        reports[f"cache K={args.views}"].append(
            train_run("quickstart", packed, out / f"cache-seed{seed}", None, None,
                      flags + ["--teacher-cache", str(cache_dir)] + extra, teacher_weights=weights))  # fmt: skip
    rows = [mode_row(mode, r) for mode, r in reports.items()]
    live, cached = rows
    gaps = {n: cached[f"{n}_top1"] - live[f"{n}_top1"] for n in STUDENTS}
    machine = common.machine_info("cpu")
    t_name, t_net = next(iter(teacher_report["networks"].items()))
    notes = [
        f"Teacher: {t_name} trained with ce, val top-1 {t_net['top1']:.2f} %.",
        f"Cache: K = {args.views} views per train image at {student_cfg.data.resolution} px, built in {build_s:.0f} s "
        f"on this CPU, {manifest.get('bytes_per_image', 0):.0f} bytes per image.",
        "Students: ResNet-18 + MobileNetV2, uadkd, fastkd/configs/quickstart.yaml (48 px, 8 epochs), seeds "
        f"{', '.join(map(str, seeds))}; only --teacher-cache differs between the modes.",
        "Cache minus live, mean top-1 over the seeds: "
        + ", ".join(f"{n} {g:+.2f} points" for n, g in gaps.items())
        + f" (goal: within 1 point for both: {'met' if all(abs(g) <= 1.0 for g in gaps.values()) else 'not met'}).",
        f"Digits demo: 1437 train / 360 val images (1 image = 0.28 points); total wall time "
        f"{time.perf_counter() - start:.0f} s on {machine.get('cpu', 'this machine')}.",
    ]
    common.print_table(rows, COLUMNS, title="uadkd students: live teacher vs teacher cache (digits demo)")
    for note in notes:
        print(note)
    common.write_result(args.json, "teacher_cache_accuracy", rows, machine=machine,
                        params={"views": args.views, "seeds": seeds, "train_args": extra, "out": str(out)},
                        headline=[common.head(f"cache - live {n} top-1", g, "points") for n, g in gaps.items()],
                        notes=notes)  # fmt: skip
    if args.md:
        md = ("# uadkd students: live teacher vs teacher cache (digits demo)\n\n" + common.markdown_table(rows, COLUMNS)
              + "\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\nCommand: `{common.command_line()}`\n")
        common.write_text_atomic(Path(args.md), md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
