"""Dynamic convolution layers: thin ``nn.Module`` wrappers around :func:`condconv.nn.functional.dynamic_conv`.

- :class:`CondConv2d` — Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
  NeurIPS 2019, arXiv:1904.04971.
- :class:`DynamicConv2d` — Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020,
  arXiv:1912.03458.
- :class:`ODConv2d` — Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022, arXiv:2209.07947.

All three take :class:`torch.nn.Conv2d`'s arguments in the same order, then keyword-only dynamic options, and
hold their experts in one parameter ``weight`` of shape ``(num_experts, out_channels, in_channels // groups, kh,
kw)`` (``bias``: ``(num_experts, out_channels)``), each expert initialised like its own ``nn.Conv2d``
(``init='default'``) or as the paper's code initialises it (``init='official'``, per expert, see each layer).

Each also exists in 1-D and 3-D (:class:`CondConv1d`, :class:`CondConv3d`, :class:`DynamicConv1d`,
:class:`DynamicConv3d`, :class:`ODConv1d`, :class:`ODConv3d`): :class:`torch.nn.Conv1d`'s / ``Conv3d``'s arguments,
the same options, routers and state_dict keys, the kernel axes ``(k,)`` / ``(kd, kh, kw)`` in place of ``(kh, kw)``.
The classes of one kind share their code (``_CondConv``, ``_DynamicConv``, ``_ODConv``), the rank is their
``spatial_dims``, and the engine runs every rank on one code path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from condconv.nn.functional import (
    PADDING_MODES,
    SPATIAL_AXES,
    STRATEGIES,
    _Call,
    _checked_call,
    _ntuple,
    _run_validated,
    _validate,
    get_default_strategy,
    resolve_padding,
)
from condconv.nn.ops.context import autocast_on, tracing_kind
from condconv.nn.routing import (
    OmniRouter,
    SigmoidRouter,
    SoftmaxRouter,
    _check_dropout,
    _check_init,
    _check_temperature,
)
from condconv.utils.checks import positive_int as _positive_int

__all__ = ["CondConv1d", "CondConv2d", "CondConv3d", "DynamicConv1d", "DynamicConv2d", "DynamicConv3d", "ODConv1d",
           "ODConv2d", "ODConv3d", "make_conv2d", "DynamicConvBase", "LAYERS", "LAYERS_BY_RANK", "TORCH_CONVS",
           "CONV_KINDS", "DYNAMIC_KINDS", "spatial_ranks"]

#: The static convolution of each spatial rank, the one a dynamic layer of that rank replaces.
TORCH_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class DynamicConvBase(nn.Module):
    """Shared configuration, parameters, validation and execution of the dynamic convolution layers.

    ``spatial_dims`` (a class attribute, 2 unless a subclass says otherwise) is the convolution's rank: the kernel,
    stride, padding and dilation have one entry per spatial axis, the input is ``(B, C_in, *spatial_size)``.
    """

    spatial_dims: int = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int, strategy: str | None = None, init: str = "default") -> None:
        super().__init__()
        self.init = _check_init(init)
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.groups = _positive_int(groups, "groups")
        self.num_experts = _positive_int(num_experts, "num_experts")
        # integer-like values (numpy ints, anything with __index__) as Python ints from here on, as nn.Conv2d
        in_channels, out_channels, groups = self.in_channels, self.out_channels, self.groups
        num_experts = self.num_experts
        if in_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        rank = self.spatial_dims
        self.kernel_size = _ntuple(kernel_size, rank, "kernel_size")
        self.stride = _ntuple(stride, rank, "stride")
        self.dilation = _ntuple(dilation, rank, "dilation")
        for name, value in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation)):
            if min(value) < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        resolve_padding(padding, self.kernel_size, self.stride, self.dilation)  # validates
        self.padding = padding if isinstance(padding, str) else _ntuple(padding, rank, "padding")
        self.padding_mode = padding_mode
        self.strategy = strategy  # validated by the property
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory)) if bias else None
        self.reset_parameters()

    @property
    def strategy(self) -> str | None:
        """The layer's execution strategy (one of :data:`condconv.STRATEGIES`), or ``None`` to follow the global
        default; setting an unknown name raises ``ValueError`` naming it and listing the valid ones."""
        return self.__dict__.get("_strategy")

    @strategy.setter
    def strategy(self, value: str | None) -> None:
        if value is not None and (not isinstance(value, str) or value not in STRATEGIES):
            raise ValueError(f"strategy must be None or one of {STRATEGIES}, got {value!r}")
        self.__dict__["_strategy"] = value

    def __setstate__(self, state: dict) -> None:
        if "strategy" in state:  # a layer pickled when strategy was a plain attribute
            state["_strategy"] = state.pop("strategy")
        super().__setstate__(state)

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first: the layers are not scriptable, so say so and what works instead."""
        raise RuntimeError(f"torch.jit.script does not support {type(self).__name__} (its engine picks a strategy "
                           "per call in Python: keyword-only arguments, context state, custom autograd functions): "
                           "use torch.jit.trace (or condconv.export_model(format='torchscript')), torch.export, or "
                           "torch.compile instead")

    def reset_parameters(self) -> None:
        """Initialise the experts: ``init='default'``: each exactly as ``nn.Conv2d`` (``Conv1d``, ``Conv3d``)
        initialises its kernel (fan-in of one expert); ``init='official'``: each from ``N(0, official_std())``, biases
        zero. Nothing to do on the ``meta`` device (shapes only)."""
        if self.weight.is_meta:
            return
        if self.init == "official":
            nn.init.normal_(self.weight, 0.0, self.official_std())
            if self.bias is not None:
                nn.init.zeros_(self.bias)
            return
        fan_in = math.prod(self.weight.shape[2:])
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[expert], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def official_std(self) -> float:
        """Standard deviation of one expert under ``init='official'``: He normal with the fan-out of one expert,
        ``sqrt(2 / (out_channels * kh * kw))``, as ``torch.nn.init.kaiming_normal_(weight[i], mode='fan_out')``
        computes it per expert in the ODConv code (groups do not reduce PyTorch's fan-out); in any rank the product of
        the kernel's axes."""
        return math.sqrt(2.0 / (self.out_channels * math.prod(self.kernel_size)))

    def _apply(self, fn, recurse=True):
        # ``model.to(memory_format=torch.channels_last)`` converts 4-D and 5-D tensors, and channels_last rejects
        # 5-D ones: convert the expert bank as its view (experts * out_channels, in, *kernel_size), keep it dense
        # (in every rank: a 1-D layer's 4-D bank is not an image batch either).
        bank = self.spatial_dims + 3

        def convert(t: Tensor) -> Tensor:
            if t.dim() != bank:
                return fn(t)
            return fn(t.flatten(0, 1)).reshape(t.shape).contiguous()

        return super()._apply(convert, recurse)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"{type(self).__name__} expects a {self.spatial_dims + 2}-D input (batch, "
                             f"{self.in_channels}, {', '.join(SPATIAL_AXES[self.spatial_dims])}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        if x.dtype != self.weight.dtype and not autocast_on(x.device.type):
            raise TypeError(f"{type(self).__name__} has {self.weight.dtype} weights but got a {x.dtype} input (shape "
                            f"{tuple(x.shape)}): convert one to the other (model.to(dtype) or x.to(dtype)) or run "
                            "under torch.autocast")

    def _plan(self, x: Tensor, spatial: bool = False) -> _Call | None:
        """Check the input (once per input shape, dtype and device) and return the engine's validated call.

        The engine's validation costs more than the convolution itself at batch 1, so in eager mode it runs on the
        first call for each input signature and is reused; while tracing (export, compile) nothing is cached and
        ``None`` sends the call through :func:`condconv.dynamic_conv`'s full checks.
        """
        if tracing_kind() is not None or not isinstance(x, Tensor):
            self._check_input(x)
            return None
        weight, bias = self._parameters["weight"], self._parameters.get("bias")
        key = (x.shape, x.dtype, x.device, autocast_on(x.device.type), spatial, weight.shape, weight.dtype,
               weight.device, self.stride, self.padding, self.dilation, self.groups, self.padding_mode,
               None if bias is None else bias.shape)
        plans = self.__dict__.setdefault("_plans", {})
        call = plans.get(key)
        if call is None:
            self._check_input(x)
            batch = x.shape[0]
            routing = x.new_empty((batch, self.num_experts), dtype=self.weight.dtype)
            placeholder = x.new_empty((batch, *self.kernel_size), dtype=self.weight.dtype) if spatial else None
            call = _validate(x, self.weight, routing, self.bias, self.stride, self.padding, self.dilation,
                             self.groups, self.padding_mode, placeholder)
            if len(plans) >= 16:
                plans.clear()
            plans[key] = call
        return call

    def _check_routing(self, routing: Tensor, batch: int) -> None:
        if not isinstance(routing, Tensor):
            raise TypeError(f"routing_weights must be a torch.Tensor, got {type(routing).__name__}")
        if routing.dim() != 2 or routing.shape[0] != batch or routing.shape[1] != self.num_experts:
            raise ValueError(f"routing_weights must have shape (batch, num_experts) = ({batch}, {self.num_experts}), "
                             f"got {tuple(routing.shape)}")

    def _run(self, x: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None = None,
             call: _Call | None = None, *, in_scale: Tensor | None = None,
             out_scale: Tensor | None = None) -> Tensor:
        strategy = self.strategy if self.strategy is not None else get_default_strategy()
        if call is not None:
            return _run_validated(x, self.weight, routing, bias, self.groups, self.padding_mode, spatial, strategy,
                                  call, in_scale, out_scale)
        return _checked_call(self.spatial_dims, x, self.weight, routing, bias, self.stride, self.padding,
                             self.dilation, self.groups, self.padding_mode, spatial, in_scale, out_scale, strategy)

    def _load_static(self, conv: nn.Conv2d, gain: float, perturb: float, generator: torch.Generator | None) -> None:
        """Fill every expert with ``conv``'s kernel divided by ``gain`` (the zeroed router's total weight).

        ``perturb`` adds noise of that relative size (times the kernel's std) with zero mean across experts, so the
        mixture, and with it the converted layer's output, stays exactly the original while experts differ.
        """
        if isinstance(perturb, bool) or not isinstance(perturb, (int, float)) or perturb < 0:
            raise ValueError(f"perturb must be a non-negative number, got {perturb!r}")
        with torch.no_grad():
            base = conv.weight.detach().to(self.weight.dtype) / gain
            self.weight.copy_(base.unsqueeze(0).expand_as(self.weight))
            if perturb > 0 and self.num_experts > 1:
                noise = torch.randn(self.weight.shape, generator=generator, dtype=self.weight.dtype,
                                    device="cpu").to(self.weight.device)
                noise -= noise.mean(0, keepdim=True)
                self.weight.add_(noise * (perturb * base.std()))
            if self.bias is not None:
                if conv.bias is None:
                    self.bias.zero_()
                else:
                    b = conv.bias.detach().to(self.bias.dtype)
                    self.bias.copy_((b / gain).unsqueeze(0).expand_as(self.bias))

    @classmethod
    def _conv_args(cls, conv: nn.Module) -> dict:
        expected = TORCH_CONVS[cls.spatial_dims]
        if not isinstance(conv, expected):
            raise TypeError(f"conv must be a torch.nn.{expected.__name__}, got {type(conv).__name__}")
        return {
            "in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size,
            "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
            "bias": conv.bias is not None, "padding_mode": conv.padding_mode, "device": conv.weight.device,
            "dtype": conv.weight.dtype,
        }

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"num_experts={self.num_experts}")
        if self.padding not in ((0,) * self.spatial_dims, "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self.spatial_dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.strategy is not None:
            s += f", strategy={self.strategy!r}"
        return s


class _CondConv(DynamicConvBase):
    """CondConv in any rank: the code of :class:`CondConv1d`, :class:`CondConv2d` and :class:`CondConv3d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int = 8, routing: str = "sigmoid", temperature: float = 1.0,
                 routing_dropout: float = 0.0, strategy: str | None = None, init: str = "default") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, num_experts=num_experts, strategy=strategy, init=init)
        factory = {"device": device, "dtype": dtype}
        _check_temperature(temperature)  # validated whatever the routing, so a bad value never passes silently
        _check_dropout(routing_dropout)
        if routing == "sigmoid":
            self.router = SigmoidRouter(self.in_channels, self.num_experts, routing_dropout, init=init, **factory)
        elif routing == "softmax":
            self.router = SoftmaxRouter(self.in_channels, self.num_experts, temperature=temperature,
                                        dropout=routing_dropout, init=init, **factory)
        elif routing == "external":
            self.router = None
        else:
            raise ValueError(f"routing must be 'sigmoid', 'softmax' or 'external', got {routing!r}")
        self.routing = routing

    def official_std(self) -> float:
        """``sqrt(2 / (kh * kw * out_channels / groups))``: TensorFlow's fan-out (see ``init`` of
        :class:`CondConv2d`; in any rank the product of the kernel's axes)."""
        return math.sqrt(2.0 * self.groups / (self.out_channels * math.prod(self.kernel_size)))

    def forward(self, x: Tensor, routing_weights: Tensor | None = None) -> Tensor:
        call = self._plan(x)
        if routing_weights is None:
            if self.router is None:
                raise ValueError(f"this {type(self).__name__} has routing='external': pass routing_weights of shape "
                                 f"(batch, {self.num_experts}) to forward()")
            routing_weights = self.router(x)
        else:
            self._check_routing(routing_weights, x.shape[0])
        return self._run(x, routing_weights, self.bias, call=call)

    @classmethod
    def from_conv(cls, conv: nn.Module, *, num_experts: int = 8, perturb: float = 0.0,
                  generator: torch.Generator | None = None, **kwargs) -> _CondConv:
        """A CondConv layer computing exactly what ``conv`` computes, until training changes it.

        The router's output layer is zeroed (routing is a constant 0.5, or ``1/E`` for softmax) and each expert is
        set to ``conv.weight`` divided by the routing's sum; ``perturb`` adds zero-mean noise across experts
        (relative to the kernel's std) so experts can diverge in fine-tuning without changing the output now.
        With ``routing='external'`` the experts are scaled for routing weights that sum to 1. ``conv``: the
        ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` of the class's rank.
        """
        layer = cls(**cls._conv_args(conv), num_experts=num_experts, **kwargs)
        gain = 1.0 if layer.router is None else layer.router.zero_().constant_sum()
        layer._load_static(conv, gain, perturb, generator)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.routing == "sigmoid" else f", routing={self.routing!r}")


