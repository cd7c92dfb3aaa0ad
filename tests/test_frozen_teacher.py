"""The frozen teacher's BatchNorm folded into its convolutions (fastkd.frozen_teacher): the same
function in float64, no BatchNorm left in torchvision's ResNets and MobileNets, weights in the
autocast dtype only when nothing needs fp32, and networks it cannot fold left as they are."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fastkd.frozen_teacher import as_frozen_teacher, fold_batchnorm, has_batchnorm
from test_train_support import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN layers with random running statistics and affine parameters (never the identity a
    fresh BN is, which would fold to nothing and prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
    return model.eval()


@pytest.mark.parametrize("arch, count", [("resnet18", 20), ("mobilenet_v2", 52)])
def test_folding_is_exact_in_float64_and_leaves_no_batchnorm(arch, count):
    torch.manual_seed(0)
    model = random_statistics(getattr(torchvision.models, arch)(num_classes=10).double())
    folded, n = fold_batchnorm(model)
    assert n == count and not has_batchnorm(folded)
    assert has_batchnorm(model)  # the original is untouched
    x = torch.randn(3, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


class NormFirst(nn.Module):
    """A BN that follows no convolution (kept), then conv -> BN (folded)."""

    def __init__(self):
        super().__init__()
        self.norm_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.norm_in(x))).mean(dim=(2, 3))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # control flow on a value: torch.fx cannot trace it


def test_batchnorm_after_no_conv_is_kept_and_weights_stay_fp32():
    model = random_statistics(NormFirst())
    frozen = as_frozen_teacher(model, torch.device("cpu"), torch.bfloat16, channels_last=True)
    assert [type(m) for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)] == [nn.BatchNorm2d]
    assert all(p.dtype == torch.float32 for p in frozen.parameters())  # BN wants fp32: no cast
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-6)


def test_untraceable_network_is_returned_unchanged():
    model = DataDependent().eval()
    folded, n = fold_batchnorm(model)
    assert n == 0 and folded is model


def test_frozen_teacher_is_eval_no_grad_channels_last_in_the_autocast_dtype():
    model = random_statistics(torchvision.models.resnet18(num_classes=10))
    frozen = as_frozen_teacher(model, torch.device("cpu"), torch.bfloat16, channels_last=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the given module is untouched
    assert not frozen.training and not has_batchnorm(frozen)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen.parameters())
    conv = next(m for m in frozen.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # bf16 weights and input: every op in bf16, as under CUDA autocast
        want, got = model.eval()(x), frozen(x.to(torch.bfloat16)).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16 rounding only
