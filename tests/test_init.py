"""``init='official'``: the dynamic layers, routers and models initialised as the papers' official code does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import condconv
from condconv import CondConv2d, DynamicConv2d, ODConv2d
from condconv.models import create_model

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


def test_model_official_init_static_layers():
    """CondConv models: TensorFlow's initialisers for the static layers too; ODConv models: PyTorch's."""
    torch.manual_seed(0)
    effnet = create_model("efficientnet_b0", conv="condconv", num_experts=4, init="official")
    stem = effnet.stem.conv.weight  # 3x3, 32 filters: fan_out = 9 * 32
    _std_close(stem, math.sqrt(2 / (9 * 32)), rel=0.1)
    depthwise = effnet.blocks[4].depthwise.conv.weight  # a static depthwise 5x5 of 240 channels
    assert depthwise.shape == (240, 1, 5, 5)
    _std_close(depthwise, math.sqrt(2 / 25), rel=0.05)
    bound = 1 / math.sqrt(1000)
    assert effnet.head.fc.weight.abs().max() <= bound and torch.count_nonzero(effnet.head.fc.bias) == 0
    routers = [b.router for b in effnet.blocks if b.router is not None]
    assert len(routers) == 8 and all(torch.count_nonzero(r.fc.bias) == 0 for r in routers)
    odconv = create_model("resnet18", conv="odconv", dynamic_blocks="all", init="official")
    _std_close(odconv.stem.conv.weight, math.sqrt(2 / (64 * 49)), rel=0.05)
    assert odconv.head.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert all(m.init == "official" for m in odconv.modules() if isinstance(m, ODConv2d))
    default = create_model("resnet18", conv="odconv", dynamic_blocks="all")
    assert all(m.init == "default" for m in default.modules() if isinstance(m, ODConv2d))
