"""``init='official'``: the dynamic layers, routers and models initialised as the papers' official code does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import condconv
from condconv import CondConv2d, DynamicConv2d, ODConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _std_close(tensor: torch.Tensor, expected: float, rel: float = 0.03) -> None:
    assert tensor.float().std().item() == pytest.approx(expected, rel=rel)
    assert tensor.float().mean().item() == pytest.approx(0.0, abs=4 * expected / math.sqrt(tensor.numel()))


def test_condconv_official_init():
    """tensorflow/tpu: each expert N(0, sqrt(2 / fan_out)), fan_out = kh * kw * C_out / groups; Glorot router."""
    torch.manual_seed(0)
    layer = CondConv2d(64, 128, 3, num_experts=8, init="official")
    for expert in layer.weight:
        _std_close(expert, math.sqrt(2 / (9 * 128)))
    assert torch.count_nonzero(layer.bias) == 0
    bound = math.sqrt(6 / (64 + 8))  # Glorot uniform: fan_in 64, fan_out 8
    weight = layer.router.fc.weight
    assert weight.abs().max() <= bound and weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.08)
    assert torch.count_nonzero(layer.router.fc.bias) == 0
    depthwise = CondConv2d(256, 256, 3, groups=256, num_experts=4, init="official")
    for expert in depthwise.weight:  # TensorFlow's depthwise fan-out is kh * kw * depth_multiplier
        _std_close(expert, math.sqrt(2 / 9))
    default = CondConv2d(64, 128, 3, num_experts=2)
    assert default.init == "default" and default.router.fc.bias.abs().sum() > 0
    _std_close(default.weight[0], 1 / math.sqrt(3 * 64 * 9))  # nn.Conv2d's: kaiming_uniform(a=sqrt(5)), fan-in


@pytest.mark.parametrize("cls", [DynamicConv2d, ODConv2d])
def test_he_fan_out_official_init(cls):
    """OSVAI/ODConv: kaiming_normal_(weight[i], mode='fan_out') per expert; attention He fan-out, zero biases."""
    torch.manual_seed(0)
    layer = cls(256, 128, 3, num_experts=4, init="official")
    for expert in layer.weight:
        _std_close(expert, math.sqrt(2 / (128 * 9)))
    depthwise = cls(256, 256, 3, groups=256, num_experts=4, init="official")
    for expert in depthwise.weight:  # PyTorch's fan-out of one expert ignores the groups
        _std_close(expert, math.sqrt(2 / (256 * 9)), rel=0.06)
    linears = [m for m in layer.router.modules() if isinstance(m, nn.Linear)]
    assert linears and all(torch.count_nonzero(m.bias) == 0 for m in linears if m.bias is not None)
    big = max(linears, key=lambda m: m.weight.numel())
    _std_close(big.weight, math.sqrt(2 / big.out_features), rel=0.05)


def test_official_init_bad_value():
    with pytest.raises(ValueError, match="init must be one of"):
        ODConv2d(8, 8, 3, init="he")
    with pytest.raises(ValueError, match="init must be one of"):
        condconv.SoftmaxRouter(8, 4, init="glorot")
