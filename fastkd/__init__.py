"""fastkd: fast uncertainty-aware dual-student knowledge distillation.

One frozen teacher and two heterogeneous students trained at once (Gore, Dey & Mishra,
arXiv 2511.18826), with prepacked data, GPU-side decode, channels-last mixed precision and a
fused CUDA distillation loss. Entry points: the `fastkd` command (fastkd.cli) and, from Python,
`fastkd.fit(...)`, `fastkd.Trainer` and `fastkd.TrainConfig` (loaded on first use, so `import
fastkd` stays light).
"""

__version__ = "0.1.0"

from fastkd import nvjpeg_library as _nvjpeg_library  # noqa: E402  (ctypes only, ~10 ms)

# Before any fastkd module imports torchvision (whose bundled nvJPEG 13.0 would otherwise take the
# libnvjpeg.so.13 soname): map the carried nvidia-nvjpeg wheel's, 13.2 or newer, see that module.
_nvjpeg_library.preload()

from fastkd import short_tempdir as _short_tempdir  # noqa: E402  (os and sys only, unless $TMPDIR is long)

# Before any DataLoader worker or Pool starts: a long $TMPDIR makes multiprocessing's AF_UNIX
# socket paths too long and the workers hang; see that module.
_short_tempdir.ensure()

__all__ = ["fit", "Trainer", "TrainConfig", "make_config"]


def __getattr__(name: str):
    if name in ("fit", "make_config"):
        from fastkd import api

        return getattr(api, name)
    if name == "Trainer":
        from fastkd.train import Trainer

        return Trainer
    if name == "TrainConfig":
        from fastkd.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
