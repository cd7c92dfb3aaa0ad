"""The nvimgcodec backend (region-of-interest decode through nvImageCodec), its fallback to the
torch backend, and `--backend auto`'s rule.

On CPU nvImageCodec decodes with libjpeg-turbo, the library torchvision's decode_jpeg uses, so
the nvimgcodec batches must equal the torch backend's exactly (same boxes, flips, pixels). GPU
tests (hardware engines, stream overlap without host syncs) are marked `gpu` and skipped here.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastkd.data import auto, build_loader, nvimgcodec_loader
from fastkd.data.nvimgcodec_loader import NvImgCodecLoader
from fastkd.data.torch_loader import TorchLoader
from fastkd.data.transforms import center_crop_box, train_params
from fastkd import notes, nvjpeg_library
from fastkd.errors import FastKDError
from loader_checks import assert_pass_without_host_sync, one_pass, write_textured_jpegs

HAVE_NVIMGCODEC = nvimgcodec_loader.available() is None
needs_package = pytest.mark.skipif(not HAVE_NVIMGCODEC, reason="nvidia-nvimgcodec-cu13 is not installed")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """3 classes x (8 train + 4 val) photo-like JPEGs of 64-160 px, packed with 8-sample shards
    (pack re-encodes every source, greyscale and progressive ones too, as baseline RGB JPEGs)."""
    from fastkd.preprocess.pack import pack

    root = tmp_path_factory.mktemp("nvimgcodec")
    write_textured_jpegs(root / "src", {"train": 8, "val": 4}, classes=3, sides=(64, 160), seed=0,
                         grey_every=7, progressive_every=5)
    pack(root / "src", root / "packed", classes="all", shard_size=8, workers=1, quality=90)
    return root / "packed"


def _load(packed, split, backend, **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("return_indices", True)
    if backend == "nvimgcodec":
        kw.setdefault("decoders", "cpu")
    return build_loader(packed, split, backend, kw.pop("batch_size", 4), kw.pop("resolution", 32), "cpu",
                        kw.pop("dtype", "fp32"), **kw)


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test sees the once-per-process notes afresh."""
    monkeypatch.setattr(notes, "_said", set())


# ----------------------------------------------------------------------------- CPU decode == torch


@needs_package
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("batched_resize", [False, True])
def test_batches_equal_the_torch_backend(packed, split, batched_resize):
    """Same seed: the same samples, labels, boxes, flips and pixels as the torch backend (both
    decode with libjpeg-turbo on CPU; ROI decode then resize == full decode then crop + resize)."""
    ref = _load(packed, split, "torch", batched_resize=batched_resize)
    new = _load(packed, split, "nvimgcodec", batched_resize=batched_resize)
    assert isinstance(new, NvImgCodecLoader) and isinstance(ref, TorchLoader) and len(new) == len(ref)
    for epoch in (0, 3):
        ref.set_epoch(epoch)
        new.set_epoch(epoch)
        x0, y0, i0 = one_pass(ref)
        x1, y1, i1 = one_pass(new)
        assert torch.equal(i0, i1) and torch.equal(y0, y1)
        assert x1.dtype == torch.float32 and x1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x0, x1), (x0 - x1).abs().max()


@needs_package
@pytest.mark.parametrize("split", ["train", "val"])
def test_decodes_only_the_box(packed, split):
    """Each decoded image is exactly its crop box (train: train_params from (seed, epoch,
    index); val: the centre box), not the whole JPEG."""
    from fastkd.data.dali_loader import jpeg_size

    loader = _load(packed, split, "nvimgcodec", seed=5)
    seen = []
    real = loader._tensors

    def spy(slot, images):
        tensors = real(slot, images)
        seen.extend(tuple(t.shape) for t in tensors)
        return tensors

    loader._tensors = spy
    loader.set_epoch(2)
    _, _, indices = one_pass(loader)
    want = []
    for i in indices.tolist():
        h, w = jpeg_size(loader.store.jpeg_bytes(i))
        box = train_params(5, 2, i, h, w)[0] if split == "train" else center_crop_box(h, w)
        want.append((3, box[2], box[3]))
    assert seen == want


