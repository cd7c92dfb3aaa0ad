"""fastkd: fast uncertainty-aware dual-student knowledge distillation.

One frozen teacher and two heterogeneous students trained at once (Gore, Dey & Mishra,
arXiv 2511.18826), with prepacked data, GPU-side decode, channels-last mixed precision and a
fused CUDA distillation loss. Entry point: the `fastkd` command (fastkd.cli).
"""

__version__ = "0.1.0"
