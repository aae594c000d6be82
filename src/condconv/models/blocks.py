"""Building blocks shared by every family of the model zoo, and the model skeleton they plug into.

Every convolution of a block comes from :func:`condconv.make_conv2d` through a :class:`ConvSpec`, so each
architecture gains its CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient
Inference", NeurIPS 2019, arXiv:1904.04971), DynamicConv (arXiv:1912.03458) and ODConv (arXiv:2209.07947) variants
without being rewritten. A model is ``stem -> blocks -> head_conv -> pool -> [pre-logits] -> classifier``
(:class:`ConvNet`); the families describe their stages as data (:mod:`condconv.models.architecture`) and choose
which blocks are dynamic.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from condconv.nn.layers import CONV_KINDS, CondConv2d, DynamicConvBase, make_conv2d
from condconv.nn.routing import ROUTERS, SigmoidRouter
from condconv.utils.checks import positive_int, probability

__all__ = [
    "ConvSpec",
    "STATIC",
    "PADDINGS",
    "SamePad2d",
    "FeatureInfo",
    "make_divisible",
    "ConvBnAct",
    "SqueezeExcite",
    "SEStyle",
    "SE_DEFAULT",
    "MBConv",
    "BasicBlock",
    "Bottleneck",
    "ClassifierHead",
    "ConvNet",
    "INIT_SCHEMES",
    "make_conv_spec",
    "resolve_dynamic_blocks",
    "check_width",
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
        padding: ``'symmetric'`` (``(k - 1) // 2`` on every side, PyTorch's) or ``'tf_same'`` (TensorFlow's
            ``'SAME'``: output ``ceil(input / stride)``, the extra row/column at the bottom/right, computed from the
            input size at run time where it is not symmetric; what timm's ``tf_*`` models port).
    """

    kind: str = "static"
    num_experts: int | None = None
    shared_routing: bool = False
    layer_kwargs: dict = field(default_factory=dict)
    padding: str = "symmetric"

    @property
    def dynamic(self) -> bool:
        return self.kind != "static"

    @property
    def shares_routing(self) -> bool:
        return self.kind == "condconv" and self.shared_routing

    def static(self) -> ConvSpec:
        """A static convolution with this spec's padding."""
        return ConvSpec(padding=self.padding)

    def per_layer(self) -> ConvSpec:
        """The same convolution routed by each layer itself (for a lone layer: head conv, classifier)."""
        return replace(self, shared_routing=False)

    def runtime_pad(self, kernel_size: int, stride: int) -> bool:
        """Whether a ``kernel_size``/``stride`` convolution pads its input at run time (``'tf_same'`` where the
        padding is not ``(k - 1) // 2`` on every side: stride above 1 or an even kernel)."""
        return self.padding == "tf_same" and (stride != 1 or kernel_size % 2 == 0)

    def conv2d(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
               bias: bool = False) -> nn.Module:
        """A ``kernel_size`` convolution with 'same'-style padding ``(k - 1) // 2`` (0 when :meth:`runtime_pad`:
        :class:`ConvBnAct` pads the input first)."""
        kwargs = dict(self.layer_kwargs) if self.dynamic else {}
        if self.shares_routing:
            kwargs.pop("routing_dropout", None)  # the block's router applies it
            kwargs["routing"] = "external"
        padding = 0 if self.runtime_pad(kernel_size, stride) else (kernel_size - 1) // 2
        return make_conv2d(self.kind, in_channels, out_channels, kernel_size, stride, padding, 1,
                           groups, bias, num_experts=self.num_experts if self.dynamic else None, **kwargs)

    def block_router(self, in_channels: int) -> nn.Module | None:
        """The router a block computes once and shares, or ``None`` when its layers route themselves."""
        if not self.shares_routing:
            return None
        experts = self.num_experts or inspect.signature(CondConv2d).parameters["num_experts"].default
        return SigmoidRouter(in_channels, experts, self.layer_kwargs.get("routing_dropout", 0.0),
                             init=self.layer_kwargs.get("init", "default"))