@needs_package
def test_start_batch_reads_only_the_tail(packed):
    loader = _load(packed, "train", "nvimgcodec")
    loader.set_epoch(1)
    full = [(x, y, i) for x, y, i in loader]
    reads, read = [], loader.store.jpeg_bytes
    loader.store.jpeg_bytes = lambda index: (reads.append(int(index)), read(index))[1]
    loader.set_epoch(1, start_batch=2)
    tail = [(x, y, i) for x, y, i in loader]
    assert len(tail) == len(full) - 2
    for (x, y, i), (xf, yf, i_f) in zip(tail, full[2:]):
        assert torch.equal(i, i_f) and torch.equal(y, yf) and torch.equal(x, xf)
    assert sorted(reads) == sorted(torch.cat([i for _, _, i in full[2:]]).tolist())


@needs_package
def test_given_crops_match_the_torch_backend(packed):
    """set_crop_fn (a teacher cache's views): the same given boxes and flips as the torch backend."""
    ref, new = _load(packed, "train", "torch"), _load(packed, "train", "nvimgcodec")
    for loader in (ref, new):
        loader.set_crop_fn(_corner_crop)
    x0, _, i0 = one_pass(ref)
    x1, _, i1 = one_pass(new)
    assert torch.equal(i0, i1) and torch.equal(x0, x1)


def _corner_crop(epoch, index, height, width):
    side = min(height, width) // 2
    return (index % 3, epoch % 5, side, side + 3), bool(index % 2)


@needs_package
def test_producer_keeps_batches_ahead(packed):
    """While the consumer holds batch 0, the producer decodes batches_ahead more (queued) plus
    one it waits to hand over, and no further: at least two batches in flight, bounded memory."""
    loader = _load(packed, "train", "nvimgcodec", batches_ahead=2, batch_size=2)
    reads, read = [], loader.store.jpeg_bytes
    loader.store.jpeg_bytes = lambda index: (reads.append(int(index)), read(index))[1]
    it = iter(loader)
    next(it)
    deadline = time.monotonic() + 20
    while len(reads) < 2 * 4 and time.monotonic() < deadline:  # batch 0 + 2 queued + 1 waiting
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(reads) == 2 * 4, len(reads)
    it.close()  # leaving a pass early stops its producer; the next pass runs normally
    assert sum(1 for _ in loader) == len(loader)
    assert not [t for t in threading.enumerate() if t.name == "fastkd-nvimgcodec" and t.is_alive()]


@needs_package
def test_undecodable_sample_is_named(packed, tmp_path):
    from fastkd.data.packed import ShardStore

    copy = tmp_path / "packed"
    shutil.copytree(packed, copy)
    loader = _load(copy, "val", "nvimgcodec")
    store: ShardStore = loader.store
    i = 5
    tar = Path(store.tars[store.shard[i]])
    data = bytearray(tar.read_bytes())
    start = int(store.offset[i])
    data[start + 2:start + int(store.size[i])] = b"\x00" * (int(store.size[i]) - 2)  # keep SOI, break the rest
    tar.write_bytes(bytes(data))
    loader = _load(copy, "val", "nvimgcodec")
    with pytest.raises(FastKDError, match=rf"{tar.name}: sample {i} of split 'val'"):
        one_pass(loader)


# ----------------------------------------------------------------------------- fallback and options


