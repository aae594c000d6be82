"""MobileNetV3-Small and -Large (Howard et al., "Searching for MobileNetV3", ICCV 2019, arXiv:1905.02244) with the
placement of dynamic convolution of Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR
2020, arXiv:1912.03458 (DY-MobileNetV3-Small).

The architecture is the paper's final tables (Table 1 and 2), as torchvision and timm build them: a 3x3 stride-2
stem with hard-swish; inverted residual blocks with ReLU in the first stages and hard-swish after; squeeze-excite on
the expanded channels, reduced to ``make_divisible(hidden / 4)`` with ReLU and a hard-sigmoid gate; the last 1x1
convolution (576 / 960 channels, BatchNorm, hard-swish); global pooling; the 1x1 "conv head" to 1024 / 1280 without
BatchNorm (hard-swish, here a linear layer on the pooled features); dropout 0.2; the classifier. At 224x224 with
1000 classes this reproduces torchvision's ``mobilenet_v3_small`` (2,542,856 parameters) and ``mobilenet_v3_large``
(5,483,032) exactly; this library counts 56.5M / 216.6M multiply-adds in convolutions and linear layers, 57.1M /
217.8M with pooling and squeeze-excite gating (the paper: 56M / 219M; torchvision: 0.06 / 0.22 GFLOPS).

Default placement (DynamicConv's, as its DY-MobileNetV3-Small parameter count pins it down): every convolution of
the blocks and the last 1x1 convolution; stem, squeeze-excite, pre-logits layer and classifier static (see
:mod:`condconv.models.presets` for the figures).
"""

from __future__ import annotations

from torch import nn

from condconv.models.architecture import Architecture, MBStage, Placement
from condconv.models.blocks import SEStyle
from condconv.models.registry import register_family

__all__ = ["MOBILENET_V3_SMALL", "MOBILENET_V3_LARGE", "mobilenet_v3_small", "mobilenet_v3_small_cifar",
           "mobilenet_v3_large", "mobilenet_v3_large_cifar"]

_RE, _HS = nn.ReLU, nn.Hardswish
_SE = 0.25  # of the expanded width


def _row(channels: int, kernel: int, hidden: int, stride: int, act, se: bool = False, repeats: int = 1) -> MBStage:
    return MBStage(channels, repeats, stride, kernel, se_ratio=_SE if se else 0.0, hidden_channels=hidden,
                   act_layer=act)


_SMALL = (  # channels, kernel, expanded width, stride, activation, squeeze-excite
    _row(16, 3, 16, 2, _RE, se=True),
    _row(24, 3, 72, 2, _RE),
    _row(24, 3, 88, 1, _RE),
    _row(40, 5, 96, 2, _HS, se=True),
    _row(40, 5, 240, 1, _HS, se=True, repeats=2),
    _row(48, 5, 120, 1, _HS, se=True),
    _row(48, 5, 144, 1, _HS, se=True),
    _row(96, 5, 288, 2, _HS, se=True),
    _row(96, 5, 576, 1, _HS, se=True, repeats=2),
)
_LARGE = (
    _row(16, 3, 16, 1, _RE),
    _row(24, 3, 64, 2, _RE),
    _row(24, 3, 72, 1, _RE),
    _row(40, 5, 72, 2, _RE, se=True),
    _row(40, 5, 120, 1, _RE, se=True, repeats=2),
    _row(80, 3, 240, 2, _HS),
    _row(80, 3, 200, 1, _HS),
    _row(80, 3, 184, 1, _HS, repeats=2),
    _row(112, 3, 480, 1, _HS, se=True),
    _row(112, 3, 672, 1, _HS, se=True),
    _row(160, 5, 672, 2, _HS, se=True),
    _row(160, 5, 960, 1, _HS, se=True, repeats=2),
)
_SE_STYLE = SEStyle(of_hidden=True, act_layer=nn.ReLU, gate_layer=nn.Hardsigmoid)


def _mobilenet_v3(stages: tuple[MBStage, ...], head: int, pre_logits: int) -> Architecture:
    placement = Placement(blocks=sum(s.repeats for s in stages), head=True)
    return Architecture(stages=stages, placement=placement, stem_channels=16,
                        head_channels=head, act_layer=_RE, dropout=0.2, stem_act=_HS, head_act=_HS,
                        pre_logits_channels=pre_logits, pre_logits_act=_HS, se_style=_SE_STYLE)


MOBILENET_V3_SMALL = _mobilenet_v3(_SMALL, 576, 1024)
MOBILENET_V3_LARGE = _mobilenet_v3(_LARGE, 960, 1280)

mobilenet_v3_small, mobilenet_v3_small_cifar = register_family(
    "mobilenet_v3_small", MOBILENET_V3_SMALL.build,
    "MobileNetV3-Small: 3x3 stem, 11 inverted residual blocks (ReLU, then hard-swish; squeeze-excite with a "
    "hard-sigmoid gate), 1x1 convolution to 576, pooling, pre-logits layer to 1024, classifier (dropout 0.2).")
mobilenet_v3_large, mobilenet_v3_large_cifar = register_family(
    "mobilenet_v3_large", MOBILENET_V3_LARGE.build,
    "MobileNetV3-Large: 3x3 stem, 15 inverted residual blocks (ReLU, then hard-swish; squeeze-excite with a "
    "hard-sigmoid gate), 1x1 convolution to 960, pooling, pre-logits layer to 1280, classifier (dropout 0.2).")