STATIC = ConvSpec()
PADDINGS = ("symmetric", "tf_same")


class SamePad2d(nn.Module):
    """TensorFlow's ``'SAME'`` padding of a ``kernel_size``/``stride`` convolution, computed from the input size:
    ``pad = max((ceil(n / s) - 1) * s + k - n, 0)`` per axis, ``pad // 2`` before and the rest after."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // self.stride) - 1) * self.stride + self.kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.pad(x, pads) if any(pads) else x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def make_conv_spec(conv: str, num_experts: int | None, shared_routing: bool, conv_kwargs: dict | None,
                   padding: str = "symmetric") -> ConvSpec:
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
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    kwargs = dict(conv_kwargs or {})
    if shared_routing and conv == "condconv" and "routing" in kwargs:
        raise ValueError(f"conv_kwargs['routing']={kwargs['routing']!r} conflicts with shared_routing=True "
                         "(block-shared routing is sigmoid); pass shared_routing=False to route each layer")
    return ConvSpec(conv, num_experts, shared_routing, kwargs, padding)


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
    # a block's shared routing goes to its CondConv layers only (a static shortcut takes none)
    return layer(x) if routing is None or not isinstance(layer, CondConv2d) else layer(x, routing_weights=routing)


class ConvBnAct(nn.Module):
    """Convolution (of ``spec``'s kind) -> BatchNorm -> activation (``act_layer=None``: none).

    ``forward(x, routing=None)``: ``routing`` ``(B, E)`` is passed on to a layer built with external routing.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 *, spec: ConvSpec = STATIC, act_layer: ActLayer | None = nn.ReLU) -> None:
        super().__init__()
        self.pad = None
        if spec.runtime_pad(kernel_size, stride):
            if spec.dynamic and not spec.shares_routing:
                raise ValueError("padding='tf_same' pads a strided layer's input at run time, which a dynamic layer "
                                 "routing itself would pool: use shared_routing=True (CondConv) or padding='symmetric'")
            self.pad = SamePad2d(kernel_size, stride)
        self.conv = spec.conv2d(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor, routing: Tensor | None = None) -> Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return self.act(self.bn(_conv(self.conv, x, routing)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * gate(W2 act(W1 GAP(x)))`` with static 1x1 convolutions.

    Args:
        channels: channels of the gated map. reduced: width of the bottleneck.
        act_layer: activation of the bottleneck. Default ReLU.
        gate_layer: the gate. Default ``nn.Sigmoid`` (MobileNetV3: ``nn.Hardsigmoid``).
    """

    def __init__(self, channels: int, reduced: int, act_layer: ActLayer = nn.ReLU,
                 gate_layer: ActLayer = nn.Sigmoid) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act_layer()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


@dataclass(frozen=True)
class SEStyle:
    """How a family sizes and gates its squeeze-excite (the stage tables give the ratio).

    Attributes:
        of_hidden: the bottleneck is ``make_divisible(hidden * ratio)`` of the expanded width (MobileNetV3);
            otherwise ``max(1, int(in_channels * ratio))`` of the block input (EfficientNet, MnasNet).
        act_layer: bottleneck activation; ``None``: the block's (EfficientNet: SiLU; MobileNetV3: always ReLU).
        gate_layer: the gate (MobileNetV3: hard-sigmoid).
    """

    of_hidden: bool = False
    act_layer: ActLayer | None = None
    gate_layer: ActLayer = nn.Sigmoid

    def build(self, in_channels: int, hidden: int, ratio: float, block_act: ActLayer) -> SqueezeExcite:
        reduced = make_divisible(hidden * ratio) if self.of_hidden else max(1, int(in_channels * ratio))
        return SqueezeExcite(hidden, reduced, self.act_layer or block_act, self.gate_layer)


SE_DEFAULT = SEStyle()


class DropPath(nn.Module):
    """Drop-connect (stochastic depth) of a residual branch: in training, each example's branch is zeroed with
    probability ``rate`` and the kept ones are scaled by ``1 / (1 - rate)``; the identity in eval mode.

    As the EfficientNet code's ``drop_connect`` (Huang et al., "Deep Networks with Stochastic Depth", arXiv:1603.09382).
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = probability(rate, "drop_connect_rate")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


class _Block(nn.Module):
    """Base of the blocks: an optional block router whose routing all the block's convolutions share, and the
    drop-connect of the residual branch (:meth:`set_drop_connect`)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, spec: ConvSpec) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.router = spec.block_router(in_channels)
        self.drop_path: nn.Module = nn.Identity()

    def route(self, x: Tensor) -> Tensor | None:
        return None if self.router is None else self.router(x)

    @property
    def residual(self) -> bool:
        """Whether the block adds its input (or a shortcut) to its branch."""
        return True

    def set_drop_connect(self, rate: float) -> None:
        """Drop the residual branch with probability ``rate`` in training (blocks without a residual ignore it)."""
        self.drop_path = DropPath(rate) if rate > 0 and self.residual else nn.Identity()


class MBConv(_Block):
    """Inverted residual (MobileNetV2, MnasNet, EfficientNet) and depthwise-separable block (MobileNetV1).

    ``[expand 1x1 -> BN -> act] -> depthwise kxk -> BN -> act -> [SE] -> project 1x1 -> BN [-> act] [+ x]``.

    Args:
        in_channels, out_channels: block input and output channels.
        kernel_size: depthwise kernel. Default 3.
        stride: depthwise stride. Default 1.
        expand_ratio: hidden channels ``round(in_channels * expand_ratio)``; 1 skips the expansion. Default 6.
        hidden_channels: the hidden width itself (MobileNetV3's tables), instead of ``expand_ratio``.
        se_ratio: squeeze-excite ratio (0: no SE), sized and gated as ``se_style`` says. Default 0.
        se_style: :class:`SEStyle`. Default: of the block input, sigmoid gate (EfficientNet, MnasNet).
        act_layer: activation class. Default ReLU.
        project_act: activation after the projection too (MobileNetV1). Default False.
        skip: residual connection when stride 1 and ``in_channels == out_channels``. Default True.
        spec: the convolution kind of the block's expand/depthwise/project convolutions (SE stays static).
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
                 expand_ratio: float = 6.0, hidden_channels: int | None = None, se_ratio: float = 0.0,
                 se_style: SEStyle = SE_DEFAULT, act_layer: ActLayer = nn.ReLU, project_act: bool = False,
                 skip: bool = True, spec: ConvSpec = STATIC) -> None:
        super().__init__(in_channels, out_channels, stride, spec)
        hidden = int(round(in_channels * expand_ratio)) if hidden_channels is None else hidden_channels
        self.expand = ConvBnAct(in_channels, hidden, 1, spec=spec, act_layer=act_layer) if hidden != in_channels \
            else None
        self.depthwise = ConvBnAct(hidden, hidden, kernel_size, stride, groups=hidden, spec=spec, act_layer=act_layer)
        self.se = se_style.build(in_channels, hidden, se_ratio, act_layer) if se_ratio > 0 else None
        self.project = ConvBnAct(hidden, out_channels, 1, spec=spec, act_layer=act_layer if project_act else None)
        self.has_skip = skip and stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        routing = self.route(x)
        out = x if self.expand is None else self.expand(x, routing)
        out = self.depthwise(out, routing)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out, routing)
        return self.drop_path(out) + x if self.has_skip else out

    @property
    def residual(self) -> bool:
        return self.has_skip


class _ResidualBlock(_Block):
    """ResNet block base: ``act(body(x) + shortcut(x))`` with a 1x1 projection shortcut when the shape changes.

    ``dynamic_shortcut``: the projection shortcut is of the block's kind (True) or a static convolution (False, as
    the official ODConv code builds it).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, spec: ConvSpec, act_layer: ActLayer,
                 dynamic_shortcut: bool = True):
        super().__init__(in_channels, out_channels, stride, spec)
        if not isinstance(dynamic_shortcut, bool):
            raise TypeError(f"dynamic_shortcut must be a bool, got {dynamic_shortcut!r}")
        shortcut = spec if dynamic_shortcut else spec.static()
        self.downsample = ConvBnAct(in_channels, out_channels, 1, stride, spec=shortcut, act_layer=None) \
            if stride != 1 or in_channels != out_channels else None
        self.act = act_layer()

    def body(self, x: Tensor, routing: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        routing = self.route(x)
        shortcut = x if self.downsample is None else self.downsample(x, routing)
        return self.act(self.drop_path(self.body(x, routing)) + shortcut)


class BasicBlock(_ResidualBlock):
    """ResNet basic block: two 3x3 convolutions (ResNet-10/18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, *, stride: int = 1, spec: ConvSpec = STATIC,
                 act_layer: ActLayer = nn.ReLU, dynamic_shortcut: bool = True) -> None:
        super().__init__(in_channels, channels, stride, spec, act_layer, dynamic_shortcut)
        self.conv1 = ConvBnAct(in_channels, channels, 3, stride, spec=spec, act_layer=act_layer)
        self.conv2 = ConvBnAct(channels, channels, 3, spec=spec, act_layer=None)

    def body(self, x: Tensor, routing: Tensor | None) -> Tensor:
        return self.conv2(self.conv1(x, routing), routing)


class Bottleneck(_ResidualBlock):
    """ResNet bottleneck (v1.5: the stride on the 3x3 convolution): 1x1 -> 3x3 -> 1x1 to ``4 * channels``.

    ``stride_on_1x1=True`` gives the original v1 layout (stride on the first 1x1), 6% cheaper for ResNet-50.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, *, stride: int = 1, spec: ConvSpec = STATIC,
                 act_layer: ActLayer = nn.ReLU, dynamic_shortcut: bool = True, stride_on_1x1: bool = False) -> None:
        super().__init__(in_channels, channels * self.expansion, stride, spec, act_layer, dynamic_shortcut)
        first, middle = (stride, 1) if stride_on_1x1 else (1, stride)
        self.conv1 = ConvBnAct(in_channels, channels, 1, first, spec=spec, act_layer=act_layer)
        self.conv2 = ConvBnAct(channels, channels, 3, middle, spec=spec, act_layer=act_layer)
        self.conv3 = ConvBnAct(channels, channels * self.expansion, 1, spec=spec, act_layer=None)

    def body(self, x: Tensor, routing: Tensor | None) -> Tensor:
        return self.conv3(self.conv2(self.conv1(x, routing), routing), routing)


def _pointwise(in_features: int, out_features: int, spec: ConvSpec) -> nn.Module:
    """A layer on pooled features: ``nn.Linear``, or a 1x1 dynamic convolution with bias (its own router)."""
    return spec.per_layer().conv2d(in_features, out_features, 1, bias=True) if spec.dynamic \
        else nn.Linear(in_features, out_features)


def _on_pooled(layer: nn.Module, x: Tensor) -> Tensor:
    """``x`` ``(B, C, 1, 1)`` -> ``(B, C_out)``."""
    return layer(x.flatten(1)) if isinstance(layer, nn.Linear) else layer(x).flatten(1)


class ClassifierHead(nn.Module):
    """Global average pooling -> [pre-logits layer -> activation] -> dropout -> classifier.

    A static classifier is an ``nn.Linear``; a dynamic one is a 1x1 dynamic convolution (with its own router) on
    the pooled ``(B, C, 1, 1)`` features, as in the CondConv paper. The optional pre-logits layer (MobileNetV3's
    1x1 convolution without BatchNorm after the pooling) is built the same way, with its own ``hidden_spec``.

    Args:
        in_features: channels of the pooled map. num_classes: outputs. dropout: before the classifier.
        spec: the classifier's convolution (``STATIC``: ``nn.Linear``).
        hidden: width of the pre-logits layer, or ``None``. hidden_act: its activation. hidden_spec: its kind.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0, spec: ConvSpec = STATIC,
                 hidden: int | None = None, hidden_act: ActLayer = nn.Hardswish,
                 hidden_spec: ConvSpec = STATIC) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pre_logits = self.pre_logits_act = None
        if hidden is not None:
            self.pre_logits = _pointwise(in_features, positive_int(hidden, "hidden"), hidden_spec)
            self.pre_logits_act = hidden_act()
            in_features = hidden
        self.dropout = nn.Dropout(dropout)
        self.fc = _pointwise(in_features, num_classes, spec)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``x``: ``(B, C, H, W)`` -> logits ``(B, num_classes)`` (the classifier's input if ``pre_logits``)."""
        x = self.pool(x)
        if self.pre_logits is not None:
            x = self.pre_logits_act(_on_pooled(self.pre_logits, x))[:, :, None, None]
        if pre_logits:
            return x.flatten(1)
        return _on_pooled(self.fc, self.dropout(x))


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


def _norms_to_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _Level(nn.Sequential):
    """One feature level of :meth:`ConvNet.levels`: its BatchNorm layers stay in eval mode when ``norm_eval``."""

    def __init__(self, *modules: nn.Module, norm_eval: bool = False) -> None:
        super().__init__(*modules)
        self.norm_eval = norm_eval

    def train(self, mode: bool = True) -> _Level:
        super().train(mode)
        if mode and self.norm_eval:
            _norms_to_eval(self)
        return self


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
        num_features: channels of the pooled map.
        num_classes: classifier outputs.
        dropout: dropout before the classifier.
        classifier_spec: ``STATIC`` for an ``nn.Linear`` classifier, else the dynamic classifier's spec.
        features_only: drop the head; ``forward`` returns the list of the five feature maps.
        out_indices: with ``features_only``: which of the five levels (0-4: strides 2, 4, 8, 16, 32) ``forward``
            returns and :attr:`feature_info` describes (``None``: all); the blocks after the last are not run.
        norm_eval: keep every BatchNorm layer (the routers' included) in eval mode while the rest trains, as
            detection configs do (batches of 1-2 images per GPU); :meth:`train` honours it.
        head_options: more :class:`ClassifierHead` arguments (``hidden``, ``hidden_act``, ``hidden_spec``: a
            pre-logits layer; then :attr:`num_features` is its width, the classifier's input).
        init_scheme: initialisation of the static layers (:data:`INIT_SCHEMES`); dynamic layers and routers keep
            their own. Default ``'torch'``.
    """

    def __init__(self, *, stem: nn.Module, blocks: Sequence[nn.Module], channels: Sequence[int],
                 strides: Sequence[int], nominal_strides: Sequence[int], head_conv: nn.Module | None,
                 num_features: int, num_classes: int, dropout: float, classifier_spec: ConvSpec,
                 features_only: bool, head_options: dict | None = None, init_scheme: str = "torch",
                 out_indices: Sequence[int] | None = None, norm_eval: bool = False) -> None:
        super().__init__()
        if not isinstance(norm_eval, bool):
            raise TypeError(f"norm_eval must be a bool, got {norm_eval!r}")
        self.norm_eval = norm_eval
        positive_int(num_classes, "num_classes")
        probability(dropout, "dropout")
        if not isinstance(features_only, bool):
            raise TypeError(f"features_only must be a bool, got {features_only!r}")
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.features_only = features_only
        self.feature_info, self._feature_index = self._levels(channels, strides, nominal_strides)
        self._level_index = list(self._feature_index)
        if out_indices is not None:
            if not features_only:
                raise ValueError(f"out_indices={out_indices!r} needs features_only=True")
            if isinstance(out_indices, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 5 for i in out_indices) \
                    or list(out_indices) != sorted(set(out_indices)) or not out_indices:
                raise ValueError(f"out_indices must be increasing level indices in 0-4, got {out_indices!r}")
            self.feature_info = [self.feature_info[i] for i in out_indices]
            self._feature_index = [self._feature_index[i] for i in out_indices]
        if features_only:
            self.head_conv, self.head = nn.Identity(), None
            self.num_features = self.feature_info[-1].channels
        else:
            head_options = dict(head_options or {})
            self.head_conv = head_conv if head_conv is not None else nn.Identity()
            self.head = ClassifierHead(num_features, num_classes, dropout, classifier_spec, **head_options)
            self.num_features = head_options.get("hidden") or num_features
        self.num_classes = num_classes
        _init_weights(self, init_scheme)

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
        """The feature maps described by :attr:`feature_info` (the five levels, or those of ``out_indices``)."""
        wanted = set(self._feature_index)
        last = max(wanted)
        out = []
        x = self.stem(x)
        if 0 in wanted:
            out.append(x)
        for index, block in enumerate(self.blocks, start=1):
            if index > last:
                break
            x = block(x)
            if index in wanted:
                out.append(x)
        return out

    def levels(self) -> nn.Sequential:
        """The network up to stride 32 as ``nn.Sequential`` of five children ``level1`` ... ``level5`` (strides 2
        ... 32; sharing this model's modules, and its :attr:`norm_eval`), for detection code that picks feature maps
        by child name, e.g. torchvision's ``BackboneWithFPN(model.levels(), {'level2': '0', ...}, ...)``."""
        from collections import OrderedDict

        units = [self.stem, *self.blocks]
        parts, start = OrderedDict(), 0
        for level, end in enumerate(self._level_index, start=1):
            parts[f"level{level}"] = _Level(*units[start:end + 1], norm_eval=self.norm_eval)
            start = end + 1
        return nn.Sequential(parts)

    def train(self, mode: bool = True) -> ConvNet:
        """Set training mode; with :attr:`norm_eval` every BatchNorm layer stays in eval mode (running statistics
        used and kept)."""
        super().train(mode)
        if mode and getattr(self, "norm_eval", False):
            _norms_to_eval(self)
        return self


    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``, or the feature maps when ``features_only``."""
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))


INIT_SCHEMES = ("torch", "tf")


def _init_weights(model: nn.Module, scheme: str = "torch") -> None:
    """Initialise the static layers; dynamic layers and routers keep their own initialisation.

    ``'torch'`` (torchvision's, and the official ODConv code's ``models/resnet.py``, ``od_resnet.py``,
    ``od_mobilenetv2.py``): convolutions He normal fan-out (``out_channels * kh * kw``), biases zero; linear layers
    N(0, 0.01), zero bias; BatchNorm to the identity.
    ``'tf'`` (the official EfficientNet-CondConv and MnasNet code, tensorflow/tpu ``efficientnet_model.py``,
    ``mnasnet_model.py``): convolutions ``conv_kernel_initializer``, a normal of std ``sqrt(2 / fan_out)`` with
    TensorFlow's fan-out ``kh * kw * out_channels / groups`` (``kh * kw`` for a depthwise kernel), biases zero;
    linear layers ``dense_kernel_initializer``, uniform in ``+-1 / sqrt(out_features)``, zero bias; BatchNorm to
    the identity.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init_scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    own = set()
    for module in model.modules():
        if isinstance(module, (DynamicConvBase, *ROUTERS)):
            own.update(id(m) for m in module.modules())
    for module in model.modules():
        if id(module) in own:
            continue
        if isinstance(module, nn.Conv2d):
            if scheme == "tf":
                fan_out = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if scheme == "tf":
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
