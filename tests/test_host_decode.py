"""The torch backend's `decode` option (host-core decode while training on CUDA) and
benchmarks/decode_table.py's table.

On CPU: decode="host" is the CPU path itself (same batches, pixel for pixel), decode="device" is
refused, the upload step of the CUDA host path (uint8 batch -> normalised channels_last batch of
the loader's dtype) agrees with the float32 arithmetic the CUDA normalisation does, build_loader
takes the option for torch only, and the table builder shows measured cells and `not measured`
ones. The CUDA host path itself is marked `gpu` (skipped here, run by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastkd.data import build_loader, nvimgcodec_loader
from fastkd.data.spec import IMAGENET_MEAN, IMAGENET_STD
from fastkd.data.torch_loader import TorchLoader, default_workers, upload
from fastkd import notes
from fastkd.errors import FastKDError
from loader_checks import assert_pass_without_host_sync, one_pass, write_textured_jpegs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """2 classes x (6 train + 2 val) textured JPEGs of 48-120 px, packed in 4-sample shards."""
    from fastkd.preprocess.pack import pack

    root = tmp_path_factory.mktemp("host_decode")
    write_textured_jpegs(root / "src", {"train": 6, "val": 2}, classes=2, sides=(48, 120), seed=1)
    pack(root / "src", root / "packed", classes="all", shard_size=4, workers=1, quality=90)
    return root / "packed"


def _load(packed, split, device="cpu", dtype="fp32", **kw):
    kw.setdefault("num_workers", 1)
    return build_loader(packed, split, "torch", 4, 32, device, dtype, return_indices=True, **kw)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("workers", [1, 2])
def test_host_decode_on_cpu_is_the_default_path(packed, split, workers):
    """decode="host" on a CPU device: the default (auto) batches exactly, for two epochs."""
    ref, host = _load(packed, split, num_workers=workers), _load(packed, split, num_workers=workers, decode="host")
    assert (ref.decode, host.decode) == ("host", "host") and host.batched_resize is False
    for epoch in (0, 2):
        ref.set_epoch(epoch)
        host.set_epoch(epoch)
        (x0, y0, i0), (x1, y1, i1) = one_pass(ref), one_pass(host)
        assert torch.equal(i0, i1) and torch.equal(y0, y1)
        assert x1.dtype == torch.float32 and x1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x0, x1)


def test_device_decode_on_cpu_is_refused(packed):
    with pytest.raises(FastKDError, match=r"decode='device' decodes with nvJPEG on a CUDA device.*device is cpu"):
        _load(packed, "train", decode="device")
    with pytest.raises(FastKDError, match=r"decode must be one of auto, device, host, not 'gpu'"):
        _load(packed, "train", decode="gpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_upload_normalises_like_the_cuda_arithmetic(packed, dtype):
    """The CUDA host path's per-batch step on CPU tensors: a worker's uint8 channels_last batch ->
    `dtype`, channels_last: the CPU path's values (Loader.normalize's table) and, up to the
    float32 rounding of the arithmetic, (v - 255 mean) / (255 std) computed in float32 as
    Loader.normalize does on CUDA: equal in bf16 and fp16; in fp32 within 5e-7, 2 ulps of the
    largest values (the table rounds the exact value once; the arithmetic also rounds 255 mean
    and 255 std, and v - 255 mean cancels near the mean)."""
    loader = _load(packed, "train", dtype=dtype)
    images = torch.arange(256, dtype=torch.uint8).repeat(3 * 3 * 2).view(3, 3, 16, 32)
    images = images.contiguous(memory_format=torch.channels_last)  # every value in every channel
    labels = torch.tensor([1, 0, 1], dtype=torch.int32)
    out, y = upload(images, labels, torch.device("cpu"), loader.normalize)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, loader.normalize(images.contiguous()))  # any input layout
    assert y.dtype == torch.int64 and torch.equal(y, labels.long())
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    cuda_arithmetic = ((images.float() - mean) / std).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(out, cuda_arithmetic, rtol=0, atol=5e-7)
    else:
        assert torch.equal(out, cuda_arithmetic)


def test_default_workers_leave_one_core(monkeypatch):
    """Host decode on CUDA: every core but one (at least 1); everything else: LoaderSpec's default."""
    import fastkd.data.torch_loader as tl

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(tl.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert default_workers(cuda, "host") == 15
    assert default_workers(cuda, "auto") is None and default_workers(cuda, "device") is None
    assert default_workers(cpu, "host") is None and default_workers(cpu, "auto") is None
    monkeypatch.setattr(tl.os, "sched_getaffinity", lambda _: {0}, raising=False)
    assert default_workers(cuda, "host") == 1


def test_build_loader_takes_decode_for_torch_only(packed):
    assert isinstance(_load(packed, "val", decode="auto"), TorchLoader)
    with pytest.raises(FastKDError, match=r"backend 'ffcv' does not take option\(s\) \['decode'\]; it takes"):
        build_loader(packed, "train", "ffcv", 4, 32, "cpu", "fp32", decode="host")


def test_nvimgcodec_cpu_fallback_decodes_on_the_host(packed, monkeypatch, capsys):
    """Without nvImageCodec, decoders="cpu" falls back to torch with decode="host" (torch's options
    only: hw_decoder_load is dropped) and the note says where it decodes."""
    monkeypatch.setattr(notes, "_said", set())
    monkeypatch.setattr(nvimgcodec_loader, "available", lambda: "ModuleNotFoundError: no nvidia.nvimgcodec")
    loader = build_loader(packed, "train", "nvimgcodec", 4, 32, "cpu", "fp32", num_workers=1,
                          decoders="cpu", hw_decoder_load=0.5, batched_resize=True)
    assert isinstance(loader, TorchLoader) and loader.decode == "host" and loader.batched_resize
    assert "decoded by libjpeg-turbo on the host cores" in capsys.readouterr().err


# ----------------------------------------------------------------------------- decode table


def _result(benchmark: str, rows: list[dict], device: str) -> dict:
    import common

    return common.write_result(None, benchmark, common.fill_ratios(rows), machine=common.machine_info(device),
                               params={"resolution": "160"})


def test_decode_table_cells():
    """Hand-made GPU results (a loader run at 160 px, e2e runs at 160 and 192 px) and a CPU e2e
    result: measured cells carry their own figures, the rest say `not measured`, CPU rows are
    labelled as such."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import common
    import decode_table

    def e2e(name, res, value, wait, workers=None):
        return common.row(name, case=f"{res}px b256", unit="img/s", value=value, baseline="synthetic", res=res,
                          batch=256, wait_frac=wait + 0.02, wait_frac_steady=wait, workers=workers)

    loader = _result("loader_throughput", [
        common.row("torch", unit="img/s", value=9000.0, baseline="folder", res=160, workers=16),
        common.row("torch-host w8", unit="img/s", value=3000.0, baseline="folder", res=160, workers=8),
        common.row("nvimgcodec", unit="img/s", status="skipped", baseline="folder", error="no engines")], "cuda")
    e2e_160 = _result("e2e_throughput", [e2e("torch", 160, 5000.0, 0.01, 16), e2e("torch-host w8", 160, 2500.0, 0.4, 8),
                                         e2e("synthetic", 160, 6000.0, 0.0)], "cuda")
    e2e_192 = _result("e2e_throughput", [e2e("torch", 192, 4000.0, 0.02, 16), e2e("synthetic", 192, 4800.0, 0.0)],
                      "cuda")
    cpu = _result("e2e_throughput", [e2e("torch", 160, 3.0, 0.1, 2), e2e("synthetic", 160, 4.0, 0.0)], "cpu")
    rows = decode_table.build([loader, e2e_160, e2e_192, cpu], gpu_note="no GPU here")
    by = {r["path"]: r for r in rows}
    assert list(by) == ["torch", "nvimgcodec", "nvimgcodec-gpu", "torch-host w8", "nvimgcodec-cpu", "ffcv",
                        "torch w2 (CPU device)"]
    torch_row, host = by["torch"], by["torch-host w8"]
    assert torch_row["kind"] == "nvJPEG CUDA" and host["kind"] == "host cores"
    assert torch_row["loader_160"] == "9,000" and torch_row["e2e_160"] == "5,000"
    assert torch_row["x_synthetic_160"] == "0.83" and torch_row["waiting_160"] == "1.0 %"
    assert torch_row["epoch_160"] == f"{126689 / 5000 / 60:.1f} min" == "0.4 min"
    assert torch_row["epoch_192"] == f"{126689 / 4000 / 60:.1f} min" and torch_row["loader_192"] == "not measured"
    assert host["e2e_160"] == "2,500" and host["waiting_160"] == "40.0 %" and host["epoch_192"] == "not measured"
    assert by["nvimgcodec"]["kind"] == "hardware engines"
    for key in ("loader_160", "e2e_160", "epoch_160", "epoch_192"):
        assert by["nvimgcodec"][key] == "not measured" and by["ffcv"][key] == "not measured"  # a GPU run exists
    cpu_row = by["torch w2 (CPU device)"]
    assert cpu_row["kind"] == "host cores (CPU device)" and cpu_row["e2e_160"] == "3.0"
    assert cpu_row["x_synthetic_160"] == "0.75" and cpu_row["epoch_160"] == f"{126689 / 3 / 3600:.1f} h"
    assert cpu_row["loader_160"] == "not measured"
    only_cpu = {r["path"]: r for r in decode_table.build([cpu], gpu_note="no GPU here")}
    assert only_cpu["torch"]["e2e_160"] == "not measured (no GPU here)"
    assert only_cpu["torch w2 (CPU device)"]["loader_160"] == "not measured"  # a CPU cell: no GPU note
    text = decode_table.markdown(rows)
    assert "| torch-host w8 | host cores | 3,000 | not measured |" in text


# ----------------------------------------------------------------------------- GPU only


def _cuda(packed, **kw):
    return build_loader(packed, "train", "torch", 4, 32, "cuda", "bf16", num_workers=2, return_indices=True, **kw)


@pytest.mark.gpu
def test_gpu_host_decode_matches_device_decode(packed):
    """On CUDA, decode="host" yields the device path's samples, labels, boxes and flips; pixels
    differ only by the decoder (libjpeg-turbo vs nvJPEG) and the resize (per image vs batched)."""
    device, host = _cuda(packed), _cuda(packed, decode="host")
    assert (device.decode, host.decode) == ("device", "host") and not host.batched_resize
    for epoch in (0, 1):
        device.set_epoch(epoch)
        host.set_epoch(epoch)
        (x0, y0, i0), (x1, y1, i1) = one_pass(device), one_pass(host)
        assert torch.equal(i0, i1) and torch.equal(y0, y1) and y1.is_cuda and y1.dtype == torch.int64
        assert x1.is_cuda and x1.dtype == torch.bfloat16 and x1.is_contiguous(memory_format=torch.channels_last)
        d = (x1.float() - x0.float()).abs()
        assert d.mean() < 0.05, d.mean()  # ~3 grey levels / 58 (std * 255), averaged
    cpu = one_pass(_load(packed, "train", dtype="bf16"))  # the same workers' code on a CPU device
    host.set_epoch(0)
    x1, y1, i1 = one_pass(host)
    assert torch.equal(i1, cpu[2]) and torch.equal(y1.cpu(), cpu[1])
    assert (x1.float().cpu() - cpu[0].float()).abs().max() < 0.02  # same pixels up to the float path


@pytest.mark.gpu
def test_gpu_host_decode_step_never_waits_on_the_host(packed):
    """Taking host-decoded batches and using them on the current stream makes no host sync (the
    copies come from pinned memory, queued on the side stream), and each batch is ready there."""
    loader = _cuda(packed, decode="host")
    assert_pass_without_host_sync(loader)
