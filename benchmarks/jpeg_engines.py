"""Which GPU JPEG decode paths run on the hardware JPEG engines (A100/H100/H200 NVJPG), measured.

    python benchmarks/jpeg_engines.py --json engines.json             # on a GPU machine
    python benchmarks/jpeg_engines.py --seconds 6 --images 256 --size 400

Paths (row names are the decode paths of loader_throughput.py and decode_table.py):
    torch           torchvision.io.decode_jpeg(list of tensors, device="cuda"): the torch
                    backend's batched nvJPEG decode; whether nvJPEG picks its hardware backend
                    for it is the open question this measures
    nvimgcodec-gpu  nvImageCodec's CUDA decoder alone (GPU_ONLY backend): nvJPEG on the SMs
    nvimgcodec      nvImageCodec's hardware decoder alone (HW_GPU_ONLY, load 1.0), made by
                    fastkd.data.nvimgcodec_loader's own helpers; run only when that loader's
                    probe says the engines decode
Each path decodes the same batch of --images synthetic photo-like JPEGs (benchmarks/common.py,
longer side 0.75-1 x --size, quality 90, 4:2:0) over and over, whole images, RGB, for at least
--seconds, while `nvidia-smi dmon -s u -d 1 -c N` samples the GPU's utilisation in a subprocess;
the loop runs until dmon has taken its N samples, so every sample falls inside the decoding. The
dmon header names the columns: `jpg` (the JPEG engines, on drivers that report them) and `sm`.
Paths run in that order, torch first, with a pause between them, so no engine work of an earlier
path can show in torch's first sample.

Rows (benchmarks/common.py's schema): unit img/s (decoded images / wall seconds of the loop,
the GPU synchronised at its end), baseline torch; extras: engines ("yes": the JPEG column read
above 0 while decoding; "no": it stayed at 0; "unknown": no JPEG column, no sample, or dmon
missing), jpg_util_max / jpg_util_mean / sm_util_max (%), jpg_samples / sm_samples (each
sample), samples, failed_images (images the decoder returned None for), dmon_error. Without
CUDA, or without nvImageCodec / the engines, a path is recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PATHS = ("torch", "nvimgcodec-gpu", "nvimgcodec")  # torch first: nothing ran on the engines before it
JPEG_COLUMNS = ("jpg", "nvjpg", "jpeg")  # dmon's name for the JPEG engines' column ("jpg" on 5xx drivers)
DESCRIBE = {
    "torch": "torchvision decode_jpeg(list, device=cuda), batched nvJPEG",
    "nvimgcodec-gpu": "nvImageCodec CUDA decoder alone (GPU_ONLY)",
    "nvimgcodec": "nvImageCodec hardware decoder alone (HW_GPU_ONLY)",
}
SETTLE_S = 1.5  # pause between paths: longer than one dmon interval, so samples do not overlap paths


# ----------------------------------------------------------------------------- nvidia-smi dmon


def parse_dmon(lines: Iterable[str]) -> tuple[list[str], list[dict[str, float | None]]]:
    """(column names, sample rows) of `nvidia-smi dmon` output.

    The names line is the first `#` line whose first field is `gpu`; the units line (`# Idx ...`)
    and the header dmon repeats every so many rows are skipped. Each row maps a column name to
    its value; `-` (a counter the driver does not report) and anything non-numeric map to None,
    except the `gpu` column, kept as the index dmon printed.
    """
    columns: list[str] = []
    rows: list[dict[str, float | None]] = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            fields = text.lstrip("#").split()
            if fields and fields[0].lower() == "gpu" and not columns:
                columns = [f.lower() for f in fields]
            continue
        if not columns:
            continue  # a message before the header (a warning, an error)
        fields = text.split()
        if len(fields) != len(columns):
            continue  # a truncated line at the end, or a message in between
        values: dict[str, float | None] = {}
        for name, field in zip(columns, fields):
            try:
                values[name] = float(field)
            except ValueError:
                values[name] = None
        rows.append(values)
    return columns, rows


def jpeg_column(columns: list[str]) -> str | None:
    """The JPEG engines' column among dmon's, or None when this driver does not report them."""
    return next((c for c in columns if c in JPEG_COLUMNS), None)


def summarise(columns: list[str], rows: list[dict[str, float | None]]) -> dict[str, Any]:
    """Per path: jpg_util_max / jpg_util_mean / sm_util_max (None where not reported), the raw
    samples, and the verdict `engines`: yes (any JPEG sample above 0), no (JPEG samples, all 0),
    unknown (no JPEG column or no numeric JPEG sample)."""
    jpg = jpeg_column(columns)
    jpg_values = [r[jpg] for r in rows if jpg and r.get(jpg) is not None]
    sm_values = [r["sm"] for r in rows if r.get("sm") is not None]
    if not jpg_values:
        engines = "unknown"
    else:
        engines = "yes" if max(jpg_values) > 0 else "no"
    return {
        "engines": engines,
        "jpg_util_max": max(jpg_values) if jpg_values else None,
        "jpg_util_mean": statistics.fmean(jpg_values) if jpg_values else None,
        "sm_util_max": max(sm_values) if sm_values else None,
        "jpg_samples": jpg_values,
        "sm_samples": sm_values,
        "samples": len(rows),
        "jpg_column": jpg,
    }


def smi_gpu_id(index: int) -> str:
    """The id nvidia-smi knows CUDA device `index` by: CUDA_VISIBLE_DEVICES renumbers devices for
    CUDA but not for nvidia-smi, so its entry (an index or a UUID, both accepted by `-i`) is used."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def dmon_command(gpu_id: str, samples: int) -> list[str]:
    return ["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-c", str(samples), "-i", gpu_id]


