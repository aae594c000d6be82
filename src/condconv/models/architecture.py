"""Architectures as data: stage tables, the paper's placement of dynamic layers, and the model builder.

A family is an :class:`Architecture`: a tuple of :class:`MBStage` (MobileNetV1/V2/V3, MnasNet, EfficientNet) or
:class:`ResStage` (ResNet) rows plus a :class:`Placement`, the default position of the dynamic layers of Yang et
al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971.
:meth:`Architecture.build` turns it into a :class:`condconv.models.blocks.ConvNet` with any convolution kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from condconv.models.blocks import (
    SE_DEFAULT,
    STATIC,
    ActLayer,
    ConvBnAct,
    ConvNet,
    ConvSpec,
    MBConv,
    SEStyle,
    check_width,
    make_conv_spec,
    make_divisible,
    resolve_dynamic_blocks,
)
from condconv.nn.routing import INITS
from condconv.utils.checks import positive_int, probability

__all__ = ["BlockOptions", "MBStage", "ResStage", "scale_stages", "Placement", "Architecture"]


@dataclass(frozen=True)
class BlockOptions:
    """Family-wide block options; each stage type takes the ones that apply to its blocks.

    Attributes:
        se_style: how :class:`MBConv` blocks size and gate their squeeze-excite.
        dynamic_shortcut: a residual block's projection shortcut is of the block's kind (True) or static (False).
    """

    se_style: SEStyle = SE_DEFAULT
    dynamic_shortcut: bool = True


_DEFAULT_OPTIONS = BlockOptions()


@dataclass(frozen=True)
class MBStage:
    """A stage of :class:`MBConv` blocks (MobileNetV1/V2/V3, MnasNet, EfficientNet tables).

    Attributes:
        channels: output channels. repeats: blocks. stride: stride of the first block.
        kernel_size, expand_ratio, se_ratio, skip, project_act, hidden_channels: as :class:`MBConv`
            (``hidden_channels``, the expanded width at width 1, is scaled with the channels).
        act_layer: this stage's activation (``None``: the architecture's; MobileNetV3 mixes ReLU and hard-swish).
    """

    channels: int
    repeats: int
    stride: int
    kernel_size: int = 3
    expand_ratio: float = 6.0
    se_ratio: float = 0.0
    skip: bool = True
    project_act: bool = False
    hidden_channels: int | None = None
    act_layer: ActLayer | None = None

    def block(self, in_channels: int, stride: int, spec: ConvSpec, act_layer: ActLayer,
              options: BlockOptions = _DEFAULT_OPTIONS) -> MBConv:
        return MBConv(in_channels, self.channels, kernel_size=self.kernel_size, stride=stride,
                      expand_ratio=self.expand_ratio, hidden_channels=self.hidden_channels, se_ratio=self.se_ratio,
                      se_style=options.se_style, act_layer=self.act_layer or act_layer, project_act=self.project_act,
                      skip=self.skip, spec=spec)


@dataclass(frozen=True)
class ResStage:
    """A ResNet stage: ``repeats`` blocks of ``block_type`` with ``channels`` (bottleneck) width.

    ``stride_on_1x1``: bottlenecks in the v1 layout (stride on the first 1x1), used to reproduce cost figures
    counted on it; the registered ResNets are v1.5.
    """

    block_type: type
    channels: int
    repeats: int
    stride: int
    stride_on_1x1: bool = False

    def block(self, in_channels: int, stride: int, spec: ConvSpec, act_layer: ActLayer,
              options: BlockOptions = _DEFAULT_OPTIONS) -> nn.Module:
        layout = {"stride_on_1x1": True} if self.stride_on_1x1 else {}
        return self.block_type(in_channels, self.channels, stride=stride, spec=spec, act_layer=act_layer,
                               dynamic_shortcut=options.dynamic_shortcut, **layout)


def scale_stages(stages: Sequence[MBStage | ResStage], width_mult: float, divisor: int = 8) -> list:
    """The table with every stage's channels (and hidden widths) times ``width_mult``, by :func:`make_divisible`."""
    scaled = []
    for stage in stages:
        changes = {"channels": make_divisible(stage.channels * width_mult, divisor)}
        if getattr(stage, "hidden_channels", None) is not None:
            changes["hidden_channels"] = make_divisible(stage.hidden_channels * width_mult, divisor)
        scaled.append(replace(stage, **changes))
    return scaled


