"""Building blocks shared by every family of the model zoo, and the model skeleton they plug into.

Every convolution of a block comes from :func:`condconv.make_conv2d` through a :class:`ConvSpec`, so each
architecture gains its CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient
Inference", NeurIPS 2019, arXiv:1904.04971), DynamicConv (arXiv:1912.03458) and ODConv (arXiv:2209.07947) variants
without being rewritten. A model is ``stem -> blocks -> head_conv -> pool -> classifier`` (:class:`ConvNet`);
the families only describe their stages as data and choose which blocks are dynamic.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from condconv._checks import positive_int, probability
from condconv.layers import CONV_KINDS, CondConv2d, DynamicConvBase, make_conv2d
from condconv.routing import ROUTERS, SigmoidRouter

__all__ = [
    "ConvSpec",
    "STATIC",
    "FeatureInfo",
    "make_divisible",
    "ConvBnAct",
    "SqueezeExcite",
    "MBConv",
    "BasicBlock",
    "Bottleneck",
    "ClassifierHead",
    "ConvNet",
    "make_conv_spec",
    "resolve_dynamic_blocks",
    "check_width",
    "Placement",
    "MBStage",
    "ResStage",
    "scale_stages",
    "Architecture",
]

ActLayer = Callable[[], nn.Module]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``value`` (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class ConvSpec:
    """Which convolution a block builds, and how a dynamic one is routed.

    Attributes:
        kind: ``'static'``, ``'condconv'``, ``'dynamic'`` or ``'odconv'``.
        num_experts: experts per dynamic layer (``None``: the layer's default).
        shared_routing: CondConv only: one :class:`condconv.SigmoidRouter` per block, computed on the block input
            and shared by all its convolutions (built with ``routing='external'``), as in the official
            EfficientNet-CondConv code. Otherwise every dynamic layer routes itself.
        layer_kwargs: further keyword arguments of the dynamic layer (``temperature``, ``reduction``, ...).
    """

    kind: str = "static"
    num_experts: int | None = None
    shared_routing: bool = False
    layer_kwargs: dict = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        return self.kind != "static"

    @property
    def shares_routing(self) -> bool:
        return self.kind == "condconv" and self.shared_routing

    def per_layer(self) -> ConvSpec:
        """The same convolution routed by each layer itself (for a lone layer: head conv, classifier)."""
        return replace(self, shared_routing=False)

    def conv2d(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
               bias: bool = False) -> nn.Module:
        """A ``kernel_size`` convolution with 'same'-style padding ``(k - 1) // 2``."""
        kwargs = dict(self.layer_kwargs) if self.dynamic else {}
        if self.shares_routing:
            kwargs.pop("routing_dropout", None)  # the block's router applies it
            kwargs["routing"] = "external"
        return make_conv2d(self.kind, in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, 1,
                           groups, bias, num_experts=self.num_experts if self.dynamic else None, **kwargs)

    def block_router(self, in_channels: int) -> nn.Module | None:
        """The router a block computes once and shares, or ``None`` when its layers route themselves."""
        if not self.shares_routing:
            return None
        experts = self.num_experts or inspect.signature(CondConv2d).parameters["num_experts"].default
        return SigmoidRouter(in_channels, experts, self.layer_kwargs.get("routing_dropout", 0.0))


STATIC = ConvSpec()


def make_conv_spec(conv: str, num_experts: int | None, shared_routing: bool, conv_kwargs: dict | None) -> ConvSpec:
    """Validate a model's convolution arguments and turn them into a :class:`ConvSpec`."""
    if conv not in CONV_KINDS:
        raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")
    if num_experts is not None and (isinstance(num_experts, bool) or not isinstance(num_experts, int)
                                    or num_experts < 1):
        raise ValueError(f"num_experts must be a positive int or None, got {num_experts!r}")
    if conv_kwargs is not None and not isinstance(conv_kwargs, dict):
        raise TypeError(f"conv_kwargs must be a dict or None, got {type(conv_kwargs).__name__}")
    if conv == "static" and (num_experts is not None or conv_kwargs):
        raise ValueError(f"num_experts={num_experts!r} / conv_kwargs={conv_kwargs!r} need a dynamic convolution: "
                         f"pass conv='condconv', 'dynamic' or 'odconv' (got conv='static')")
    if not isinstance(shared_routing, bool):
        raise TypeError(f"shared_routing must be a bool or None, got {shared_routing!r}")
    kwargs = dict(conv_kwargs or {})
    if shared_routing and conv == "condconv" and "routing" in kwargs:
        raise ValueError(f"conv_kwargs['routing']={kwargs['routing']!r} conflicts with shared_routing=True "
                         "(block-shared routing is sigmoid); pass shared_routing=False to route each layer")
    return ConvSpec(conv, num_experts, shared_routing, kwargs)


def resolve_dynamic_blocks(num_blocks: int, dynamic_blocks: int | str | Sequence[int] | None,
                           default: int) -> list[bool]:
    """Which of ``num_blocks`` blocks are dynamic.

    Args:
        num_blocks: blocks in the model.
        dynamic_blocks: ``None`` (the family's default, the paper's placement: the last ``default`` blocks), an int
            ``n`` (the last ``n`` blocks; 0 for none), ``'all'``, or a sequence of block indices (negative ones count
            from the end).
        default: the family's default count.
    """
    if dynamic_blocks is None:
        dynamic_blocks = default
    if dynamic_blocks == "all":
        return [True] * num_blocks
    if isinstance(dynamic_blocks, int) and not isinstance(dynamic_blocks, bool):
        if not 0 <= dynamic_blocks <= num_blocks:
            raise ValueError(f"dynamic_blocks must be between 0 and the number of blocks ({num_blocks}), "
                             f"got {dynamic_blocks}")
        return [i >= num_blocks - dynamic_blocks for i in range(num_blocks)]
    if isinstance(dynamic_blocks, Sequence) and not isinstance(dynamic_blocks, str):
        chosen = set()
        for index in dynamic_blocks:
            if isinstance(index, bool) or not isinstance(index, int) or not -num_blocks <= index < num_blocks:
                raise ValueError(f"dynamic_blocks indices must be ints in [-{num_blocks}, {num_blocks}), "
                                 f"got {index!r}")
            chosen.add(index % num_blocks)
        return [i in chosen for i in range(num_blocks)]
    raise ValueError(f"dynamic_blocks must be None, 'all', an int or a sequence of block indices, "
                     f"got {dynamic_blocks!r}")


def _conv(layer: nn.Module, x: Tensor, routing: Tensor | None) -> Tensor:
    return layer(x) if routing is None else layer(x, routing_weights=routing)


class ConvBnAct(nn.Module):
    """Convolution (of ``spec``'s kind) -> BatchNorm -> activation (``act_layer=None``: none).

    ``forward(x, routing=None)``: ``routing`` ``(B, E)`` is passed on to a layer built with external routing.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 *, spec: ConvSpec = STATIC, act_layer: ActLayer | None = nn.ReLU) -> None:
        super().__init__()
        self.conv = spec.conv2d(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor, routing: Tensor | None = None) -> Tensor:
        return self.act(self.bn(_conv(self.conv, x, routing)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W2 act(W1 GAP(x)))`` with static 1x1 convolutions."""

    def __init__(self, channels: int, reduced: int, act_layer: ActLayer = nn.ReLU) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act_layer()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.expand(self.act(self.reduce(self.pool(x)))))