def sampled_loop(decode: Callable[[], int], sync: Callable[[], None], seconds: float,
                 command: list[str]) -> dict[str, Any]:
    """Run `decode` (returns the images it decoded) until `seconds` have passed and the dmon
    `command` has exited after its samples; dmon is started right before the loop, so each of
    its samples covers decoding. Returns images/s, the dmon summary and any dmon error."""
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        error = None
    except OSError as exc:  # nvidia-smi missing: the rate is still measured, the engines unknown
        proc, error = None, f"{command[0]}: {exc}"
    deadline = seconds + 20  # a dmon that never exits must not hang the run
    images, t0 = 0, time.perf_counter()
    while True:
        images += decode()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and (proc is None or proc.poll() is not None):
            break
        if elapsed > deadline:
            proc.kill()
            error = f"dmon still running after {deadline:.0f} s: killed"
            break
    sync()
    elapsed = time.perf_counter() - t0
    out = ""
    if proc is not None:
        out, err = proc.communicate(timeout=10)
        if proc.returncode and error is None:
            error = f"dmon exit {proc.returncode}: {(err or out).strip()[-200:]}"
    columns, rows = parse_dmon(out.splitlines())
    summary = summarise(columns, rows)
    if proc is not None and error is None and not columns:
        error = f"dmon printed no header: {out.strip()[-200:]!r}"
    return dict(summary, images=images, seconds=elapsed, rate=images / elapsed, dmon_error=error,
                dmon_columns=columns)


# ----------------------------------------------------------------------------- decode paths


