"""MobileNetV1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", arXiv:1704.04861) with the CondConv placement of Yang et al., "CondConv: Conditionally
Parameterized Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971.

Default placement: the last 7 depthwise-separable blocks (blocks 7-13: the five 512-channel blocks at stride 16
that follow the strided one, and the two 1024-channel blocks) and the classifier. This reproduces both of the
paper's cost figures: 567M -> 600M multiply-adds with 8 experts at width 1.0, and +27% with 32 experts at
width 0.5 (README, MAC table).
"""

from __future__ import annotations

from torch import nn

from condconv.models.architecture import Architecture, MBStage, Placement
from condconv.models.registry import register_family

__all__ = ["MOBILENET_V1", "mobilenet_v1", "mobilenet_v1_cifar"]

# Depthwise-separable blocks: depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU, no residual.
_SEPARABLE = {"expand_ratio": 1.0, "project_act": True, "skip": False}
MOBILENET_V1 = Architecture(
    stages=(  # channels, repeats, stride of the first block
        MBStage(64, 1, 1, **_SEPARABLE),
        MBStage(128, 2, 2, **_SEPARABLE),
        MBStage(256, 2, 2, **_SEPARABLE),
        MBStage(512, 6, 2, **_SEPARABLE),
        MBStage(1024, 2, 2, **_SEPARABLE),
    ),
    placement=Placement(blocks=7, classifier=True),
    act_layer=nn.ReLU,
)

mobilenet_v1, mobilenet_v1_cifar = register_family(
    "mobilenet_v1", MOBILENET_V1.build,
    "MobileNetV1: 3x3 stem, 13 depthwise-separable blocks, classifier on 1024 channels (widths 0.25-1.0 in the "
    "paper's study; dropout 0 by default).")