def test_fallback_when_the_package_is_missing(packed, monkeypatch, capsys):
    """No nvImageCodec: build_loader gives the torch backend and says so once (rank 0 only)."""
    import nvidia

    monkeypatch.delattr(nvidia, "nvimgcodec", raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # `from nvidia import nvimgcodec` fails
    assert "ModuleNotFoundError" in nvimgcodec_loader.available()
    loaders = [_load(packed, "train", "nvimgcodec", decoders=d, batched_resize=True) for d in ("cpu", "cpu", "hw")]
    _load(packed, "train", "nvimgcodec", rank=1, world_size=2)
    assert all(isinstance(x, TorchLoader) and x.batched_resize for x in loaders)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nvimgcodec falls back to torch: nvImageCodec is not importable" in lines[0], lines


@needs_package
def test_fallback_without_engines_on_cpu(packed, capsys):
    """The default decoders ("hw") need the GPU's JPEG engines: on a CPU device, torch + one note."""
    for _ in range(2):
        loader = _load(packed, "val", "nvimgcodec", decoders="hw")
        assert isinstance(loader, TorchLoader)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "decoders='hw' needs a CUDA device" in lines[0]
    from fastkd.data import available_backends

    assert "nvimgcodec" in available_backends()  # importable: listed, though it falls back here


def test_bad_options(packed):
    with pytest.raises(FastKDError, match="decoders must be one of hw, gpu, cpu"):
        _load(packed, "train", "nvimgcodec", decoders="fpga")
    with pytest.raises(FastKDError, match=r"does not take option\(s\) \['prefetch_factor'\]"):
        _load(packed, "train", "nvimgcodec", prefetch_factor=2)
    with pytest.raises(FastKDError, match="unknown loader backend 'nvjpeg'.*nvimgcodec, auto"):
        _load(packed, "train", "nvjpeg")
    if HAVE_NVIMGCODEC:
        from fastkd.data.contract import LoaderSpec

        spec = LoaderSpec.make(packed, "train", 4, 32, "cpu", "fp32")
        with pytest.raises(FastKDError, match="needs a CUDA device"):  # only build_loader falls back
            NvImgCodecLoader(spec, {"classes": [0, 1, 2], "splits": {"train": {"count": 24}}}, [], decoders="gpu")


# ----------------------------------------------------------------------------- --backend auto


@pytest.mark.parametrize("device, formats, engines, dali, ffcv, want", [
    ("cuda", ["ffcv", "dali"], None, None, None, "nvimgcodec"),
    ("cuda", ["ffcv", "dali"], "no engines", None, None, "dali"),
    ("cuda", ["dali"], "no engines", "no DALI", None, "torch"),
    ("cuda", ["ffcv"], None, None, None, "ffcv"),
    ("cpu", ["ffcv", "dali"], "needs CUDA", None, None, "ffcv"),
    ("cpu", ["ffcv", "dali"], "needs CUDA", None, "no FFCV", "torch"),
    ("cpu", ["dali"], "needs CUDA", None, None, "torch"),
])
def test_auto_rule(monkeypatch, device, formats, engines, dali, ffcv, want):
    monkeypatch.setattr(auto, "_engines", lambda d: engines)
    monkeypatch.setattr(auto, "_dali", lambda: dali)
    monkeypatch.setattr(auto, "_ffcv", lambda: ffcv)
    backend, why = auto.choose_backend(device, formats)
    assert backend == want and why
    if device == "cuda" and want in ("dali", "torch"):  # the engines' rule was passed over: why
        assert engines in why


def test_auto_rule_gives_up_clearly(monkeypatch):
    monkeypatch.setattr(auto, "_ffcv", lambda: "ModuleNotFoundError: ffcv")
    with pytest.raises(FastKDError, match=r"formats \['ffcv'\] give no backend on cpu.*--formats dali"):
        auto.choose_backend("cpu", ["ffcv"])


def test_build_loader_auto_prints_its_choice_once(packed, monkeypatch, capsys):
    monkeypatch.setattr(auto, "_ffcv", lambda: "no FFCV here")
    loaders = [_load(packed, s, "auto") for s in ("train", "val")]
    assert all(isinstance(x, TorchLoader) for x in loaders)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastkd: loader backend auto -> torch (CPU device, no FFCV (no FFCV here): "
                   "libjpeg-turbo in DataLoader workers)"]
    with pytest.raises(FastKDError, match=r"backend 'torch' \(chosen by --backend auto\) does not take"):
        _load(packed, "train", "auto", decoders="cpu")


# ----------------------------------------------------------------------------- gpu_check dry run


@needs_package
def test_gpu_check_dry_run_measures_every_decode_path(tmp_path):
    """benchmarks/gpu_check.sh on CPU, cut to data + loader + e2e: the wheels stage finds
    nvImageCodec, every decode path has a row, the ones that need CUDA are skipped with the
    fallback's reason (never measured as torch under their name), auto says what it ran."""
    import json
    import os
    import subprocess

    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), ONLY="data loader e2e",
               BUDGET_S="500", PY=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    stages = dict(line.split("\t")[:2] for line in (tmp_path / "work" / "stages.tsv").read_text().splitlines())
    assert [stages[k] for k in ("wheels", "data", "loader", "e2e")] == ["pass"] * 4, stages
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    # the loader stage measures every decode path; the e2e stage (the default step) the paths
    # most likely to keep up with it, the best first
    expected = {"loader": ["torch", "nvimgcodec", "nvimgcodec-gpu", "nvimgcodec-cpu", "auto", "torch-host"],
                "e2e": ["torch-host", "nvimgcodec", "torch"]}
    for bench, names in expected.items():
        rows = {r["name"]: r for r in summary["benchmarks"][bench]["result"]["rows"]}
        assert [n for n in rows if n != "synthetic"] == names
        assert rows["torch-host"]["status"] == "ok" and rows["torch-host"]["value"] > 0
        assert rows["nvimgcodec"]["status"] == "skipped" and "needs a CUDA device" in rows["nvimgcodec"]["error"]
    rows = {r["name"]: r for r in summary["benchmarks"]["loader"]["result"]["rows"]}
    assert rows["nvimgcodec-gpu"]["status"] == "skipped" and "needs a CUDA device" in rows["nvimgcodec-gpu"]["error"]
    assert rows["nvimgcodec-cpu"]["status"] == "ok" and rows["nvimgcodec-cpu"]["ran_as"] == "nvimgcodec"
    assert rows["auto"]["status"] == "ok" and rows["auto"]["ran_as"] == "torch"  # CPU, shards only
    assert rows["nvimgcodec-cpu"]["value"] > 0