def jpeg_subsampling(data: bytes) -> str:
    """Chroma subsampling of a baseline/progressive JPEG from its SOF marker ("4:2:0", ...)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2) and data[i + 9] == 3:  # SOF0/1/2 with 3 components
            factors = [data[i + 11 + 3 * k] for k in range(3)]
            h, v = factors[0] >> 4, factors[0] & 15
            if factors[1] == factors[2] == 0x11:
                return {(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0", (4, 1): "4:1:1"}.get((h, v), f"{h}x{v}")
            return "other"
        i += 2 + length
    return "unknown"


def make_jpegs(count: int, size: int, workers: int | None) -> list[bytes]:
    """`count` photo-like JPEGs from benchmarks/common.py (PIL, quality 90: 4:2:0)."""
    classes = 8
    with tempfile.TemporaryDirectory(prefix="fastkd-engines-") as tmp:
        common.make_synthetic_folder(tmp, classes=classes, train_per_class=-(-count // classes),
                                     val_per_class=0, size=size, workers=workers)
        files = sorted(Path(tmp, "train").rglob("*.JPEG"))[:count]
        return [f.read_bytes() for f in files]


def torch_path(jpegs: list[bytes], device: str):
    """The torch backend's decode: one batched decode_jpeg call on a list of host tensors."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]

    def decode() -> int:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return len(images)

    return decode, lambda: torch.cuda.synchronize(device), 0


def nvimgcodec_path(jpegs: list[bytes], index: int, hardware: bool, threads: int):
    """nvImageCodec with one backend only (hardware engines, or the CUDA decoder), made by the
    loader's own `_make_decoder` (same options), decoding on a side stream as the loader does.
    Returns (decode, sync, None-count holder)."""
    import torch
    from nvidia import nvimgcodec as nv

    from fastkd.data import nvimgcodec_loader as nl

    kind = nv.BackendKind.HW_GPU_ONLY if hardware else nv.BackendKind.GPU_ONLY
    backend = nv.Backend(kind, load_hint=1.0) if hardware else nv.Backend(kind)
    decoder = nl._make_decoder(nv, index, [backend], threads)
    streams = [nv.CodeStream(j) for j in jpegs]
    params = nl._decode_params(nv)
    stream = torch.cuda.Stream(device=index)
    failed = [0]

    def decode() -> int:
        images = nl._decode_on(decoder, streams, params, stream.cuda_stream)
        stream.synchronize()  # like torchvision's batched call: the batch is done when it returns
        done = sum(image is not None for image in images)
        failed[0] += len(images) - done
        return done

    return decode, stream.synchronize, failed


def cuda_index(device: str) -> int:
    import torch

    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def skip_reason(name: str, device: str) -> str | None:
    """Why path `name` cannot run here (None: it can)."""
    if not device.startswith("cuda"):
        return f"needs a CUDA device (this run's device is {device})"
    if name == "torch":
        return None
    from fastkd.data import nvimgcodec_loader as nl

    why = nl.available()
    if why is not None:
        return f"nvImageCodec is not importable ({why})"
    if name == "nvimgcodec":
        return nl.hardware_missing(cuda_index(device))
    return None


def measure(name: str, jpegs: list[bytes], device: str, args) -> dict[str, Any]:
    index = cuda_index(device)
    case = f"{args.size}px b{len(jpegs)}"
    try:
        if name == "torch":
            decode, sync, failed = torch_path(jpegs, device)
        else:
            decode, sync, failed = nvimgcodec_path(jpegs, index, name == "nvimgcodec", args.threads)
        decode()  # warm-up, not timed or sampled: handles, allocations, first-use set-up
        sync()
        if failed:
            failed[0] = 0
        result = sampled_loop(decode, sync, args.seconds,
                              dmon_command(smi_gpu_id(index), max(2, round(args.seconds))))
    except Exception as error:  # a path that breaks is recorded; the others still run
        return common.row(name, case=case, unit="img/s", status="failed", baseline=base(name),
                          error=f"{type(error).__name__}: {error}"[:300], decoder=DESCRIBE[name],
                          engines="unknown")
    failed_images = failed[0] if failed else 0
    extras = {k: result[k] for k in ("engines", "jpg_util_max", "jpg_util_mean", "sm_util_max", "jpg_samples",
                                     "sm_samples", "samples", "dmon_error")}
    if result["images"] == 0:
        return common.row(name, case=case, unit="img/s", status="failed", baseline=base(name),
                          error=f"the decoder returned None for every image ({failed_images})",
                          decoder=DESCRIBE[name], **extras)
    return common.row(name, case=case, unit="img/s", value=result["rate"], baseline=base(name),
                      decoder=DESCRIBE[name], seconds=round(result["seconds"], 2), images=result["images"],
                      failed_images=failed_images, **extras)


