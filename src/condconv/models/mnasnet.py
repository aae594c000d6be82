"""MnasNet-A1 (Tan et al., "MnasNet: Platform-Aware Neural Architecture Search for Mobile", arXiv:1807.11626)
with the CondConv placement of Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient
Inference", NeurIPS 2019, arXiv:1904.04971.

Default placement, as EfficientNet's (the official TPU code shares it): the last three stages (6 blocks), one
sigmoid routing per block shared by the block's convolutions; head and classifier static. The paper's
312M -> 325M multiply-adds with 8 experts (README).
"""

from __future__ import annotations

from torch import nn

from condconv.models.architecture import Architecture, MBStage, Placement
from condconv.models.registry import register_family

__all__ = ["MNASNET_A1", "mnasnet_a1", "mnasnet_a1_cifar"]

_STAGES = (  # channels, repeats, stride, kernel, expansion, squeeze-excite ratio (of the block input)
    MBStage(16, 1, 1, 3, 1, skip=False),  # SepConv
    MBStage(24, 2, 2, 3, 6),
    MBStage(40, 3, 2, 5, 3, 0.25),
    MBStage(80, 4, 2, 3, 6),
    MBStage(112, 2, 1, 3, 6, 0.25),
    MBStage(160, 3, 2, 5, 6, 0.25),
    MBStage(320, 1, 1, 3, 6),
)
MNASNET_A1 = Architecture(
    stages=_STAGES,
    placement=Placement.last_stages(_STAGES, 3, shared_routing=True),
    head_channels=1280,
    act_layer=nn.ReLU,
    dropout=0.2,
)

mnasnet_a1, mnasnet_a1_cifar = register_family(
    "mnasnet_a1", MNASNET_A1.build,
    "MnasNet-A1: 3x3 stem, SepConv, 16 MBConv blocks (some with squeeze-excite), 1x1 head to 1280 channels, "
    "classifier (dropout 0.2 by default).")