class CondConv2d(_CondConv):
    """Conditionally parameterized convolution: ``conv(x, sum_i r_i(x) W_i)`` with ``r = sigmoid(GAP(x) R)``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
            dtype: as :class:`torch.nn.Conv2d`.
        num_experts: number of expert kernels. Default 8.
        routing: ``'sigmoid'`` (default, the paper's), ``'softmax'`` (with ``temperature``), or ``'external'``: no
            router of its own; ``forward`` must then be given ``routing_weights`` (to share one routing across
            a block's convolutions, as the official EfficientNet-CondConv code does).
        temperature: softmax temperature (``routing='softmax'`` only). Default 1.
        routing_dropout: dropout on the pooled routing input (this library's option; the official code has none).
            Default 0.
        strategy: execution strategy (:data:`condconv.STRATEGIES`); ``None`` follows the global default.
        init: ``'default'`` or ``'official'``: the official EfficientNet-CondConv code (tensorflow/tpu
            ``models/official/efficientnet/condconv/condconv_layers.py``, ``get_condconv_initializer``) initialises
            every expert separately with ``conv_kernel_initializer`` of ``efficientnet_model.py``: a normal (not
            truncated) of std ``sqrt(2 / fan_out)``, ``fan_out = kh * kw * out_channels`` for a dense kernel and
            ``kh * kw * depth_multiplier`` for a depthwise one, i.e. ``kh * kw * out_channels / groups`` here;
            biases zero; its router Glorot-uniform with zero bias (:class:`condconv.SigmoidRouter`).

    Shape:
        ``forward(x, routing_weights=None)``: ``x`` ``(B, C_in, H, W)``, ``routing_weights`` ``(B, num_experts)``
        -> ``(B, C_out, H_out, W_out)``.
    """

    spatial_dims = 2