class _Block(nn.Module):
    """Base of the blocks: an optional block router whose routing all the block's convolutions share."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, spec: ConvSpec) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.router = spec.block_router(in_channels)

    def route(self, x: Tensor) -> Tensor | None:
        return None if self.router is None else self.router(x)


class MBConv(_Block):
    """Inverted residual (MobileNetV2, MnasNet, EfficientNet) and depthwise-separable block (MobileNetV1).

    ``[expand 1x1 -> BN -> act] -> depthwise kxk -> BN -> act -> [SE] -> project 1x1 -> BN [-> act] [+ x]``.

    Args:
        in_channels, out_channels: block input and output channels.
        kernel_size: depthwise kernel. Default 3.
        stride: depthwise stride. Default 1.
        expand_ratio: hidden channels ``round(in_channels * expand_ratio)``; 1 skips the expansion. Default 6.
        se_ratio: squeeze-excite width relative to ``in_channels`` (0: no SE). Default 0.
        act_layer: activation class. Default ReLU.
        project_act: activation after the projection too (MobileNetV1). Default False.
        skip: residual connection when stride 1 and ``in_channels == out_channels``. Default True.
        spec: the convolution kind of the block's expand/depthwise/project convolutions (SE stays static).
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
                 expand_ratio: float = 6.0, se_ratio: float = 0.0, act_layer: ActLayer = nn.ReLU,
                 project_act: bool = False, skip: bool = True, spec: ConvSpec = STATIC) -> None:
        super().__init__(in_channels, out_channels, stride, spec)
        hidden = int(round(in_channels * expand_ratio))
        self.expand = ConvBnAct(in_channels, hidden, 1, spec=spec, act_layer=act_layer) if hidden != in_channels \
            else None
        self.depthwise = ConvBnAct(hidden, hidden, kernel_size, stride, groups=hidden, spec=spec, act_layer=act_layer)
        self.se = SqueezeExcite(hidden, max(1, int(in_channels * se_ratio)), act_layer) if se_ratio > 0 else None
        self.project = ConvBnAct(hidden, out_channels, 1, spec=spec, act_layer=act_layer if project_act else None)
        self.has_skip = skip and stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        routing = self.route(x)
        out = x if self.expand is None else self.expand(x, routing)
        out = self.depthwise(out, routing)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out, routing)
        return out + x if self.has_skip else out


