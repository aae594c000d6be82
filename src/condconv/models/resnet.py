"""ResNet-18 and ResNet-50 (He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385; v1.5,
the stride on the bottleneck's 3x3 convolution) with the CondConv placement of Yang et al., "CondConv:
Conditionally Parameterized Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971.

Default placement: every convolution of the last stage (stride 32), projection shortcut included; classifier
static. For ResNet-50 that is the paper's 4093M -> 4213M multiply-adds with 8 experts (README). The ``_cifar``
variants have a 3x3 stride-1 stem and no max-pool.
"""

from __future__ import annotations

from torch import nn

from condconv.models.blocks import Architecture, BasicBlock, Bottleneck, Placement, ResStage
from condconv.models.registry import register_family

__all__ = ["RESNET18", "RESNET50", "resnet18", "resnet18_cifar", "resnet50", "resnet50_cifar"]


def _resnet(block: type, repeats: tuple[int, int, int, int]) -> Architecture:
    stages = tuple(ResStage(block, 64 * 2**i, n, 1 if i == 0 else 2) for i, n in enumerate(repeats))
    return Architecture(stages=stages, placement=Placement.last_stages(stages, 1), stem_channels=64, stem_kernel=7,
                        stem_pool=True, act_layer=nn.ReLU)


RESNET18 = _resnet(BasicBlock, (2, 2, 2, 2))
RESNET50 = _resnet(Bottleneck, (3, 4, 6, 3))

resnet18, resnet18_cifar = register_family(
    "resnet18", RESNET18.build, "ResNet-18: 7x7 stem + max-pool, 4 stages of 2 basic blocks (dropout 0 by default).")
resnet50, resnet50_cifar = register_family(
    "resnet50", RESNET50.build,
    "ResNet-50: 7x7 stem + max-pool, bottleneck stages of 3, 4, 6, 3 blocks (dropout 0 by default).")