class CondConv1d(_CondConv):
    """:class:`CondConv2d` over sequences: :class:`torch.nn.Conv1d`'s arguments, the same options and routers.

    Shape:
        ``forward(x, routing_weights=None)``: ``x`` ``(B, C_in, L)`` -> ``(B, C_out, L_out)``; ``weight``
        ``(num_experts, out_channels, in_channels // groups, k)``.
    """

    spatial_dims = 1


class CondConv3d(_CondConv):
    """:class:`CondConv2d` over volumes (video, 3-D scans): :class:`torch.nn.Conv3d`'s arguments, the same options.

    Shape:
        ``forward(x, routing_weights=None)``: ``x`` ``(B, C_in, D, H, W)`` -> ``(B, C_out, D_out, H_out, W_out)``;
        ``weight`` ``(num_experts, out_channels, in_channels // groups, kd, kh, kw)``.
    """

    spatial_dims = 3


class _DynamicConv(DynamicConvBase):
    """DynamicConv in any rank: the code of :class:`DynamicConv1d`, :class:`DynamicConv2d`, :class:`DynamicConv3d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int = 4, reduction: int = 4, temperature: float = 1.0,
                 strategy: str | None = None, init: str = "default") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, num_experts=num_experts, strategy=strategy, init=init)
        self.router = SoftmaxRouter(self.in_channels, self.num_experts, reduction=reduction, temperature=temperature,
                                    init=init, device=device, dtype=dtype)

    def forward(self, x: Tensor, routing_weights: Tensor | None = None) -> Tensor:
        call = self._plan(x)
        if routing_weights is None:
            routing_weights = self.router(x)
        else:
            self._check_routing(routing_weights, x.shape[0])
        return self._run(x, routing_weights, self.bias, call=call)

    @classmethod
    def from_conv(cls, conv: nn.Module, *, num_experts: int = 4, perturb: float = 0.0,
                  generator: torch.Generator | None = None, **kwargs) -> _DynamicConv:
        """A layer computing exactly what ``conv`` (the ``nn.Conv1d/2d/3d`` of the class's rank) computes (uniform
        routing, every kernel = ``conv``'s)."""
        layer = cls(**cls._conv_args(conv), num_experts=num_experts, **kwargs)
        layer._load_static(conv, layer.router.zero_().constant_sum(), perturb, generator)
        return layer


class DynamicConv2d(_DynamicConv):
    """Dynamic convolution: ``conv(x, sum_i a_i(x) W_i)`` with ``a = softmax(MLP(GAP(x)) / T)``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
            dtype: as :class:`torch.nn.Conv2d`.
        num_experts: number of kernels. Default 4.
        reduction: the routing MLP's hidden width is ``max(in_channels // reduction, 4)``. Default 4.
        temperature: softmax temperature, a buffer; anneal it with :class:`condconv.TemperatureSchedule`. Default 1.
        strategy: execution strategy; ``None`` follows the global default.
        init: ``'default'`` or ``'official'``. DynamicConv has no official code: ``'official'`` is the
            initialisation of the official code of its successor ODConv (OSVAI/ODConv ``modules/odconv.py``): each
            expert He normal with the fan-out of one expert, ``kaiming_normal_(weight[i], mode='fan_out')``; zero
            biases; the attention He normal fan-out with zero biases (:class:`condconv.SoftmaxRouter`).

    Shape:
        ``forward(x, routing_weights=None)``: ``(B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``.
    """

    spatial_dims = 2


class DynamicConv1d(_DynamicConv):
    """:class:`DynamicConv2d` over sequences: :class:`torch.nn.Conv1d`'s arguments, the same options and router.

    Shape:
        ``forward(x, routing_weights=None)``: ``(B, C_in, L)`` -> ``(B, C_out, L_out)``; ``weight`` ``(num_experts,
        out_channels, in_channels // groups, k)``.
    """

    spatial_dims = 1


class DynamicConv3d(_DynamicConv):
    """:class:`DynamicConv2d` over volumes: :class:`torch.nn.Conv3d`'s arguments, the same options and router.

    Shape:
        ``forward(x, routing_weights=None)``: ``(B, C_in, D, H, W)`` -> ``(B, C_out, D_out, H_out, W_out)``;
        ``weight`` ``(num_experts, out_channels, in_channels // groups, kd, kh, kw)``.
    """

    spatial_dims = 3


class _ODConv(DynamicConvBase):
    """ODConv in any rank: the code of :class:`ODConv1d`, :class:`ODConv2d` and :class:`ODConv3d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int = 4, reduction: float = 1 / 16, min_channels: int = 16, temperature: float = 1.0,
                 norm: str = "layer", strategy: str | None = None, init: str = "default") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, num_experts=num_experts, strategy=strategy, init=init)
        self.router = OmniRouter(self.in_channels, self.out_channels, self.kernel_size, self.groups, self.num_experts,
                                 reduction=reduction, min_channels=min_channels, temperature=temperature, norm=norm,
                                 init=init, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        call = self._plan(x, spatial=self.router.spatial is not None)
        att = self.router(x)
        routing = att.expert if att.expert is not None else x.new_ones((x.shape[0], 1), dtype=self.weight.dtype)
        # the channel attentions and the bias go to the engine with the kernel: one fused call with 'triton'
        return self._run(x, routing, self.bias, att.spatial, call, in_scale=att.in_channel,
                         out_scale=att.out_channel)

    @classmethod
    def from_conv(cls, conv: nn.Module, *, num_experts: int = 4, perturb: float = 0.0,
                  generator: torch.Generator | None = None, **kwargs) -> _ODConv:
        """A layer computing exactly what ``conv`` (the ``nn.Conv1d/2d/3d`` of the class's rank) computes (constant
        attentions, experts rescaled)."""
        layer = cls(**cls._conv_args(conv), num_experts=num_experts, **kwargs)
        gain = layer.router.zero_().constant_gain()
        layer._load_static(conv, gain, perturb, generator)
        if layer.bias is not None and conv.bias is not None:
            with torch.no_grad():  # the bias is added after the attentions: it must not be rescaled
                layer.bias.copy_(conv.bias.detach().to(layer.bias.dtype).unsqueeze(0).expand_as(layer.bias))
        return layer


class ODConv2d(_ODConv):
    """Omni-dimensional dynamic convolution.

    Per example: ``conv(x, sum_i a_e[i] * (a_s ⊙ a_in ⊙ a_out ⊙ W_i)) + sum_i a_e[i] * b_i``, computed as
    ``a_out ⊙ conv(a_in ⊙ x, sum_i a_e[i] * (a_s ⊙ W_i))``: the channel attentions scale the input and output
    maps, and only spatial x expert attention is mixed into the kernel. The attentions come from one
    :class:`condconv.OmniRouter`; heads that are meaningless for the shape are skipped (spatial for 1x1 kernels,
    output channel for depthwise layers, expert for a single expert).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
            dtype: as :class:`torch.nn.Conv2d`.
        num_experts: number of kernels. Default 4.
        reduction: attention trunk width relative to ``in_channels``. Default 1/16.
        min_channels: smallest attention trunk width. Default 16.
        temperature: attention temperature, a buffer. Default 1.
        norm: trunk normalisation, ``'layer'`` (default, works at batch size 1), ``'batch'`` (the official code's
            ``BatchNorm2d``, same parameters) or ``'none'``.
        strategy: execution strategy; ``None`` follows the global default.
        init: ``'default'`` or ``'official'``, as OSVAI/ODConv ``modules/odconv.py`` does: each expert
            ``kaiming_normal_(weight[i], mode='fan_out', nonlinearity='relu')`` (std ``sqrt(2 / (out_channels * kh
            * kw))``, per expert, so the 5-D bank does not get a wrong fan); zero biases (the official layer has
            none); attention trunk and heads He normal fan-out with zero biases (:class:`condconv.OmniRouter`).

    Shape:
        ``forward(x)``: ``(B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``.
    """

    spatial_dims = 2


class ODConv1d(_ODConv):
    """:class:`ODConv2d` over sequences: :class:`torch.nn.Conv1d`'s arguments, the same options; the spatial
    attention has one value per kernel position (``k``).

    Shape:
        ``forward(x)``: ``(B, C_in, L)`` -> ``(B, C_out, L_out)``; ``weight`` ``(num_experts, out_channels,
        in_channels // groups, k)``.
    """

    spatial_dims = 1


class ODConv3d(_ODConv):
    """:class:`ODConv2d` over volumes: :class:`torch.nn.Conv3d`'s arguments, the same options; the spatial
    attention has one value per kernel position (``kd * kh * kw``).

    Shape:
        ``forward(x)``: ``(B, C_in, D, H, W)`` -> ``(B, C_out, D_out, H_out, W_out)``; ``weight`` ``(num_experts,
        out_channels, in_channels // groups, kd, kh, kw)``.
    """

    spatial_dims = 3


#: The dynamic convolution kinds and their layer classes: the one table that ``make_conv2d``, ``convert``, the MAC
#: counter, the benchmarks and the command line derive their choices from.
LAYERS: dict[str, type[DynamicConvBase]] = {"condconv": CondConv2d, "dynamic": DynamicConv2d, "odconv": ODConv2d}
#: :data:`LAYERS` for every spatial rank (1, 2, 3): what ``convert`` puts in place of an ``nn.Conv1d/2d/3d``.
LAYERS_BY_RANK: dict[int, dict[str, type[DynamicConvBase]]] = {
    1: {"condconv": CondConv1d, "dynamic": DynamicConv1d, "odconv": ODConv1d},
    2: LAYERS,
    3: {"condconv": CondConv3d, "dynamic": DynamicConv3d, "odconv": ODConv3d},
}
DYNAMIC_KINDS = tuple(LAYERS)
#: ``conv=`` values of the model zoo: a plain ``nn.Conv2d`` or one of :data:`LAYERS`.
CONV_KINDS = ("static", *DYNAMIC_KINDS)


def spatial_ranks(model: nn.Module) -> list[int]:
    """The spatial ranks (1, 2, 3) of the convolutions of ``model``, static (``nn.Conv1d/2d/3d``) and dynamic, in
    increasing order; ``[2]`` for a model without any (what the MAC counter and the exporter expect of an input)."""
    ranks = set()
    for module in model.modules():
        if isinstance(module, DynamicConvBase):
            ranks.add(module.spatial_dims)
        else:
            ranks.update(rank for rank, cls in TORCH_CONVS.items() if isinstance(module, cls))
    return sorted(ranks) or [2]


def make_conv2d(conv: str, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                groups: int = 1, bias: bool = True, *, num_experts: int | None = None, **layer_kwargs) -> nn.Module:
    """Build a convolution of the requested kind, so blocks gain dynamic variants without being rewritten.

    Args:
        conv: ``'static'`` (a plain :class:`torch.nn.Conv2d`), ``'condconv'``, ``'dynamic'`` or ``'odconv'``.
        num_experts: experts of a dynamic layer; ``None`` takes the layer's default. Ignored for ``'static'``.
        **layer_kwargs: further arguments of the chosen layer (``padding_mode``, ``routing``, ``temperature``,
            ``init='default'|'official'``...); the dynamic-only ones are ignored for ``'static'``.
    """
    if conv == "static":
        layer_kwargs = {k: v for k, v in layer_kwargs.items() if k in ("padding_mode", "device", "dtype")}
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         **layer_kwargs)
    if conv not in LAYERS:
        raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")
    if num_experts is not None:
        layer_kwargs["num_experts"] = num_experts
    return LAYERS[conv](in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         **layer_kwargs)