class _ResidualBlock(_Block):
    """ResNet block base: ``act(body(x) + shortcut(x))`` with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, spec: ConvSpec, act_layer: ActLayer):
        super().__init__(in_channels, out_channels, stride, spec)
        self.downsample = ConvBnAct(in_channels, out_channels, 1, stride, spec=spec, act_layer=None) \
            if stride != 1 or in_channels != out_channels else None
        self.act = act_layer()

    def body(self, x: Tensor, routing: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        routing = self.route(x)
        shortcut = x if self.downsample is None else self.downsample(x, routing)
        return self.act(self.body(x, routing) + shortcut)


class BasicBlock(_ResidualBlock):
    """ResNet basic block: two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, *, stride: int = 1, spec: ConvSpec = STATIC,
                 act_layer: ActLayer = nn.ReLU) -> None:
        super().__init__(in_channels, channels, stride, spec, act_layer)
        self.conv1 = ConvBnAct(in_channels, channels, 3, stride, spec=spec, act_layer=act_layer)
        self.conv2 = ConvBnAct(channels, channels, 3, spec=spec, act_layer=None)

    def body(self, x: Tensor, routing: Tensor | None) -> Tensor:
        return self.conv2(self.conv1(x, routing), routing)


class Bottleneck(_ResidualBlock):
    """ResNet bottleneck (v1.5: the stride on the 3x3 convolution): 1x1 -> 3x3 -> 1x1 to ``4 * channels``."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, *, stride: int = 1, spec: ConvSpec = STATIC,
                 act_layer: ActLayer = nn.ReLU) -> None:
        super().__init__(in_channels, channels * self.expansion, stride, spec, act_layer)
        self.conv1 = ConvBnAct(in_channels, channels, 1, spec=spec, act_layer=act_layer)
        self.conv2 = ConvBnAct(channels, channels, 3, stride, spec=spec, act_layer=act_layer)
        self.conv3 = ConvBnAct(channels, channels * self.expansion, 1, spec=spec, act_layer=None)

    def body(self, x: Tensor, routing: Tensor | None) -> Tensor:
        return self.conv3(self.conv2(self.conv1(x, routing), routing), routing)


class ClassifierHead(nn.Module):
    """Global average pooling -> dropout -> classifier.

    A static classifier is an ``nn.Linear``; a dynamic one is a 1x1 dynamic convolution (with its own router) on
    the pooled ``(B, C, 1, 1)`` features, as in the CondConv paper.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0, spec: ConvSpec = STATIC) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = spec.per_layer().conv2d(in_features, num_classes, 1, bias=True) if spec.dynamic \
            else nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``x``: ``(B, C, H, W)`` -> logits ``(B, num_classes)`` (pooled features ``(B, C)`` if ``pre_logits``)."""
        x = self.pool(x)
        if pre_logits:
            return x.flatten(1)
        x = self.dropout(x)
        return self.fc(x.flatten(1)) if isinstance(self.fc, nn.Linear) else self.fc(x).flatten(1)


@dataclass(frozen=True)
class FeatureInfo:
    """One multi-scale feature map of a ``features_only`` model.

    Attributes:
        channels: channels of the map.
        reduction: input size / map size (2, 4, 8, 16, 32 for ImageNet models; smaller for ``*_cifar``).
        module: name of the module producing it.
    """

    channels: int
    reduction: int
    module: str


def check_width(width_mult: object) -> float:
    """Validate a width multiplier (a positive number)."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    return float(width_mult)


