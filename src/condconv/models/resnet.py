"""ResNet-10, -18, -34, -50 and -101 (He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385;
v1.5, the stride on the bottleneck's 3x3 convolution, as torchvision and the official ODConv code) with the CondConv
placement of Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference", NeurIPS
2019, arXiv:1904.04971.

Default placement: every convolution of the last stage (stride 32), projection shortcut included
(``dynamic_shortcut=False`` keeps it a static convolution); classifier static. For ResNet-50 that is the paper's
4093M -> 4213M multiply-adds with 8 experts (README). ResNet-10 (one basic block per stage) is the small ResNet of
the DynamicConv paper (Chen et al., CVPR 2020, arXiv:1912.03458). The ``_cifar`` variants have a 3x3 stride-1 stem
and no max-pool.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from condconv.models.architecture import Architecture, Placement, ResStage
from condconv.models.blocks import BasicBlock, Bottleneck
from condconv.models.registry import register_family

__all__ = ["RESNET10", "RESNET18", "RESNET34", "RESNET50", "RESNET101", "resnet_v1", "resnet10", "resnet10_cifar",
           "resnet18", "resnet18_cifar", "resnet34", "resnet34_cifar", "resnet50", "resnet50_cifar", "resnet101",
           "resnet101_cifar"]


def _resnet(block: type, repeats: tuple[int, int, int, int]) -> Architecture:
    stages = tuple(ResStage(block, 64 * 2**i, n, 1 if i == 0 else 2) for i, n in enumerate(repeats))
    return Architecture(stages=stages, placement=Placement.last_stages(stages, 1), stem_channels=64, stem_kernel=7,
                        stem_pool=True, act_layer=nn.ReLU)


def resnet_v1(architecture: Architecture) -> Architecture:
    """The same ResNet with bottlenecks in the original v1 layout (stride on the first 1x1 convolution).

    Not registered: published cost tables that count ResNet-50/101 at 3.86G/7.57G multiply-adds (the ODConv README)
    counted this layout; :func:`condconv.models.papers.paper_table` uses it to reproduce them.
    """
    return replace(architecture, stages=tuple(replace(stage, stride_on_1x1=True) for stage in architecture.stages))


RESNET10 = _resnet(BasicBlock, (1, 1, 1, 1))
RESNET18 = _resnet(BasicBlock, (2, 2, 2, 2))
RESNET34 = _resnet(BasicBlock, (3, 4, 6, 3))
RESNET50 = _resnet(Bottleneck, (3, 4, 6, 3))
RESNET101 = _resnet(Bottleneck, (3, 4, 23, 3))

resnet10, resnet10_cifar = register_family(
    "resnet10", RESNET10.build,
    "ResNet-10: 7x7 stem + max-pool, 4 stages of 1 basic block (dropout 0 by default).")
resnet18, resnet18_cifar = register_family(
    "resnet18", RESNET18.build, "ResNet-18: 7x7 stem + max-pool, 4 stages of 2 basic blocks (dropout 0 by default).")
resnet34, resnet34_cifar = register_family(
    "resnet34", RESNET34.build,
    "ResNet-34: 7x7 stem + max-pool, basic-block stages of 3, 4, 6, 3 blocks (dropout 0 by default).")
resnet50, resnet50_cifar = register_family(
    "resnet50", RESNET50.build,
    "ResNet-50: 7x7 stem + max-pool, bottleneck stages of 3, 4, 6, 3 blocks (dropout 0 by default).")
resnet101, resnet101_cifar = register_family(
    "resnet101", RESNET101.build,
    "ResNet-101: 7x7 stem + max-pool, bottleneck stages of 3, 4, 23, 3 blocks (dropout 0 by default).")