# ----------------------------------------------------------------------------- GPU only


def _cuda_loader(packed, split, backend, **kw):
    return build_loader(packed, split, backend, 8, 64, "cuda", "bf16", num_workers=4, return_indices=True, **kw)


@pytest.mark.gpu
def test_hardware_engines_found_on_a100_h100_h200():
    name = torch.cuda.get_device_name(0)
    if not any(g in name for g in ("A100", "H100", "H200", "H800", "A800", "GH200")):
        pytest.skip(f"{name}: no hardware JPEG engines expected")
    assert nvimgcodec_loader.hardware_missing(0) is None
    assert auto.choose_backend("cuda", ["dali"])[0] == "nvimgcodec"


@pytest.mark.gpu
@pytest.mark.parametrize("decoders", ["hw", "gpu", "cpu"])
def test_gpu_batches_match_the_torch_backend(packed, decoders):
    """Same samples, labels and boxes as torch on CUDA; pixels within the decoders' differences."""
    if decoders == "hw" and nvimgcodec_loader.hardware_missing(0):
        pytest.skip(nvimgcodec_loader.hardware_missing(0))
    ref, new = _cuda_loader(packed, "train", "torch"), _cuda_loader(packed, "train", "nvimgcodec", decoders=decoders)
    assert isinstance(new, NvImgCodecLoader)
    x0, y0, i0 = one_pass(ref)
    x1, y1, i1 = one_pass(new)
    assert torch.equal(i0, i1) and torch.equal(y0, y1) and x1.device.type == "cuda"
    assert x1.dtype == torch.bfloat16 and x1.is_contiguous(memory_format=torch.channels_last)
    d = (x1.float() - x0.float()).abs()
    assert d.mean() < 0.05, d.mean()  # ~3 grey levels / 58 (std * 255), averaged