def base(name: str) -> str | None:
    """Each nvImageCodec path is compared with torch (ratio > 1: faster than torchvision)."""
    return None if name == "torch" else "torch"


def note(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['name']}: {r['status']}: {r.get('error')}"
    if r["engines"] == "unknown":
        why = r.get("dmon_error") or "the driver reports no JPEG column"
        return f"{r['name']}: JPEG engines unknown ({why})"
    return (f"{r['name']}: JPEG engines {r['engines']} (jpg max {r['jpg_util_max']:.0f} %, "
            f"mean {r['jpg_util_mean']:.1f} %, sm max {common._fmt(r['sm_util_max'])} %, {r['samples']} samples)")


def run(args) -> dict[str, Any]:
    import fastkd  # noqa: F401  (maps the carried nvJPEG before torchvision maps its own)
    import torch
    from fastkd import nvjpeg_library

    unknown = [n for n in args.paths if n not in PATHS]
    if unknown:
        raise SystemExit(f"--paths: unknown {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"  # recorded as skipped below, not an exit: the run still writes its JSON
    machine = common.machine_info(device)
    names = [n for n in PATHS if n in args.paths]
    reasons = {n: skip_reason(n, device) for n in names}
    jpegs: list[bytes] = []
    if any(r is None for r in reasons.values()):
        jpegs = make_jpegs(args.images, args.size, args.workers)
    case = f"{args.size}px b{len(jpegs) or args.images}"
    rows = []
    for name in names:
        if reasons[name] is not None:
            rows.append(common.row(name, case=case, unit="img/s", status="skipped", baseline=base(name),
                                   error=reasons[name], decoder=DESCRIBE[name], engines="unknown"))
            continue
        if rows:
            time.sleep(SETTLE_S)
        rows.append(measure(name, jpegs, device, args))
        print(note(rows[-1]), flush=True)
    common.fill_ratios(rows)
    common.print_table(rows, [("name", "path"), ("status", "status"), ("value", "img/s"), ("engines", "engines"),
                              ("jpg_util_max", "jpg max %"), ("sm_util_max", "sm max %")], title="JPEG engines")
    bound = nvjpeg_library.bound()
    params = {"device": device, "images": len(jpegs) or args.images, "size": args.size, "seconds": args.seconds,
              "threads": args.threads, "subsampling": jpeg_subsampling(jpegs[0]) if jpegs else None,
              "dmon": " ".join(dmon_command("ID", max(2, round(args.seconds)))),
              "nvjpeg_bound": bound._asdict() if bound else None}
    try:
        import torchvision

        params["torchvision"] = torchvision.__version__
    except ImportError:
        params["torchvision"] = None
    headline = [common.head(f"{r['name']} img/s", r["value"], "img/s", r.get("ratio"))
                for r in rows if r["status"] == "ok"]
    notes = [note(r) for r in rows]
    notes.append("engines: yes = the JPEG engines' utilisation (dmon jpg) rose above 0 while the path "
                 "decoded, no = it stayed 0, unknown = not reported")
    return common.write_result(args.json, "jpeg_engines", rows, machine=machine, params=params,
                               headline=headline, notes=notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N (without CUDA: every path skipped)")
    p.add_argument("--paths", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=list(PATHS), help=f"comma list of {', '.join(PATHS)}")
    p.add_argument("--images", type=int, default=256, help="JPEGs per batch")
    p.add_argument("--size", type=int, default=400, help="longer side of the JPEGs, roughly")
    p.add_argument("--seconds", type=float, default=4.0, help="decode at least this long per path")
    p.add_argument("--threads", type=int, default=4, help="nvImageCodec host threads (parsing)")
    p.add_argument("--workers", type=int, default=None, help="processes writing the JPEGs")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p


main = common.cli_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
