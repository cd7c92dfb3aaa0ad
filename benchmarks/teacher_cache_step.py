"""The training step with a teacher cache against the step with the live teacher, same run.

    # CPU (tiny shapes, seconds):
    python benchmarks/teacher_cache_step.py --threads 1 --json cache_step.json
    # GPU (160 px, batch 256, bf16 channels_last, fused loss):
    python benchmarks/teacher_cache_step.py --device cuda --json cache_step.json

One step object (`fastkd.step.build_step`, the trainer's own: teacher ResNet-50, students
ResNet-18 + MobileNetV2, method uadkd, 100 classes by default) is timed two ways, in alternating
windows so both see the same machine state:

    live_teacher    parts = step(images, labels)                  the teacher runs (eval,
                                                                  inference_mode), as today
    teacher_cache   t = feed.teacher_logits(epoch, indices)       the cache read: fp16 rows of a
                    parts = step(images, labels, teacher_logits=t)  memory-mapped [N, K, C]
                                                                  array, pinned, to the device
                                                                  as fp32; the teacher not run

then `step.meter.add(parts, B)` as the trainer does. The cache is a synthetic one (random fp16
logits, `--images` x `--views` x classes, written with the builder's own CacheWriter into a
temporary folder and opened with TeacherCache.open): the step's cost does not depend on the
values, and the read is the real one (new random indices every step, views from view_of).
Images and labels are made once on the device, so no loader is timed: this is the compute
saved by not running the teacher. Rows follow benchmarks/common.py's schema (name = mode, case =
"<res>px b<batch>", value = images/s, teacher_cache's baseline = live_teacher, ratio = speed-up);
a `cache_read` row gives the read alone in ms per batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastkd.cache_writer import CacheWriter  # noqa: E402
from fastkd.cacheformat import storage_for  # noqa: E402
from fastkd.config import resolve_config  # noqa: E402
from fastkd.runtime import AMP_MODES, COMPILE_MODES, amp_dtype  # noqa: E402
from fastkd.step import build_step  # noqa: E402
from fastkd.teacher_cache import CacheFeed, TeacherCache  # noqa: E402


def synthetic_cache(root: Path, images: int, views: int, num_classes: int, resolution: int, seed: int) -> TeacherCache:
    """A cache of random logits in the real format (what `fastkd teacher-cache` writes)."""
    rng = np.random.default_rng(seed)
    storage = storage_for(num_classes)
    writer = CacheWriter(root, images, views, num_classes, storage, resume=False)
    for start in range(0, images, 4096):
        b = min(4096, images - start)
        logits = torch.from_numpy(rng.normal(0, 3, size=(b, views, num_classes)).astype(np.float32))
        boxes = np.tile(np.array([0, 0, resolution, resolution], np.int32), (b, views, 1))
        writer.write(start, logits, boxes, np.zeros((b, views), bool), rng.random((b, views)),
                     np.full((b, 2), resolution, np.int32))
    info = {"teacher": {"arch": "synthetic", "weights": None, "sha256": None},
            "pack": {"dir": None, "manifest_sha256": "synthetic", "count": images},
            "classes": [f"n{i:08d}" for i in range(num_classes)], "views": views, "seed": seed,
            "resolution": resolution, "amp": "synthetic", "entropy_temperature": 1.0}
    writer.flush()
    digests = [writer.chunk_digest(start, min(images, start + 4096)) for start in range(0, images, 4096)]
    writer.finish(info, 4096, digests)  # one chunk per write above
    return TeacherCache.open(root)


def run(args) -> dict:
    device = common.pick_device(args.device)
    on_gpu = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    res = args.res or (160 if on_gpu else 32)
    batch = args.batch or (256 if on_gpu else 8)
    amp = args.amp if args.amp != "auto" else ("bf16" if on_gpu else "fp32")
    cfg = resolve_config(None, {"model.teacher": args.teacher, "model.students": args.students,
                                "loss.method": args.method, "loss.fused": "true", "precision.amp": amp,
                                "precision.channels_last": "true", "compile.mode": args.compile_mode})
    machine = common.machine_info(device)
    case = f"{res}px b{batch}"
    print(f"teacher_cache_step: {machine.get('gpu') or machine['cpu']} | device {device} | {case} | "
          f"teacher {args.teacher} | students {args.students} | {args.method} | amp {amp}", flush=True)
    torch.manual_seed(args.seed)
    dev = torch.device(device)
    step = build_step(cfg, args.num_classes, dev, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 3, res, res, generator=gen).to(dev, amp_dtype(amp, dev) or torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (batch,), generator=gen).to(dev)
    images = max(args.images or (20 * batch), batch)
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory(prefix="fastkd-cache-bench-") as tmp:
        t0 = time.perf_counter()
        cache = synthetic_cache(Path(tmp), images, args.views, args.num_classes, res, args.seed)
        made_s = time.perf_counter() - t0
        feed = CacheFeed(cache, dev)
        state = {"epoch": 0}

        def live() -> None:
            step.meter.add(step(x, y), batch)

        def cached() -> None:
            idx = torch.from_numpy(rng.choice(images, size=batch, replace=False))
            state["epoch"] += 1
            t = feed.teacher_logits(state["epoch"], idx)
            step.meter.add(step(x, y, teacher_logits=t), batch)

        def read() -> None:
            feed.teacher_logits(0, torch.from_numpy(rng.choice(images, size=batch, replace=False)))

        fns = {"live_teacher": live, "teacher_cache": cached}
        for fn in fns.values():  # warm-up, untimed (allocator, cuDNN autotuning, compiling and
            for _ in range(max(args.warmup, 3 if step.compiled else 0)):  # recording each graph)
                fn()
        step.meter.read()
        windows = {name: [] for name in fns}
        for _ in range(args.windows):  # alternating windows: both modes see the same machine
            for name, fn in fns.items():
                windows[name] += common.time_windows(fn, device, warmup=0, windows=1, steps=args.steps)
        loss = step.meter.read()["loss"]
        read_windows = common.time_windows(read, device, warmup=2, windows=args.windows, steps=args.steps)

    rows = []
    for name, secs in windows.items():
        step_s = common.median(secs) / args.steps
        rows.append(common.row(name, case=case, unit="img/s", value=batch / step_s,
                               baseline=None if name == "live_teacher" else "live_teacher",
                               step_ms=step_s * 1e3, spread=common.spread(secs),
                               windows_s=[round(s, 6) for s in secs]))
    read_ms = common.median(read_windows) / args.steps * 1e3
    rows.append(common.row("cache_read", case=case, unit="ms", value=read_ms, step_ms=read_ms,
                           spread=common.spread(read_windows)))
    common.fill_ratios(rows)
    speedup = rows[1]["ratio"]
    columns = [("name", "mode"), ("case", "shape"), ("value", "img/s | ms"), ("step_ms", "ms/step"),
               ("ratio", "x live"), ("spread", "spread")]
    common.print_table(rows, columns, title=f"step with teacher cache vs live teacher, "
                                            f"{machine.get('gpu') or machine['cpu']}")
    print(f"teacher_cache / live_teacher: {speedup:.2f}x images/s")
    notes = [f"synthetic cache {images} images x {args.views} views x {args.num_classes} classes "
             f"({cache.bytes_per_image:,.0f} B/image) written in {made_s:.1f} s",
             f"mean loss over the timed steps {loss:.3f} (sanity)"]
    params = dict(device=device, res=res, batch=batch, teacher=args.teacher, students=args.students.split(","),
                  method=args.method, amp=amp, compile_mode=args.compile_mode, compiled=step.compiled, num_classes=args.num_classes,
                  views=args.views, images=images, steps=args.steps, windows=args.windows, warmup=args.warmup,
                  threads=torch.get_num_threads())
    headline = [common.head(f"step with teacher cache {case}", rows[1]["value"], "img/s", speedup)]
    goal = common.goal(f"teacher cache >= 1.4x the live teacher, compile.mode {args.compile_mode}",
                       f"{speedup:.2f}x at {case}", speedup >= 1.4, machine)
    return common.write_result(args.json, "teacher_cache_step", rows, machine=machine, params=params,
                               headline=headline, goals=[goal], notes=notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    p.add_argument("--res", type=int, default=None, help="resolution (default: 32 on CPU, 160 on GPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 8 on CPU, 256 on GPU)")
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--students", default="resnet18,mobilenet_v2", help="comma list, 1 or 2")
    p.add_argument("--method", default="uadkd", help="a loss method with a teacher: kd uakd dual uadkd")
    p.add_argument("--amp", default="auto", choices=AMP_MODES,
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                   help="the step's compile.mode (auto: the trainer's default, CUDA graphs on one GPU)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--views", type=int, default=8, help="views per image of the synthetic cache")
    p.add_argument("--images", type=int, default=0, help="images in the synthetic cache (default 20 x batch)")
    p.add_argument("--steps", type=int, default=4, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows per mode (alternating); median")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the result JSON here")
    return p


main = common.cli_main(build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