@pytest.mark.gpu
@pytest.mark.parametrize("decoders", ["hw", "cpu"])
def test_gpu_step_never_waits_on_the_host(packed, decoders):
    """Taking prefetched batches and using them on the current stream makes no host sync (sync
    debug mode "error" raises on any), and the batch is ready there (the stream waited)."""
    if decoders == "hw" and nvimgcodec_loader.hardware_missing(0):
        pytest.skip(nvimgcodec_loader.hardware_missing(0))
    loader = _cuda_loader(packed, "train", "nvimgcodec", decoders=decoders)
    assert_pass_without_host_sync(loader)


# ----------------------------------------------------------------------------- nvJPEG, fallback, probe

_NVJPEG_REPORT = """
import ctypes, json, os, sys
{first}
from nvidia import nvimgcodec as nv
options, real = [], nv.Decoder
nv.Decoder = lambda *a, **k: (options.append(k.get("options", "")), real(*a, **k))[1]
from fastkd.data import build_loader
next(iter(build_loader(sys.argv[1], "val", "nvimgcodec", 4, 32, "cpu", "fp32", decoders="cpu", num_workers=1)))
lib = ctypes.CDLL("libnvjpeg.so.13", mode=os.RTLD_NOLOAD)  # what nvImageCodec's dlopen gets
version = []
for prop in range(3):
    value = ctypes.c_int()
    assert lib.nvjpegGetProperty(prop, ctypes.byref(value)) == 0
    version.append(value.value)
print(json.dumps({{"version": version, "options": options}}))
"""


def _nvjpeg_in_fresh_process(packed, first: str) -> dict:
    """Run _NVJPEG_REPORT in a fresh interpreter: the nvJPEG version the soname resolves to
    and the options of every nvImageCodec Decoder the loader made, after `first`."""
    import json
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _NVJPEG_REPORT.format(first=first), str(packed)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_package
def test_nvjpeg_after_torchvision_is_new_enough_or_the_option_is_set(packed):
    """A script that imports torchvision first maps torchvision's bundled nvJPEG (13.0 here) under
    libnvjpeg.so.13, so nvImageCodec binds to it: then every Decoder must get the option that lets
    ROI decodes of 4:2:0 JPEGs run below 13.2."""
    got = _nvjpeg_in_fresh_process(packed, "import torchvision")
    assert got["options"]
    assert tuple(got["version"][:2]) >= (13, 2) or all(
        "enable_roi_fancy_upsampling=1" in o for o in got["options"]), got


@needs_package
def test_fastkd_first_binds_the_carried_nvjpeg(packed):
    """Importing fastkd before torchvision: the soname resolves to the nvidia-nvjpeg wheel (>= 13.2)."""
    if nvjpeg_library.wheel_path() is None:
        pytest.skip("the nvidia-nvjpeg wheel is not installed")
    got = _nvjpeg_in_fresh_process(packed, "import fastkd, torchvision")
    assert tuple(got["version"][:2]) >= (13, 2), got
    assert not any("enable_roi_fancy_upsampling" in o for o in got["options"]), got


def _flaky(decoder, fails):
    """A decoder whose decode returns None where fails(position in the call, batch size) is true."""

    class Flaky:
        calls: list = []

        def decode(self, subs, params, cuda_stream):
            Flaky.calls.append(len(subs))
            out = decoder.decode(subs, params=params, cuda_stream=cuda_stream)
            return [None if fails(k, len(subs)) else im for k, im in enumerate(out)]

    return Flaky()