class ConvNet(nn.Module):
    """The skeleton every model of the zoo shares: ``stem -> blocks -> head_conv -> ClassifierHead``.

    Families build the parts; this class handles the classifier, ``features_only``, ``feature_info`` and weight
    initialisation.

    Args:
        stem: first module (``(B, in_chans, H, W)`` in).
        blocks: the following modules in order: the blocks, after ResNet's max-pool (``nn.Identity`` in the
            ``_cifar`` variants), which is not a block for ``dynamic_blocks``.
        channels: output channels of ``[stem, *blocks]``.
        strides: strides of ``[stem, *blocks]`` in this model.
        nominal_strides: the same for the ImageNet layout; the feature levels end where the nominal reduction
            reaches 2, 4, 8, 16, 32 (so ``*_cifar`` models keep the levels of their ImageNet sibling).
        head_conv: the 1x1 convolution before pooling, or ``None``.
        num_features: channels entering the classifier.
        num_classes: classifier outputs.
        dropout: dropout before the classifier.
        classifier_spec: ``STATIC`` for an ``nn.Linear`` classifier, else the dynamic classifier's spec.
        features_only: drop the head; ``forward`` returns the list of the five feature maps.
    """

    def __init__(self, *, stem: nn.Module, blocks: Sequence[nn.Module], channels: Sequence[int],
                 strides: Sequence[int], nominal_strides: Sequence[int], head_conv: nn.Module | None,
                 num_features: int, num_classes: int, dropout: float, classifier_spec: ConvSpec,
                 features_only: bool) -> None:
        super().__init__()
        positive_int(num_classes, "num_classes")
        probability(dropout, "dropout")
        if not isinstance(features_only, bool):
            raise TypeError(f"features_only must be a bool, got {features_only!r}")
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.features_only = features_only
        self.feature_info, self._feature_index = self._levels(channels, strides, nominal_strides)
        if features_only:
            self.head_conv, self.head = nn.Identity(), None
            self.num_features = self.feature_info[-1].channels
        else:
            self.head_conv = head_conv if head_conv is not None else nn.Identity()
            self.head = ClassifierHead(num_features, num_classes, dropout, classifier_spec)
            self.num_features = num_features
        self.num_classes = num_classes
        _init_weights(self)

    @staticmethod
    def _levels(channels, strides, nominal_strides) -> tuple[list[FeatureInfo], list[int]]:
        nominal = reduction = 1
        last_at: dict[int, tuple[int, int, int]] = {}
        for index, (ch, stride, nominal_stride) in enumerate(zip(channels, strides, nominal_strides)):
            nominal, reduction = nominal * nominal_stride, reduction * stride
            last_at[nominal] = (index, ch, reduction)
        info, where = [], []
        for level in (2, 4, 8, 16, 32):
            index, ch, red = last_at[level]
            info.append(FeatureInfo(ch, red, "stem" if index == 0 else f"blocks.{index - 1}"))
            where.append(index)
        return info, where

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W)`` -> the last feature map ``(B, num_features, H/r, W/r)`` (before pooling)."""
        return self.head_conv(self.blocks(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map -> logits ``(B, num_classes)`` (pooled features ``(B, num_features)`` if ``pre_logits``)."""
        if self.head is None:
            raise RuntimeError("this model was built with features_only=True and has no head")
        return self.head(x, pre_logits)

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """The five feature maps described by :attr:`feature_info`."""
        wanted = set(self._feature_index)
        out = []
        x = self.stem(x)
        if 0 in wanted:
            out.append(x)
        for index, block in enumerate(self.blocks, start=1):
            x = block(x)
            if index in wanted:
                out.append(x)
        return out

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``, or the feature maps when ``features_only``."""
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) init for static convolutions, N(0, 0.01) for linear layers, BN to identity.

    Dynamic layers and routers keep their own initialisation.
    """
    own = set()
    for module in model.modules():
        if isinstance(module, (DynamicConvBase, *ROUTERS)):
            own.update(id(m) for m in module.modules())
    for module in model.modules():
        if id(module) in own:
            continue
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class MBStage:
    """A stage of :class:`MBConv` blocks (MobileNetV1/V2, MnasNet, EfficientNet tables).

    Attributes:
        channels: output channels. repeats: blocks. stride: stride of the first block.
        kernel_size, expand_ratio, se_ratio, skip, project_act: as :class:`MBConv`.
    """

    channels: int
    repeats: int
    stride: int
    kernel_size: int = 3
    expand_ratio: float = 6.0
    se_ratio: float = 0.0
    skip: bool = True
    project_act: bool = False

    def block(self, in_channels: int, stride: int, spec: ConvSpec, act_layer: ActLayer) -> MBConv:
        return MBConv(in_channels, self.channels, kernel_size=self.kernel_size, stride=stride,
                      expand_ratio=self.expand_ratio, se_ratio=self.se_ratio, act_layer=act_layer,
                      project_act=self.project_act, skip=self.skip, spec=spec)


