"""The fused distillation loss: CUDA sources (dual_kd_loss.cu, dual_kd_binding.cpp), their
on-demand build (`build`) and the custom op `torch.ops.fastkd.dual_kd_loss` (`op`).

Importing this package registers the op; the CUDA extension is built only when the op first
runs on a CUDA tensor (or when `load_extension()` is called, e.g. before a CUDA-graph capture).
"""

from fastkd.kernels.build import ExtensionUnavailable, load_extension
from fastkd.kernels.op import dual_kd_loss, dual_kd_loss_torch

__all__ = ["ExtensionUnavailable", "dual_kd_loss", "dual_kd_loss_torch", "load_extension"]