@needs_package
@pytest.mark.parametrize("split", ["train", "val"])
def test_images_a_decoder_refuses_fall_back_one_by_one(packed, monkeypatch, split):
    """The first decoder refuses the even positions of each batch, the second refuses all it
    gets: those images alone go to the next stages (the second decoder, then torchvision), and
    the batches equal the all-good ones."""
    ref_x, ref_y, ref_i = one_pass(_load(packed, split, "nvimgcodec"))
    real_stages = nvimgcodec_loader._decoder_stages
    flaky = {}

    def stages(nv, device, decoders, threads, hw_load):
        make = real_stages(nv, device, decoders, threads, hw_load)[0]
        flaky["first"] = _flaky(make(), lambda k, n: k % 2 == 0)
        flaky["second"] = _flaky(make(), lambda k, n: True)
        return [lambda: flaky["first"], lambda: flaky["second"]]

    monkeypatch.setattr(nvimgcodec_loader, "_decoder_stages", stages)
    x, y, i = one_pass(_load(packed, split, "nvimgcodec"))
    assert torch.equal(i, ref_i) and torch.equal(y, ref_y) and torch.equal(x, ref_x)
    first, second = flaky["first"].calls, flaky["second"].calls
    assert second == [(n + 1) // 2 for n in first], (first, second)  # only the refused ones


def _fake_nvimgcodec():
    """Just enough of nvidia.nvimgcodec to record how a decode is asked for."""
    from types import SimpleNamespace

    calls = SimpleNamespace(decoders=[], decodes=[])

    class Decoder:
        def __init__(self, **kwargs):
            calls.decoders.append(kwargs)

        def decode(self, subs, params=None, cuda_stream=0):
            calls.decodes.append(dict(subs=subs, params=params, cuda_stream=cuda_stream))
            return [torch.zeros(3, s.region[2] - s.region[0], s.region[3] - s.region[1], dtype=torch.uint8)
                    for s in subs]

    class CodeStream:
        def __init__(self, data, region=None):
            self.data, self.region = bytes(data), region

        def get_sub_code_stream(self, region):
            return CodeStream(self.data, region)

    nv = SimpleNamespace(
        Decoder=Decoder, CodeStream=CodeStream, Region=lambda *r: r, NVIMGCODEC_DEVICE_CPU_ONLY=-99,
        Backend=lambda kind, load_hint=None: (kind, load_hint),
        BackendKind=SimpleNamespace(HW_GPU_ONLY="hw", GPU_ONLY="gpu", CPU_ONLY="cpu"),
        SampleFormat=SimpleNamespace(I_RGB="I_RGB", P_RGB="P_RGB"), ColorSpec=SimpleNamespace(SRGB="srgb"),
        DecodeParams=lambda **kw: tuple(sorted(kw.items())))
    return nv, calls


def _chroma_sampling(jpeg: bytes) -> list[int]:
    """(h << 4 | v) sampling factors of each component, from the JPEG's SOF0 segment."""
    pos = jpeg.index(b"\xff\xc0")
    count = jpeg[pos + 9]
    return [jpeg[pos + 10 + 3 * c + 1] for c in range(count)]


def test_engine_probe_decodes_as_the_loader_will(monkeypatch):
    """The probe: a Decoder with the loader's options (HW_GPU_ONLY alone), a region of a 4:2:0
    JPEG, the loader's planar RGB params, on a side stream; not a plain full decode."""
    import nvidia

    nv, calls = _fake_nvimgcodec()
    monkeypatch.setattr(nvidia, "nvimgcodec", nv, raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", nv)
    monkeypatch.setattr(nvimgcodec_loader, "_hw_probe", {})
    monkeypatch.setattr(nvimgcodec_loader, "_probe_stream", lambda index: type("S", (), {"cuda_stream": 77})())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "fake GPU")
    assert nvimgcodec_loader.hardware_missing(0) is None
    (probe_decoder,), (probe,) = calls.decoders, calls.decodes
    assert probe_decoder["backends"] == [("hw", 1.0)]
    (sub,) = probe["subs"]
    assert sub.region == (8, 16, 40, 48) and _chroma_sampling(sub.data) == [0x22, 0x11, 0x11]
    assert probe["cuda_stream"] == 77

    loader_decoder = nvimgcodec_loader._decoder_stages(nv, torch.device("cuda", 0), "hw", 4, 0.9)[0]()
    assert loader_decoder.decode  # made through the same function, so with the same options
    assert calls.decoders[1]["options"] == probe_decoder["options"] == nvjpeg_library.decoder_options()
    assert probe["params"] == nvimgcodec_loader._decode_params(nv, interleaved=False)  # the CUDA layout
