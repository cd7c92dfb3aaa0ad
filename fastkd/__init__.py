"""fastkd: fast uncertainty-aware dual-student knowledge distillation.

One frozen teacher and two heterogeneous students trained at once (Gore, Dey & Mishra,
arXiv 2511.18826), with prepacked data, GPU-side decode, channels-last mixed precision and a
fused CUDA distillation loss. Entry points: the `fastkd` command (fastkd.cli) and, from Python,
`fastkd.fit(...)`, `fastkd.Trainer` and `fastkd.TrainConfig` (loaded on first use, so `import
fastkd` stays light).
"""

__version__ = "0.1.0"

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
