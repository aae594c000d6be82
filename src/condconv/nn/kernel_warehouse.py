"""KernelWarehouse: dynamic convolution whose kernels are assembled from cells shared across layers.

Li and Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024, arXiv:2406.07879.

A :class:`KernelWarehouse` holds, for each group of layers that share one (a *warehouse*), a bank of kernel cells
``(num_cells, cell_out, cell_in, *cell_kernel)``. Each layer's kernel ``(C_out, C_in / groups, *kernel)`` is split into
``M`` cells ("mixtures"): along the output and input channels into blocks of ``cell_out x cell_in`` (the greatest
common divisors of the warehouse's layers' channels, times ``cell_outplane_ratio`` / ``cell_inplane_ratio``) and,
with ``spatial_partition``, along the kernel's positions. Every one of those cells is, per example, a mixture of all
the warehouse's cells with the layer's attention (:class:`~condconv.nn.kw_attention.KWAttention`). The warehouse
has ``int(cell_num_ratio * sum of its layers' M)`` cells: ``cell_num_ratio`` below 1 makes the model smaller than its
static twin (1/4x, 1/2x budgets), above 1 larger (2x, 4x).

Which layers share a warehouse is given by their names and ``sharing_range`` (the official semantics): a layer named
``stage2_layer1_conv0`` goes to warehouse ``stage2_layer_conv`` with ``sharing_range=('layer', 'conv')``: each
``_``-separated part that starts with a listed prefix is replaced by it.

Execution: assembling the per-example kernels is a mixing step, ``attention (B*M, C) @ cells (C, cell_size)``
(:func:`condconv.nn.functional.mix_kernels`); the assembled kernels then go through the engine's strategies
(:func:`condconv.nn.functional.conv_with_kernels`).

Example:
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.warehouse = KernelWarehouse(cell_num_ratio=0.5, sharing_range=("conv",))
    ...         self.a = KWConv2d(16, 32, 3, padding=1, bias=False, warehouse=self.warehouse, name="conv0")
    ...         self.b = KWConv2d(32, 32, 3, padding=1, bias=False, warehouse=self.warehouse, name="conv1")
    ...         self.warehouse.build(self)  # after every layer is made
    ...     def forward(self, x):
    ...         return self.b(self.a(x))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from condconv.nn.functional import PADDING_MODES, _check_strategy, conv_with_kernels, mix_kernels
from condconv.nn.kw_attention import NORMS, KWAttention
from condconv.utils.checks import positive_int, positive_number

__all__ = ["KernelWarehouse", "KWConvNd", "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "WAREHOUSE_OPTIONS"]

#: Options of a warehouse (:class:`KernelWarehouse`); a layer without a shared warehouse takes them as keywords.
WAREHOUSE_OPTIONS = ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio", "sharing_range",
                     "nonlocal_basis_ratio", "spatial_partition", "norm", "temperature")
_PER_WAREHOUSE = ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio", "spatial_partition")


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")


def _per_warehouse(value, count: int, name: str) -> list:
    """One value per warehouse from a scalar or a sequence of 1 or ``count`` values (the official convention)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ValueError(f"{name} must be one value or one per warehouse ({count}), got {value!r}")
    return values