@dataclass(frozen=True)
class Placement:
    """A family's default placement of dynamic layers (the paper's).

    Attributes:
        blocks: the last ``blocks`` blocks are dynamic.
        head: the 1x1 head convolution is dynamic.
        classifier: the classifier is dynamic (a 1x1 dynamic convolution on the pooled features).
        shared_routing: CondConv routing computed once per block and shared by its convolutions.
        shortcut: the projection shortcut of a dynamic residual block is dynamic too.
        pre_logits: the pre-logits layer (MobileNetV3) is dynamic.
    """

    blocks: int
    head: bool = False
    classifier: bool = False
    shared_routing: bool = False
    shortcut: bool = True
    pre_logits: bool = False

    @classmethod
    def last_stages(cls, stages: Sequence[MBStage | ResStage], count: int, **kwargs) -> Placement:
        """The placement making the blocks of the last ``count`` stages dynamic."""
        return cls(blocks=sum(s.repeats for s in stages[len(stages) - count:]), **kwargs)


def _optional_bool(value: object, default: bool, name: str) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or None, got {value!r}")
    return value


def _official_init(init: object, conv: str, conv_kwargs: dict | None) -> tuple[dict | None, str]:
    """The dynamic layers' kwargs and the static layers' init scheme for a model's ``init``."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "default" or conv == "static":
        return conv_kwargs, "torch"
    if not isinstance(conv_kwargs, (dict, type(None))):
        return conv_kwargs, "torch"  # make_conv_spec reports the type error
    kwargs = dict(conv_kwargs or {})
    if kwargs.setdefault("init", init) != init:
        raise ValueError(f"conv_kwargs['init']={kwargs['init']!r} conflicts with init={init!r}")
    return kwargs, "tf" if conv == "condconv" else "torch"


@dataclass(frozen=True)
class Architecture:
    """A family's architecture as data; :meth:`build` makes the model.

    Attributes:
        stages: the stage table (channels at width 1).
        placement: the default placement of dynamic layers (the paper's).
        stem_channels: channels of the 3x3 (or ``stem_kernel``) stride-2 stem convolution. Default 32.
        stem_kernel: stem kernel size for 224x224 inputs; ``small_stem_kernel`` for 32x32 ones. Default 3.
        stem_pool: a 3x3 stride-2 max-pool after the stem (ResNet). Default False.
        head_channels: a 1x1 convolution to this width before pooling, or ``None``.
        head_min_width: the head is scaled by ``max(width_mult, head_min_width)`` (MobileNetV2 keeps 1280).
        act_layer: activation class. Default ReLU.
        dropout: default dropout before the classifier. Default 0.
        stem_act, head_act: activations of the stem and of the head convolution (``None``: ``act_layer``).
        pre_logits_channels: a layer to this width (times the width, rounded) between pooling and classifier,
            without BatchNorm (MobileNetV3), or ``None``. pre_logits_act: its activation. Default hard-swish.
        se_style: how blocks size and gate their squeeze-excite. Default: EfficientNet's.
    """

    stages: tuple[MBStage | ResStage, ...]
    placement: Placement
    stem_channels: int = 32
    stem_kernel: int = 3
    small_stem_kernel: int = 3
    stem_pool: bool = False
    head_channels: int | None = None
    head_min_width: float = 0.0
    act_layer: ActLayer = nn.ReLU
    dropout: float = 0.0
    stem_act: ActLayer | None = None
    head_act: ActLayer | None = None
    pre_logits_channels: int | None = None
    pre_logits_act: ActLayer = nn.Hardswish
    se_style: SEStyle = SE_DEFAULT

    def build(self, *, small_input: bool = False, width_mult: float = 1.0, dropout: float | None = None,
              num_classes: int = 1000, in_chans: int = 3, conv: str = "static", num_experts: int | None = None,
              dynamic_blocks: int | str | Sequence[int] | None = None, dynamic_head: bool | None = None,
              dynamic_classifier: bool | None = None, shared_routing: bool | None = None,
              dynamic_shortcut: bool | None = None, dynamic_pre_logits: bool | None = None,
              conv_kwargs: dict | None = None, init: str = "default", features_only: bool = False,
              drop_connect_rate: float = 0.0, bn_momentum: float | None = None, bn_eps: float | None = None,
              padding: str = "symmetric", out_indices: Sequence[int] | None = None, norm_eval: bool = False
              ) -> ConvNet:
        """Build the model.

        Args:
            small_input: 32x32 inputs (the ``*_cifar`` variants): stride 1 in the stem and in the next stride-2
                unit (max-pool or first strided block), so the last feature map is 4x4 (total stride 8, not 32).
            width_mult: channel multiplier of stem, stages and head (rounded to multiples of 8). Default 1.
            dropout: dropout before the classifier (``None``: the family's default).
            num_classes: classifier outputs. Default 1000.
            in_chans: input channels. Default 3.
            conv: ``'static'``, ``'condconv'``, ``'dynamic'`` or ``'odconv'``: the kind of the dynamic layers.
            num_experts: experts per dynamic layer (``None``: the layer's default).
            dynamic_blocks: which blocks are dynamic: ``None`` (the paper's placement), an int ``n`` (the last
                ``n``), ``'all'`` or a sequence of block indices.
            dynamic_head: whether the 1x1 head convolution is dynamic (``None``: the family default).
            dynamic_classifier: whether the classifier is dynamic (``None``: the family default).
            shared_routing: CondConv only: one routing per block shared by its convolutions (``None``: the family
                default).
            dynamic_shortcut: whether a dynamic residual block's projection shortcut is dynamic too (``None``: the
                family default, True; the official ODConv code keeps it a static convolution).
            dynamic_pre_logits: whether the pre-logits layer (MobileNetV3) is dynamic (``None``: the family default).
            conv_kwargs: further keyword arguments of the dynamic layers.
            init: ``'default'`` or ``'official'``: the dynamic layers and routers are built with ``init='official'``
                (see :class:`condconv.CondConv2d`, :class:`condconv.DynamicConv2d`, :class:`condconv.ODConv2d`) and
                the static layers get the initialisation of the same paper's code: TensorFlow's for CondConv (the
                official EfficientNet-CondConv code), PyTorch's (torchvision's, as the official ODConv code) for
                DynamicConv and ODConv (see ``blocks._init_weights``). A static model's is PyTorch's either way.
            features_only: no head; ``forward`` returns the five feature maps (see :attr:`ConvNet.feature_info`).
            out_indices, norm_eval: levels ``features_only`` returns; BatchNorm kept in eval mode (:class:`ConvNet`).
            drop_connect_rate: drop-connect (stochastic depth) of the residual blocks in training, rising linearly
                with the block's position as the EfficientNet code does: block ``i`` of ``n`` drops its branch with
                probability ``drop_connect_rate * i / n``. Default 0 (off).
            bn_momentum: momentum of every BatchNorm layer, in PyTorch's convention (TensorFlow's 0.99 is 0.01);
                ``None``: PyTorch's 0.1.
            bn_eps: epsilon of every BatchNorm layer (``None``: PyTorch's 1e-5; the TensorFlow recipes use 1e-3).
            padding: ``'symmetric'`` (default) or ``'tf_same'`` (TensorFlow's; :class:`.blocks.ConvSpec`).
        """
        positive_int(in_chans, "in_chans")
        probability(drop_connect_rate, "drop_connect_rate")
        for name, value in (("bn_momentum", bn_momentum), ("bn_eps", bn_eps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < 1):
                raise ValueError(f"{name} must be a number in (0, 1) or None, got {value!r}")
        if not isinstance(small_input, bool):
            raise TypeError(f"small_input must be a bool, got {small_input!r}")
        width_mult = check_width(width_mult)
        placement = self.placement
        conv_kwargs, init_scheme = _official_init(init, conv, conv_kwargs)
        spec = make_conv_spec(conv, num_experts, _optional_bool(shared_routing, placement.shared_routing,
                                                                "shared_routing"), conv_kwargs, padding)
        options = BlockOptions(self.se_style, _optional_bool(dynamic_shortcut, placement.shortcut, "dynamic_shortcut"))
        stages = scale_stages(self.stages, width_mult)
        dynamic = resolve_dynamic_blocks(sum(s.repeats for s in stages), dynamic_blocks, placement.blocks)

        block_stages = [stage for stage in stages for _ in range(stage.repeats)]
        block_strides = [stage.stride if r == 0 else 1 for stage in stages for r in range(stage.repeats)]
        nominal = [2] * (2 if self.stem_pool else 1) + block_strides
        strides = list(nominal)
        if small_input:  # the first two stride-2 units (stem, then max-pool or first strided block) keep stride 1
            for position in [i for i, stride in enumerate(nominal) if stride == 2][:2]:
                strides[position] = 1

        stem_channels = make_divisible(self.stem_channels * width_mult)
        stem = ConvBnAct(in_chans, stem_channels, self.small_stem_kernel if small_input else self.stem_kernel,
                         strides[0], spec=spec.static(), act_layer=self.stem_act or self.act_layer)
        units: list[nn.Module] = []
        channels = [stem_channels]
        if self.stem_pool:
            units.append(nn.MaxPool2d(3, 2, 1) if strides[1] == 2 else nn.Identity())
            channels.append(stem_channels)
        in_ch, first_block = stem_channels, len(nominal) - len(block_stages)
        for index, stage in enumerate(block_stages):
            block = stage.block(in_ch, strides[first_block + index], spec if dynamic[index] else spec.static(),
                                self.act_layer, options)
            block.set_drop_connect(drop_connect_rate * index / len(block_stages))
            units.append(block)
            in_ch = block.out_channels
            channels.append(in_ch)
        head_conv, in_ch, head_options, classifier_spec = self._head(
            in_ch, width_mult, spec, dynamic_head, dynamic_classifier, dynamic_pre_logits)
        model = ConvNet(stem=stem, blocks=units, channels=channels, strides=strides, nominal_strides=nominal,
                        head_conv=head_conv, num_features=in_ch, num_classes=num_classes,
                        dropout=self.dropout if dropout is None else dropout, classifier_spec=classifier_spec,
                        features_only=features_only, head_options=head_options, init_scheme=init_scheme,
                        out_indices=out_indices, norm_eval=norm_eval)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = module.momentum if bn_momentum is None else float(bn_momentum)
                module.eps = module.eps if bn_eps is None else float(bn_eps)
        return model

    def _head(self, in_ch: int, width_mult: float, spec: ConvSpec, dynamic_head: bool | None,
              dynamic_classifier: bool | None, dynamic_pre_logits: bool | None):
        """Head convolution, pooled width, :class:`ClassifierHead` options and classifier spec."""
        placement = self.placement
        head_spec = spec.per_layer() if _optional_bool(dynamic_head, placement.head, "dynamic_head") \
            else spec.static()
        classifier_spec = spec if _optional_bool(dynamic_classifier, placement.classifier, "dynamic_classifier") \
            else STATIC
        pre_logits_spec = spec if _optional_bool(dynamic_pre_logits, placement.pre_logits, "dynamic_pre_logits") \
            else STATIC
        head_conv = None
        if self.head_channels is not None:
            head_width = make_divisible(self.head_channels * max(width_mult, self.head_min_width))
            head_conv = ConvBnAct(in_ch, head_width, 1, spec=head_spec, act_layer=self.head_act or self.act_layer)
            in_ch = head_width
        head_options = {}
        if self.pre_logits_channels is not None:
            head_options = {"hidden": make_divisible(self.pre_logits_channels * width_mult),
                            "hidden_act": self.pre_logits_act, "hidden_spec": pre_logits_spec}
        return head_conv, in_ch, head_options, classifier_spec
