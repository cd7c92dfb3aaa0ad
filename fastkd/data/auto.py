"""`--backend auto`: one documented rule picks the loader backend for this machine and this pack.

The rule (`choose_backend`; the first line that applies wins):
  1. CUDA device, the pack has its WebDataset shards ("dali" format), nvImageCodec imports and
     the GPU's hardware JPEG engines decode a probe image -> `nvimgcodec`: each image's crop
     window decoded on the engines (A100/H100/H200), so neither the SMs nor the host cores
     spend time on Huffman decoding and IDCT; resize and normalise on the GPU.
  2. CUDA, shards, DALI imports -> `dali`: nvJPEG (and the engines, where present) inside
     DALI's C++ pipeline.
  3. CUDA, shards -> `torch`: nvJPEG's CUDA decoder through torchvision, nothing to install.
  4. the pack has the .beton ("ffcv" format) and FFCV imports -> `ffcv`: JIT-compiled
     decode + crop on every host core, the fastest host-side reader (CPU runs, or CUDA packs
     without shards).
  5. shards -> `torch` (libjpeg-turbo in DataLoader workers).
  6. none of these: FastKDError naming what is missing.
`folder` is never chosen (it re-reads the source JPEGs through PIL: the slowest path). The
order of 1-3 is the expected speed on a GPU (engines free the SMs the step needs, DALI's
pipeline beats a Python thread); `benchmarks/gpu_check.sh` measures all three end to end, and
the rule should follow those figures where they disagree.

`build_loader(..., backend="auto")` says the choice once per process on rank 0
(fastkd.notes.say, once=True), as does the nvimgcodec backend's fallback note:
    fastkd: loader backend auto -> nvimgcodec (CUDA device cuda:0 with hardware JPEG decoders ...)
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastkd.errors import FastKDError


# availability probes: None when usable, else why not (tests monkeypatch these)
def _engines(device: torch.device) -> str | None:
    from fastkd.data.nvimgcodec_loader import why_not

    return why_not(device, "hw")


def _dali() -> str | None:
    from fastkd.data.dali_loader import available

    return available()


def _ffcv() -> str | None:
    from fastkd.data.ffcv_loader import available

    return available()


def choose_backend(device: torch.device | str, formats: Sequence[str]) -> tuple[str, str]:
    """(backend, reason) for a loader on `device` reading a pack holding `formats` (the
    manifest's params.formats: "dali" = WebDataset shards, "ffcv" = .beton), by the rule in
    the module docstring."""
    device = torch.device(device)
    shards, beton = "dali" in formats, "ffcv" in formats
    if device.type == "cuda" and shards:
        why_hw = _engines(device)
        if why_hw is None:
            return "nvimgcodec", (f"CUDA device {device} with hardware JPEG decoders: crop windows decoded on "
                                  "the engines, resize on the GPU")
        why_dali = _dali()
        if why_dali is None:
            return "dali", f"CUDA device {device}, DALI installed; no hardware JPEG engines ({why_hw})"
        return "torch", (f"CUDA device {device}: nvJPEG through torchvision; no hardware JPEG engines ({why_hw}), "
                         f"no DALI ({why_dali})")
    why_ffcv = _ffcv() if beton else "the pack has no .beton (ffcv format)"
    if why_ffcv is None:
        return "ffcv", (f"{'CUDA device without WebDataset shards in the pack' if device.type == 'cuda' else 'CPU'}"
                        ": FFCV's compiled decode on every core")
    if shards:
        return "torch", f"{device.type.upper()} device, no FFCV ({why_ffcv}): libjpeg-turbo in DataLoader workers"
    raise FastKDError(f"--backend auto: the pack's formats {list(formats)} give no backend on {device}: "
                      f"FFCV {why_ffcv}; re-run `fastkd pack` with --formats dali")
