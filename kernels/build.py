"""Builds the fused-loss CUDA extension on first use, with `torch.utils.cpp_extension.load`.

Sources: `dual_kd_loss.cu` (plain CUDA kernel + launcher, no torch headers) and
`dual_kd_binding.cpp` (the torch binding). The build is cached by torch in
`$TORCH_EXTENSIONS_DIR/<name>` (default `~/.cache/torch_extensions/py<XY>_cu<ZZZ>/<name>`) and
rebuilt only when a source changes; concurrent ranks wait on torch's build lock. The target
GPU architectures are those of the visible GPUs, or `TORCH_CUDA_ARCH_LIST` when set (needed
to build on a machine without a GPU, e.g. `TORCH_CUDA_ARCH_LIST=9.0`).

The toolkit is the first of $CUDA_HOME, $CUDA_PATH, torch's guess, /usr/local/cuda and the
real location of `nvcc` that has both bin/nvcc and include/cuda_runtime.h (torch's own guess
is the parent of the `nvcc` on PATH, which has no headers when that is /usr/local/bin/nvcc).
Where none is found, `load_extension` raises `ExtensionUnavailable` (a
`FastKDError`); the custom op then falls back to its PyTorch maths on the GPU, with one warning
(see `fastkd.kernels.op`). A compiler error is never hidden: it raises `FastKDError` with the
build log's tail.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType

from fastkd.errors import FastKDError

SOURCE_DIR = Path(__file__).resolve().parent
CUDA_SOURCE = SOURCE_DIR / "dual_kd_loss.cu"
BINDING_SOURCE = SOURCE_DIR / "dual_kd_binding.cpp"
EXTENSION_NAME = "fastkd_dual_kd_loss"
NVCC_FLAGS = ["-O3", "-std=c++17"]  # no --use_fast_math: expf/logf accuracy is part of the contract

_lock = threading.Lock()
_extension: ModuleType | None = None


class ExtensionUnavailable(FastKDError):
    """No CUDA toolkit to build the fused loss with (not a build failure)."""


def _has_toolkit(root: str | os.PathLike | None) -> bool:
    return root is not None and (Path(root) / "include" / "cuda_runtime.h").is_file() and any(
        (Path(root) / "bin" / nvcc).is_file() for nvcc in ("nvcc", "nvcc.exe")
    )


def find_cuda_home() -> str | None:
    """A CUDA toolkit root with bin/nvcc and include/cuda_runtime.h, or None.

    torch guesses CUDA_HOME as the parent of the `nvcc` on PATH; where that is a bare
    /usr/local/bin/nvcc (headers under /usr/local/cuda/include), its guess has no headers, so
    the usual places are tried too: $CUDA_HOME, $CUDA_PATH, torch's guess, /usr/local/cuda, the
    real location of `nvcc`.
    """
    import shutil

    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    return next((str(c) for c in candidates if _has_toolkit(c)), None)


def load_extension(verbose: bool = False) -> ModuleType:
    """The compiled extension module (built and cached on the first call of the process)."""
    global _extension
    if _extension is not None:
        return _extension
    with _lock:
        if _extension is not None:
            return _extension
        from torch.utils import cpp_extension

        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise ExtensionUnavailable(
                "fastkd fused loss: no CUDA toolkit (bin/nvcc + include/cuda_runtime.h; set CUDA_HOME) "
                f"to build {CUDA_SOURCE.name}; set FASTKD_LOSS_IMPL=reference to use the PyTorch reference"
            )
        cpp_extension.CUDA_HOME = cuda_home  # what load() joins include/ and bin/nvcc to
        try:
            _extension = cpp_extension.load(
                name=EXTENSION_NAME,
                sources=[str(BINDING_SOURCE), str(CUDA_SOURCE)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=NVCC_FLAGS,
                verbose=verbose or os.environ.get("FASTKD_VERBOSE_BUILD") == "1",
            )
        except Exception as exc:  # the compiler's message is in exc; keep its tail readable
            message = str(exc).strip()[-4000:]
            raise FastKDError(
                f"fastkd fused loss: building {CUDA_SOURCE.name} failed: {message}\n"
                "set FASTKD_LOSS_IMPL=reference to train with the PyTorch reference meanwhile"
            ) from exc
        return _extension
