"""The frozen teacher made cheaper to run: BatchNorm folded into the convolutions before it, and
its weights kept in the autocast dtype.

    teacher, folded = fold_batchnorm(teacher)            # conv -> BN pairs become one conv
    teacher = as_frozen_teacher(teacher, torch.device("cuda"), torch.bfloat16, channels_last=True)

The teacher only runs in eval mode under no_grad, so each BatchNorm is an affine map per channel
with fixed statistics, y = (x - mean) / sqrt(var + eps) * gamma + beta, and folding it into the
convolution before it is exact maths: w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma /
sqrt(var + eps) + beta (torch.nn.utils.fusion.fuse_conv_bn_eval). A ResNet-50 loses its 53 BN
kernels per forward (and the launches of an eager step). With no BatchNorm left, the weights are
cast once to the autocast dtype (bf16 on CUDA), so autocast stops casting ~160 fp32 weights to
bf16 at every step. Logits stay fp32 (TrainStep casts them), and numbers differ from the
unfolded teacher only by the rounding of the folded weights.

Folding finds conv -> BN pairs by tracing the network with torch.fx (torchvision's ResNets and
MobileNets trace; a network that does not trace, or whose BN follows no convolution, keeps
those BNs, and then its weights stay fp32, since BatchNorm wants fp32 parameters).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _parent(gm: torch.fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    *path, name = target.split(".")
    module = gm
    for part in path:
        module = getattr(module, part)
    return module, name


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """(a copy of the eval-mode `model` with each BatchNorm that directly follows a convolution
    folded into it, the number folded). A model that torch.fx cannot trace comes back as it
    is, with 0. The model itself is never modified."""
    try:  # a GraphModule shares its leaf modules with the traced model: trace a copy
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception:  # data-dependent control flow: keep the network as it is
        return model, 0
    gm = gm.eval()
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS):
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), _CONVS) and len(source.users) == 1):  # fmt: skip
            continue  # the conv's output is used elsewhere too: folding would change that use
        conv, norm = modules[source.target], modules[node.target]
        if not norm.track_running_stats or norm.running_mean is None:
            continue  # batch statistics even in eval: not an affine map
        parent, name = _parent(gm, source.target)
        setattr(parent, name, fuse_conv_bn_eval(conv, norm))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def as_frozen_teacher(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                      channels_last: bool) -> nn.Module:  # fmt: skip
    """The teacher as the step runs it: BN folded, eval mode, no gradients, on `device` in
    `channels_last` memory format, its weights in `amp_dtype` when no BatchNorm is left (and
    fp32 otherwise, or without autocast)."""
    model, _ = fold_batchnorm(model.eval())
    model = model.eval().requires_grad_(False).to(device)
    if amp_dtype is not None and not has_batchnorm(model):
        model = model.to(amp_dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