class KernelWarehouse(nn.Module):
    """The warehouses of a model: their cells (parameters ``cells.{i}``) and which layers draw on them.

    Layers are reserved (by building :class:`KWConv2d` etc. with ``warehouse=``), then :meth:`build` creates the
    cells and every layer's attention. Options may be one value or a sequence with one value per warehouse (in the
    order their first layer was reserved) for ``reduction``, ``cell_num_ratio``, ``cell_inplane_ratio``,
    ``cell_outplane_ratio`` and ``spatial_partition``.

    Args:
        reduction: attention hidden width ratio. Default 0.0625.
        cell_num_ratio: warehouse cells / kernel cells of its layers. Default 1.0.
        cell_inplane_ratio: cell input channels / gcd of the layers' input channels per group. Default 1.0.
        cell_outplane_ratio: cell output channels / gcd of the layers' output channels. Default 1.0.
        sharing_range: name prefixes that merge layers into one warehouse (a ``'layer_conv'`` string is split on
            ``_``). Default ``()``: a warehouse per distinct name.
        nonlocal_basis_ratio: below 1, the attention reaches other layers' cells through a smaller basis.
            Default 1.0.
        spatial_partition: split kernels into cells along their positions too. Default True.
        norm: attention normalisation, one of ``'batch'`` (official), ``'layer'``, ``'none'``. Default ``'batch'``.
        temperature: initial temperature of every attention, in [0, 1]. Default 0.0.
    """

    def __init__(self, *, reduction=0.0625, cell_num_ratio=1.0, cell_inplane_ratio=1.0, cell_outplane_ratio=1.0,
                 sharing_range: Sequence[str] | str = (), nonlocal_basis_ratio: float = 1.0,
                 spatial_partition=True, norm: str = "batch", temperature: float = 0.0) -> None:
        super().__init__()
        if isinstance(sharing_range, str):
            sharing_range = tuple(part for part in sharing_range.split("_") if part)
        if not all(isinstance(s, str) and s for s in sharing_range):
            raise TypeError(f"sharing_range must be a sequence of non-empty strings, got {sharing_range!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        positive_number(nonlocal_basis_ratio, "nonlocal_basis_ratio")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 1:
            raise ValueError(f"temperature must be a number in [0, 1], got {temperature!r}")
        self.options = {"reduction": reduction, "cell_num_ratio": cell_num_ratio,
                        "cell_inplane_ratio": cell_inplane_ratio, "cell_outplane_ratio": cell_outplane_ratio,
                        "spatial_partition": spatial_partition}
        self.sharing_range = tuple(sharing_range)
        self.nonlocal_basis_ratio = float(nonlocal_basis_ratio)
        self.norm = norm
        self.temperature = float(temperature)
        self.names: list[str] = []  # warehouse names, in order of first reservation
        self._layers: list[tuple[int, KWConvNd]] = []
        self.cells = nn.ParameterList()
        self.built = False

    def warehouse_name(self, name: str) -> str:
        """The warehouse a layer named ``name`` draws on (``sharing_range`` applied to each ``_``-separated part)."""
        parts = []
        for part in name.split("_"):
            for prefix in self.sharing_range:
                if part.startswith(prefix):
                    part = prefix
            parts.append(part)
        return "_".join(parts)

    def reserve(self, layer: KWConvNd, name: str) -> int:
        """Record ``layer`` under ``name``; returns the index of its warehouse."""
        if self.built:
            raise RuntimeError("this KernelWarehouse is already built: reserve every layer before build()")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        key = self.warehouse_name(name)
        if key not in self.names:
            self.names.append(key)
        index = self.names.index(key)
        self._layers.append((index, layer))
        return index

    def _cell_shape(self, shapes: list[tuple[int, ...]], index: int, opts: dict) -> tuple[int, ...]:
        """Cell shape ``(cell_out, cell_in, *cell_kernel)`` of warehouse ``index`` from its layers' kernel shapes."""
        out_gcd = math.gcd(*(s[0] for s in shapes))
        in_gcd = math.gcd(*(s[1] for s in shapes))
        dims = {len(s) for s in shapes}
        if len(dims) != 1:
            raise ValueError(f"warehouse {self.names[index]!r} mixes layers of different dimensions")
        if not opts["spatial_partition"] and len({s[2:] for s in shapes}) != 1:
            raise ValueError(f"warehouse {self.names[index]!r} without spatial_partition needs one kernel size, "
                             f"got {sorted({s[2:] for s in shapes})}")
        cell_out = max(int(out_gcd * opts["cell_outplane_ratio"]), 1)
        cell_in = max(int(in_gcd * opts["cell_inplane_ratio"]), 1)
        kernel = (1,) * (len(shapes[0]) - 2) if opts["spatial_partition"] else shapes[0][2:]
        for s in shapes:
            if s[0] % cell_out or s[1] % cell_in:
                raise ValueError(f"warehouse {self.names[index]!r}: cells of {cell_out}x{cell_in} channels do not "
                                 f"divide a layer of kernel shape {s} (check cell_outplane_ratio/cell_inplane_ratio)")
        return (cell_out, cell_in, *kernel)

    def build(self, model: nn.Module | None = None, generator: torch.Generator | None = None) -> None:
        """Create the cells and every reserved layer's attention, and initialise the cells.

        Cells are handed to the layers in the order they appear in ``model.modules()`` (reservation order without a
        model), as the official code allocates them; each layer's own cells get He-normal values (fan-out).
        """
        if self.built:
            raise RuntimeError("this KernelWarehouse is already built")
        if not self._layers:
            raise ValueError("no layer was reserved in this KernelWarehouse")
        count = len(self.names)
        opts = [dict(zip(_PER_WAREHOUSE, values)) for values in
                zip(*(_per_warehouse(self.options[k], count, k) for k in _PER_WAREHOUSE))]
        shapes: list[list[tuple[int, ...]]] = [[] for _ in range(count)]
        for index, layer in self._layers:
            shapes[index].append(layer.kernel_shape)
        cell_shapes = [self._cell_shape(shapes[i], i, opts[i]) for i in range(count)]
        totals = [sum(_mixtures(s, cell_shapes[i]) for s in shapes[i]) for i in range(count)]
        for i in range(count):
            positive_number(opts[i]["cell_num_ratio"], "cell_num_ratio")
            num = max(int(totals[i] * opts[i]["cell_num_ratio"]), 1)
            self.cells.append(nn.Parameter(torch.randn(num, *cell_shapes[i], generator=generator)))
        ordered = self._allocation_order(model)
        ends = [0] * count
        for index, layer in ordered:
            o = opts[index]
            attention = KWAttention(layer.in_channels, len(self.cells[index]), _mixtures(layer.kernel_shape,
                                    cell_shapes[index]), ends[index], o["cell_num_ratio"], reduction=o["reduction"],
                                    norm=self.norm, nonlocal_basis_ratio=self.nonlocal_basis_ratio,
                                    temperature=self.temperature)
            layer._attach(attention, cell_shapes[index])
            with torch.no_grad():
                own = self.cells[index][ends[index]:attention.end]
                if own.numel():
                    own.copy_(_he_fan_out(own, generator))
            ends[index] = attention.end
        for i in range(count):
            if ends[i] != len(self.cells[i]):
                raise ValueError(f"warehouse {self.names[i]!r}: its layers take {ends[i]} cells but it has "
                                 f"{len(self.cells[i])}; cell_num_ratio ({opts[i]['cell_num_ratio']}) must be a whole "
                                 "number or 1/n with every layer's cell count a multiple of n*n")
        self.built = True

    def _allocation_order(self, model: nn.Module | None) -> list[tuple[int, KWConvNd]]:
        if model is None:
            return list(self._layers)
        index_of = {id(layer): index for index, layer in self._layers}
        ordered = [(index_of[id(m)], m) for m in model.modules() if id(m) in index_of]
        if len(ordered) != len(self._layers):
            raise ValueError("model must contain every layer reserved in this KernelWarehouse")
        return ordered

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {tuple(c.shape)}" for name, c in zip(self.names, self.cells))


def _mixtures(kernel_shape: tuple[int, ...], cell_shape: tuple[int, ...]) -> int:
    """How many cells a kernel ``(C_out, C_in / groups, *kernel)`` is split into."""
    return math.prod(k // c for k, c in zip(kernel_shape, cell_shape))


def _he_fan_out(cells: Tensor, generator: torch.Generator | None) -> Tensor:
    """He normal with the official fan-out: the cells seen as ``(n * cell_out, cell_in, *cell_kernel)``."""
    fan_out = cells.shape[0] * cells.shape[1] * math.prod(cells.shape[3:])
    return torch.randn(cells.shape, generator=generator, dtype=cells.dtype) * math.sqrt(2.0 / fan_out)


class KWConvNd(nn.Module):
    """A KernelWarehouse convolution (base of :class:`KWConv1d`, :class:`KWConv2d`, :class:`KWConv3d`).

    Takes :class:`torch.nn.Conv2d`'s arguments (``bias`` is a zero-initialised ``(C_out,)`` parameter, as in the
    official code), then keyword-only:

    Args:
        warehouse: the :class:`KernelWarehouse` to draw cells from (shared; the model owns it and calls its
            :meth:`~KernelWarehouse.build`). ``None``: a private one, built at once from ``**options``.
        name: the layer's warehouse name (see ``sharing_range``). Default ``'default'``.
        strategy: engine strategy for the convolution (:data:`condconv.nn.functional.STRATEGIES`). Default ``'auto'``.
        **options: :data:`WAREHOUSE_OPTIONS` of the private warehouse (only without ``warehouse``).
    """

    dimension = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 warehouse: KernelWarehouse | None = None, name: str = "default", strategy: str = "auto",
                 **options) -> None:
        super().__init__()
        n = self.dimension
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.groups = positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
        self.stride = _tuple(stride, n, "stride")
        self.dilation = _tuple(dilation, n, "dilation")
        self.padding = padding if isinstance(padding, str) else _tuple(padding, n, "padding")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.strategy = _check_strategy(strategy)
        self.kernel_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.attention: KWAttention | None = None
        self.cell_shape: tuple[int, ...] = ()
        unknown = set(options) - set(WAREHOUSE_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; warehouse options: {WAREHOUSE_OPTIONS}")
        if warehouse is None:
            warehouse = KernelWarehouse(**options)
            self.warehouse_index = warehouse.reserve(self, name)
            self.warehouse = warehouse  # private: registered here
            warehouse.build(self)
        else:
            if options:
                raise TypeError(f"{sorted(options)} are options of the shared warehouse, not of its layers")
            if not isinstance(warehouse, KernelWarehouse):
                raise TypeError(f"warehouse must be a KernelWarehouse or None, got {type(warehouse).__name__}")
            self._shared = (warehouse,)  # not registered: the model owns it (one copy of its cells)
            self.warehouse_index = warehouse.reserve(self, name)

    def _get_warehouse(self) -> KernelWarehouse:
        return self._modules["warehouse"] if "warehouse" in self._modules else self._shared[0]

    def _attach(self, attention: KWAttention, cell_shape: tuple[int, ...]) -> None:
        self.attention = attention
        self.cell_shape = tuple(cell_shape)
        self.groups_out = self.kernel_shape[0] // cell_shape[0]
        self.groups_in = self.kernel_shape[1] // cell_shape[1]
        self.groups_spatial = math.prod(k // c for k, c in zip(self.kernel_size, cell_shape[2:]))

    def assemble(self, attention: Tensor) -> Tensor:
        """Per-example kernels ``(B, C_out, C_in / groups, *kernel)`` from an attention ``(B, M, num_cells)``."""
        cells = self._get_warehouse().cells[self.warehouse_index]
        batch = attention.shape[0]
        if attention.dtype != cells.dtype:
            attention = attention.to(cells.dtype)
        mixed = mix_kernels(attention.reshape(-1, cells.shape[0]), cells)  # (B * M, cell_out, cell_in, *cell_k)
        mixed = mixed.reshape(batch, self.groups_spatial, self.groups_out, self.groups_in, *self.cell_shape)
        n = self.dimension
        mixed = mixed.permute(0, 2, 4, 3, 5, 1, *range(6, 6 + n))  # (B, go, co, gi, ci, gs, *cell_k)
        return mixed.reshape(batch, *self.kernel_shape)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C_in, *spatial)`` -> ``(B, C_out, *spatial_out)``."""
        if self.attention is None:
            raise RuntimeError("the KernelWarehouse of this layer is not built yet: call warehouse.build(model)")
        if x.dim() != self.dimension + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (batch, {self.in_channels}, {self.dimension} spatial axes), "
                             f"got shape {tuple(x.shape)}")
        kernels = self.assemble(self.attention(x))
        return conv_with_kernels(x, kernels, self.bias, self.stride, self.padding, self.dilation, self.groups,
                                 self.padding_mode, self.strategy)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")
        return text + f", warehouse={self.warehouse_index}, cell={self.cell_shape}"


class KWConv1d(KWConvNd):
    """KernelWarehouse :class:`torch.nn.Conv1d` (arguments: see :class:`KWConvNd`)."""

    dimension = 1


class KWConv2d(KWConvNd):
    """KernelWarehouse :class:`torch.nn.Conv2d` (arguments: see :class:`KWConvNd`)."""

    dimension = 2


class KWConv3d(KWConvNd):
    """KernelWarehouse :class:`torch.nn.Conv3d` (arguments: see :class:`KWConvNd`)."""

    dimension = 3


class KWLinear(nn.Module):
    """KernelWarehouse :class:`torch.nn.Linear`: a :class:`KWConv1d` with a 1-wide kernel over the middle axes.

    Input ``(B, *, in_features)``; the attention pools over ``*`` per example. Keyword arguments as
    :class:`KWConvNd`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.conv = KWConv1d(in_features, out_features, 1, bias=bias, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, *, in_features)`` -> ``(B, *, out_features)``."""
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must be (batch, ..., {self.in_features}), got shape {tuple(x.shape)}")
        shape = x.shape
        out = self.conv(x.reshape(shape[0], math.prod(shape[1:-1]), shape[-1]).transpose(1, 2))
        return out.transpose(1, 2).reshape(*shape[:-1], self.out_features)