@dataclass(frozen=True)
class ResStage:
    """A ResNet stage: ``repeats`` blocks of ``block_type`` with ``channels`` (bottleneck) width."""

    block_type: type
    channels: int
    repeats: int
    stride: int

    def block(self, in_channels: int, stride: int, spec: ConvSpec, act_layer: ActLayer) -> nn.Module:
        return self.block_type(in_channels, self.channels, stride=stride, spec=spec, act_layer=act_layer)


def scale_stages(stages: Sequence[MBStage | ResStage], width_mult: float, divisor: int = 8) -> list:
    """The table with every stage's channels multiplied by ``width_mult`` (rounded by :func:`make_divisible`)."""
    return [replace(s, channels=make_divisible(s.channels * width_mult, divisor)) for s in stages]


@dataclass(frozen=True)
class Placement:
    """A family's default placement of dynamic layers (the paper's).

    Attributes:
        blocks: the last ``blocks`` blocks are dynamic.
        head: the 1x1 head convolution is dynamic.
        classifier: the classifier is dynamic (a 1x1 dynamic convolution on the pooled features).
        shared_routing: CondConv routing computed once per block and shared by its convolutions.
    """

    blocks: int
    head: bool = False
    classifier: bool = False
    shared_routing: bool = False

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

    def build(self, *, small_input: bool = False, width_mult: float = 1.0, dropout: float | None = None,
              num_classes: int = 1000, in_chans: int = 3, conv: str = "static", num_experts: int | None = None,
              dynamic_blocks: int | str | Sequence[int] | None = None, dynamic_head: bool | None = None,
              dynamic_classifier: bool | None = None, shared_routing: bool | None = None,
              conv_kwargs: dict | None = None, features_only: bool = False) -> ConvNet:
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
            conv_kwargs: further keyword arguments of the dynamic layers.
            features_only: no head; ``forward`` returns the five feature maps (see :attr:`ConvNet.feature_info`).
        """
        positive_int(in_chans, "in_chans")
        if not isinstance(small_input, bool):
            raise TypeError(f"small_input must be a bool, got {small_input!r}")
        width_mult = check_width(width_mult)
        placement = self.placement
        spec = make_conv_spec(conv, num_experts, _optional_bool(shared_routing, placement.shared_routing,
                                                                "shared_routing"), conv_kwargs)
        stages = scale_stages(self.stages, width_mult)
        dynamic = resolve_dynamic_blocks(sum(s.repeats for s in stages), dynamic_blocks, placement.blocks)
        head_spec = spec.per_layer() if _optional_bool(dynamic_head, placement.head, "dynamic_head") else STATIC
        classifier_spec = spec if _optional_bool(dynamic_classifier, placement.classifier, "dynamic_classifier") \
            else STATIC

        block_stages = [stage for stage in stages for _ in range(stage.repeats)]
        block_strides = [stage.stride if r == 0 else 1 for stage in stages for r in range(stage.repeats)]
        nominal = [2] * (2 if self.stem_pool else 1) + block_strides
        strides = list(nominal)
        if small_input:  # the first two stride-2 units (stem, then max-pool or first strided block) keep stride 1
            for position in [i for i, stride in enumerate(nominal) if stride == 2][:2]:
                strides[position] = 1

        stem_channels = make_divisible(self.stem_channels * width_mult)
        stem = ConvBnAct(in_chans, stem_channels, self.small_stem_kernel if small_input else self.stem_kernel,
                         strides[0], act_layer=self.act_layer)
        units: list[nn.Module] = []
        channels = [stem_channels]
        if self.stem_pool:
            units.append(nn.MaxPool2d(3, 2, 1) if strides[1] == 2 else nn.Identity())
            channels.append(stem_channels)
        in_ch, first_block = stem_channels, len(nominal) - len(block_stages)
        for index, stage in enumerate(block_stages):
            block = stage.block(in_ch, strides[first_block + index], spec if dynamic[index] else STATIC,
                                self.act_layer)
            units.append(block)
            in_ch = block.out_channels
            channels.append(in_ch)
        head_conv = None
        if self.head_channels is not None:
            head_width = make_divisible(self.head_channels * max(width_mult, self.head_min_width))
            head_conv = ConvBnAct(in_ch, head_width, 1, spec=head_spec, act_layer=self.act_layer)
            in_ch = head_width
        return ConvNet(stem=stem, blocks=units, channels=channels, strides=strides, nominal_strides=nominal,
                       head_conv=head_conv, num_features=in_ch, num_classes=num_classes,
                       dropout=self.dropout if dropout is None else dropout, classifier_spec=classifier_spec,
                       features_only=features_only)
