"""The model zoo: MobileNetV1/V2/V3 (Small, Large), MnasNet-A1, EfficientNet-B0, ResNet-10/18/34/50/101 (and
``*_cifar`` 32x32 variants), each with static, CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971), DynamicConv
(Chen et al., CVPR 2020, arXiv:1912.03458) and ODConv (Li et al., ICLR 2022, arXiv:2209.07947) convolutions; and the
papers' models by name (:mod:`condconv.models.presets`: ``condconv_*``, ``dy_*``, ``odconv_*``).

Example:
    >>> from condconv.models import create_model
    >>> model = create_model("mobilenet_v1_cifar", num_classes=10, conv="condconv", num_experts=4)
"""

from condconv.models import (  # noqa: F401 (registers)
    efficientnet,
    kernelwarehouse,
    mnasnet,
    mobilenet_v1,
    mobilenet_v2,
    mobilenet_v3,
    presets,
    resnet,
)
from condconv.models.blocks import ConvNet, FeatureInfo
from condconv.models.registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "is_model", "ConvNet", "FeatureInfo"]
