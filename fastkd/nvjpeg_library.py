"""Which nvJPEG this process uses, and making it the carried wheel's (13.2 or newer).

    from fastkd import nvjpeg_library
    nvjpeg_library.bound()             # NvJpeg(path='.../nvidia/cu13/lib/libnvjpeg.so.13', version=(13, 3, 2))
    nvjpeg_library.decoder_options()   # "" there; ":enable_roi_fancy_upsampling=1" below 13.2

Why: torchvision's wheel bundles its own libnvjpeg (torchvision.libs/libnvjpeg.<hash>.so.13,
13.0.1 in torchvision 0.29) whose soname is libnvjpeg.so.13, and `import torchvision` maps it
even on a CPU-only machine. The dynamic loader answers a later dlopen("libnvjpeg.so.13") (what
nvImageCodec's nvjpeg extension does) with the first loaded object of that soname, so after
torchvision nvImageCodec binds to 13.0.1. Below 13.2 its hardware decoder refuses region decodes
of 4:2:0 JPEGs ("ROI decode with fancy upsampling ... nvJPEG < 13.2") unless the decoder option
`enable_roi_fancy_upsampling=1` is set; with it, 13.0/13.1 may be wrong on the box's 1-pixel edge.

So: `preload()` (called by `import fastkd`, before fastkd imports torchvision) maps the
`nvidia-nvjpeg` wheel's library first. RTLD_LOCAL is enough: the soname match ignores symbol
scope, and torchvision's own nvJPEG calls keep binding to the copy it ships (its extension
names the hashed file). When something mapped an older one first (a script that imports
torchvision before fastkd), `decoder_options()` gives nvImageCodec the option instead.
FASTKD_PRELOAD_NVJPEG=0 turns the preload off. Only ctypes and the standard library here:
`import fastkd` stays light.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

SONAME = "libnvjpeg.so.13"
ROI_FANCY_OK = (13, 2)  # first nvJPEG whose ROI decode with fancy upsampling nvImageCodec trusts
ROI_OPTION = ":enable_roi_fancy_upsampling=1"  # ":" = every decoder that knows the option
_WHEEL_DIRS = ("cu13/lib", "nvjpeg/lib")  # where nvidia-nvjpeg puts it under the `nvidia` package
_preloaded: ctypes.CDLL | None = None  # kept referenced: the mapping lives as long as the process


class NvJpeg(NamedTuple):
    path: str  # the file the soname resolves to in this process
    version: tuple[int, int, int]  # (major, minor, patch) from nvjpegGetProperty


def wheel_path() -> Path | None:
    """The `nvidia-nvjpeg` wheel's libnvjpeg.so.13, found without importing `nvidia`."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in _WHEEL_DIRS:
            path = Path(root) / sub / SONAME
            if path.is_file():
                return path
    return None


def mapped() -> list[str]:
    """Every libnvjpeg file mapped into this process (/proc/self/maps), in address order."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux
        return []
    files = [line.split(maxsplit=5)[-1] for line in lines if "/libnvjpeg." in line]
    return list(dict.fromkeys(files))


def version(lib: ctypes.CDLL) -> tuple[int, int, int]:
    """nvjpegGetProperty(MAJOR_VERSION=0, MINOR_VERSION=1, PATCH_LEVEL=2) of a loaded libnvjpeg."""
    parts = []
    for prop in range(3):
        value = ctypes.c_int()
        status = lib.nvjpegGetProperty(prop, ctypes.byref(value))
        if status != 0:
            raise OSError(f"nvjpegGetProperty({prop}) returned status {status}")
        parts.append(value.value)
    return tuple(parts)


def _file_of(lib: ctypes.CDLL) -> str:
    """The file a loaded library came from (dladdr of one of its functions)."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    info = DlInfo()
    address = ctypes.cast(lib.nvjpegGetProperty, ctypes.c_void_p)
    if not ctypes.CDLL(None).dladdr(address, ctypes.byref(info)) or not info.fname:
        raise OSError("dladdr found no file for nvjpegGetProperty")
    return os.path.realpath(info.fname.decode())


def bound() -> NvJpeg | None:
    """The libnvjpeg a dlopen of libnvjpeg.so.13 gets now (what nvImageCodec binds to), or None
    when no library of that soname is loaded yet (nvImageCodec would then find the wheel's)."""
    try:
        lib = ctypes.CDLL(SONAME, mode=os.RTLD_NOLOAD)  # never loads: only finds a mapped one
    except OSError:
        return None
    return NvJpeg(_file_of(lib), version(lib))


def preload() -> NvJpeg | None:
    """Map the wheel's libnvjpeg so that the soname resolves to it; never raises. Returns what
    the soname resolves to afterwards (None: no wheel and nothing loaded)."""
    global _preloaded
    try:
        if os.environ.get("FASTKD_PRELOAD_NVJPEG", "1") != "0" and _preloaded is None and bound() is None:
            path = wheel_path()
            if path is not None:
                _preloaded = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        return bound()
    except OSError:  # a broken wheel or no dladdr: nvImageCodec then loads what it finds
        return None


def decoder_options(lib: NvJpeg | None = None) -> str:
    """nvImageCodec Decoder options for the nvJPEG in use: ROI_OPTION below 13.2 (or when
    none is loaded yet and none can be), "" otherwise."""
    lib = lib if lib is not None else preload()
    if lib is None or lib.version[:2] < ROI_FANCY_OK:
        return ROI_OPTION
    return ""
