"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", arXiv:1801.04381) with
the CondConv placement of Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient
Inference", NeurIPS 2019, arXiv:1904.04971.

Default placement: the blocks of the last three stages (7 blocks, as for EfficientNet and MnasNet), the 1x1 head
convolution and the classifier; the paper's 301M -> 329M multiply-adds with 8 experts (README).
"""

from __future__ import annotations

from torch import nn

from condconv.models.architecture import Architecture, MBStage, Placement
from condconv.models.registry import register_family

__all__ = ["MOBILENET_V2", "mobilenet_v2", "mobilenet_v2_cifar"]

_STAGES = (  # channels, repeats, stride, kernel, expansion
    MBStage(16, 1, 1, 3, 1),
    MBStage(24, 2, 2, 3, 6),
    MBStage(32, 3, 2, 3, 6),
    MBStage(64, 4, 2, 3, 6),
    MBStage(96, 3, 1, 3, 6),
    MBStage(160, 3, 2, 3, 6),
    MBStage(320, 1, 1, 3, 6),
)
MOBILENET_V2 = Architecture(
    stages=_STAGES,
    placement=Placement.last_stages(_STAGES, 3, head=True, classifier=True),
    head_channels=1280,
    head_min_width=1.0,
    act_layer=nn.ReLU6,
    dropout=0.2,
)

mobilenet_v2, mobilenet_v2_cifar = register_family(
    "mobilenet_v2", MOBILENET_V2.build,
    "MobileNetV2: 3x3 stem, 17 inverted residual blocks (ReLU6), 1x1 head to 1280 channels (kept below width 1), "
    "classifier (dropout 0.2 by default).")
