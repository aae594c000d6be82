"""EfficientNet-B0 and -B1 (Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
arXiv:1905.11946) with the CondConv placement of Yang et al., "CondConv: Conditionally Parameterized Convolutions
for Efficient Inference", NeurIPS 2019, arXiv:1904.04971.

Default placement, as the official EfficientNet-CondConv code: the blocks of the last three stages (8 blocks) with
one sigmoid routing per block, computed on the block input and shared by its expand, depthwise and project
convolutions; squeeze-excite, head and classifier static. 391M -> 402M (4 experts) / 413M (8 experts).

EfficientNet-B1 is B0 with every stage's repeats times 1.1, rounded up (2, 3, 3, 4, 4, 5, 2 blocks: 23), the same
widths, 240x240 inputs; its CondConv placement is again the last three stages (11 blocks), as the EfficientNet-CondConv
B1 of the official code and of timm's ``tf_efficientnet_cc_b1_8e``.
"""

from __future__ import annotations

import math
from dataclasses import replace

from torch import nn

from condconv.models.architecture import Architecture, MBStage, Placement
from condconv.models.registry import register_family

__all__ = ["EFFICIENTNET_B0", "EFFICIENTNET_B1", "efficientnet_b0", "efficientnet_b0_cifar", "efficientnet_b1",
           "efficientnet_b1_cifar"]

_STAGES = (  # channels, repeats, stride, kernel, expansion, squeeze-excite ratio (of the block input)
    MBStage(16, 1, 1, 3, 1, 0.25),
    MBStage(24, 2, 2, 3, 6, 0.25),
    MBStage(40, 2, 2, 5, 6, 0.25),
    MBStage(80, 3, 2, 3, 6, 0.25),
    MBStage(112, 3, 1, 5, 6, 0.25),
    MBStage(192, 4, 2, 5, 6, 0.25),
    MBStage(320, 1, 1, 3, 6, 0.25),
)
EFFICIENTNET_B0 = Architecture(
    stages=_STAGES,
    placement=Placement.last_stages(_STAGES, 3, shared_routing=True),
    head_channels=1280,
    act_layer=nn.SiLU,
    dropout=0.2,
)

efficientnet_b0, efficientnet_b0_cifar = register_family(
    "efficientnet_b0", EFFICIENTNET_B0.build,
    "EfficientNet-B0: 3x3 stem, 16 MBConv blocks with squeeze-excite (SiLU), 1x1 head to 1280 channels, "
    "classifier (dropout 0.2 by default; the paper's CondConv models use 0.25).")


def _deeper(architecture: Architecture, depth_mult: float) -> Architecture:
    """The architecture with each stage's repeats times ``depth_mult``, rounded up (EfficientNet's depth scaling)."""
    stages = tuple(replace(stage, repeats=int(math.ceil(stage.repeats * depth_mult))) for stage in architecture.stages)
    return replace(architecture, stages=stages, placement=Placement.last_stages(stages, 3, shared_routing=True))


EFFICIENTNET_B1 = _deeper(EFFICIENTNET_B0, 1.1)

efficientnet_b1, efficientnet_b1_cifar = register_family(
    "efficientnet_b1", EFFICIENTNET_B1.build,
    "EfficientNet-B1: EfficientNet-B0 with 1.1x the blocks per stage, rounded up (23 blocks; 240x240 inputs in the "
    "paper), dropout 0.2 by default.")
