"""Multiply-adds and parameters per image, with the conventions of the CondConv paper (Yang et al., "CondConv:
Conditionally Parameterized Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971).

Conventions (one multiply-add = one MAC, counted for one image):

- ``conv``: convolutions and linear layers outside routers, ``C_out * H_out * W_out * C_in / groups * kh * kw``
  (``in * out`` for a linear layer; for 1-D and 3-D convolutions the product over their output and kernel axes); a
  dynamic convolution counts as the static convolution of the same shape.
  Bias additions are not multiply-adds and are not counted.
- ``routing``: the routers: their layers (CondConv's ``Linear(C_in, E)``, DynamicConv's MLP, ODConv's trunk and
  heads) and their global average pooling of the routed input, ``C_in * H * W``.
- ``mixing``: forming the per-example kernel, ``E * params(one expert)`` (kernel and bias) per dynamic layer;
  for ODConv also its attention multiplies: the spatial attention on the mixed kernel (``params(one expert)``),
  the input-channel attention on the input (``C_in * H * W``) and the output-channel attention on the output
  (``C_out * H_out * W_out``).
- KernelWarehouse layers (Li and Yao, ICML 2024, arXiv:2406.07879): ``conv`` as the static convolution; ``mixing``
  the assembly of the kernel, ``M * C * cell_size`` (each of the layer's ``M`` cells a mixture of the warehouse's
  ``C`` cells); ``routing`` the attention's layers and pooling. The warehouse cells count as ``conv`` parameters.
- ``other``: average pooling (global: ``C * H * W``, the depthwise convolution it equals) and squeeze-excite
  gating (``C * H * W``, a depthwise 1x1 convolution with a computed kernel), both outside routers; and the
  parameters of normalisation layers. BatchNorm (folded into the convolution at inference), activations,
  max-pooling, dropout and residual additions count 0.

So a per-channel scaling or an average of a feature map counts like the depthwise convolution it is; with it
EfficientNet-B0 counts 390.5M (the official 391M) instead of 385.8M for its convolutions alone.

These are the ``convention='default'`` rules, the CondConv paper's (and the ones its figures, DynamicConv's and the
ODConv paper's DynamicConv rows fit). ``convention='odconv'`` changes one rule, for ODConv layers only: the kernel
is formed as the official ODConv code (OSVAI/ODConv ``modules/odconv.py``, ``ODConv2d._forward_impl_common``)
computes it, ``spatial_attention * kernel_attention * weight`` then a sum over the E experts, counted one
multiply-add per element-wise multiply and one per accumulation: ``2 * E * params(one expert)``, and nothing for a
1x1 layer with a single expert (``_forward_impl_pw1x`` uses the kernel as it is); the channel attentions on the
input and output maps count as before. :data:`PAPER_CONVENTIONS` records which convention each paper's table fits.

Parameters are every parameter of the model (all experts included), each counted once, in the category of the
module that owns it. Counting uses forward hooks on one batch-1 forward pass without gradients; built on the
``meta`` device a model is counted without allocating its weights (the ``condconv macs`` command does so).
Cross-checked in the tests against :class:`torch.utils.flop_counter.FlopCounterMode` (``flops / 2``) under
``condconv.use_strategy('grouped')``, which executes exactly the kernel mix and one convolution.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from condconv.models.blocks import SqueezeExcite
from condconv.models.presets import PRESETS
from condconv.nn.kernel_warehouse import KernelWarehouse, KWConvNd
from condconv.nn.kw_attention import KWAttention
from condconv.nn.layers import DynamicConvBase, spatial_ranks
from condconv.nn.routing import ROUTERS, OmniRouter

__all__ = [
    "CATEGORIES",
    "Cost",
    "ModuleCost",
    "MacReport",
    "count_macs",
    "CONVENTIONS",
    "PAPER_CONVENTIONS",
    "PAPER_FIGURES",
    "PaperFigure",
]

logger = logging.getLogger(__name__)

CATEGORIES = ("conv", "routing", "mixing", "other")
CONVENTIONS = ("default", "odconv")
#: The counting convention under which each paper's cost table is reproduced (see the module docstring).
PAPER_CONVENTIONS = {"condconv": "default", "dynamic": "default", "odconv": "odconv"}
_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d,
              nn.AvgPool3d)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
#: The static convolutions counted (any rank).
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Cost:
    """Multiply-adds and parameters of one category."""

    macs: int = 0
    params: int = 0


@dataclass(frozen=True)
class ModuleCost:
    """One module's own cost (its direct parameters; MACs of all its calls in the forward pass).

    Attributes:
        name: qualified module name (``''`` for the model itself).
        type: class name.
        category: the category its parameters belong to.
        macs: total multiply-adds of the module.
        params: parameters the module owns directly (not those of its children).
        macs_by_category: ``macs`` split by category (a dynamic convolution has ``conv`` and ``mixing``).
    """

    name: str
    type: str
    category: str
    macs: int
    params: int
    macs_by_category: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MacReport:
    """Result of :func:`count_macs`: per-image totals, per category and per module.

    Attributes:
        macs: multiply-adds for one image.
        params: parameters of the model.
        categories: :data:`CATEGORIES` -> :class:`Cost`.
        modules: the modules with MACs or parameters, in registration order.
        input_size: the ``(C, H, W)`` counted (``(C, L)`` / ``(C, D, H, W)`` for 1-D / 3-D models).
    """

    macs: int
    params: int
    categories: dict[str, Cost]
    modules: list[ModuleCost]
    input_size: tuple[int, ...]

    def table(self, top: int | None = None) -> str:
        """A text table of the modules (the ``top`` costliest by MACs, all when ``None``) and the categories."""
        rows = sorted(self.modules, key=lambda m: -m.macs)[:top] if top else self.modules
        width = max([len(m.name) for m in rows] + [7])
        lines = [f"{'module':<{width}}  {'type':<18} {'params':>12} {'MACs':>14}  MACs by category"]
        for m in rows:
            split = " + ".join(f"{cat} {value:,}" for cat, value in m.macs_by_category.items())
            lines.append(f"{m.name or '(model)':<{width}}  {m.type:<18} {m.params:>12,} {m.macs:>14,}  {split}")
        lines.append("")
        lines += [f"{cat:<8} MACs {cost.macs:>14,}  params {cost.params:>12,}" for cat, cost in self.categories.items()]
        lines.append(f"{'total':<8} MACs {self.macs:>14,}  params {self.params:>12,}  input {self.input_size}")
        return "\n".join(lines)


def _conv_macs(module: nn.Module, output: torch.Tensor) -> int:
    return output[0].numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _dynamic_macs(layer: DynamicConvBase, inputs: torch.Tensor, output: torch.Tensor,
                  convention: str = "default") -> dict[str, int]:
    expert = layer.weight[0].numel() + (layer.bias.shape[1] if layer.bias is not None else 0)
    mixing = layer.num_experts * expert
    router = layer.router
    if isinstance(router, OmniRouter):
        if convention == "odconv":  # the official code's kernel: multiply by the attentions, sum over experts
            pointwise_single = layer.num_experts == 1 and all(k == 1 for k in layer.kernel_size)
            mixing = 0 if pointwise_single else 2 * layer.num_experts * layer.weight[0].numel()
        elif router.spatial is not None:
            mixing += layer.weight[0].numel()
        if router.in_channel is not None:
            mixing += inputs[0].numel()
        if router.out_channel is not None:
            mixing += output[0].numel()
    return {"conv": _conv_macs(layer, output), "mixing": mixing}


def _kw_macs(layer: KWConvNd, output: torch.Tensor) -> dict[str, int]:
    """KernelWarehouse layer: the convolution, and the assembly ``attention (M, C) @ cells (C, cell_size)``."""
    attention = layer.attention
    cell_size = math.prod(layer.cell_shape)
    conv = output[0].numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    return {"conv": conv, "mixing": attention.num_mixtures * attention.num_cells * cell_size}


def _pool_macs(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    """Average pooling: one accumulate per input element (adaptive) or per kernel tap of each output."""
    if isinstance(module, _ADAPTIVE_POOLS):
        return inputs[0].numel()
    rank = inputs.dim() - 2  # batched input: (B, C, *spatial)
    kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * rank
    return output[0].numel() * math.prod(kernel)


def _categorise(model: nn.Module) -> dict[int, str]:
    """Parameter category of every module: routers' insides -> routing; convolutions, linear layers -> conv."""
    category = {}
    for module in model.modules():
        if isinstance(module, (DynamicConvBase, *_CONVS, nn.Linear, KWConvNd)):
            category.setdefault(id(module), "conv")
        if isinstance(module, KernelWarehouse):  # the cells (held by its ParameterList) are the kernels
            for inner in module.modules():
                category[id(inner)] = "conv"
        if isinstance(module, (*ROUTERS, KWAttention)):
            for inner in module.modules():
                category[id(inner)] = "routing"
    return category


_INPUT_LAYOUTS = {1: "two positive ints (channels, length)", 2: "three positive ints (channels, height, width)",
                  3: "four positive ints (channels, depth, height, width)"}


def _check_input_size(model: nn.Module, input_size) -> tuple[int, ...]:
    """``input_size`` as a tuple, with one spatial size per axis of the model's convolutions (``ValueError``)."""
    size = tuple(input_size)
    ranks = spatial_ranks(model)
    if len(size) - 1 not in ranks or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        expected = " or ".join(_INPUT_LAYOUTS.get(rank, f"{rank + 1} positive ints") for rank in ranks)
        raise ValueError(f"input_size must be {expected}, got {input_size!r}")
    return size


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), *,
               convention: str = "default") -> MacReport:
    """Count multiply-adds (per image) and parameters of ``model`` with the CondConv paper's conventions.

    Args:
        model: any module taking one ``(B, C, H, W)`` tensor (``(B, C, L)`` / ``(B, C, D, H, W)`` for a model of 1-D /
            3-D convolutions); its training mode is restored afterwards.
        input_size: ``(C, H, W)`` of one image (``(C, L)``, ``(C, D, H, W)`` for 1-D / 3-D). Default
            ``(3, 224, 224)``.
        convention: ``'default'`` (the CondConv paper's) or ``'odconv'`` (ODConv layers' kernel counted as the
            official ODConv code forms it); see the module docstring and :data:`PAPER_CONVENTIONS`.

    Returns:
        A :class:`MacReport` (see the module docstring for what each category holds).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = _check_input_size(model, input_size)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    category = _categorise(model)
    macs: dict[int, dict[str, int]] = {}

    def hook(module: nn.Module, inputs: tuple, output) -> None:
        if isinstance(module, DynamicConvBase):
            counted = _dynamic_macs(module, inputs[0], output, convention)
        elif isinstance(module, KWConvNd):
            counted = _kw_macs(module, output)
        elif isinstance(module, _CONVS):
            counted = {category[id(module)]: _conv_macs(module, output)}
        elif isinstance(module, nn.Linear):
            counted = {category[id(module)]: output.numel() * module.in_features}
        elif isinstance(module, (*ROUTERS, KWAttention)):
            counted = {"routing": inputs[0][0].numel()}  # its global average pooling
        elif isinstance(module, _AVG_POOLS):
            counted = {category.get(id(module), "other"): _pool_macs(module, inputs[0], output)}
        elif isinstance(module, SqueezeExcite):
            counted = {"other": inputs[0][0].numel()}  # the gating multiply (its pooling is a module)
        else:
            return
        totals = macs.setdefault(id(module), {})
        for cat, value in counted.items():
            totals[cat] = totals.get(cat, 0) + value

    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        model(torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    rows, cat_macs, cat_params = [], dict.fromkeys(CATEGORIES, 0), dict.fromkeys(CATEGORIES, 0)
    seen: set[int] = set()  # a parameter shared by several modules counts once
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        params = sum(p.numel() for p in own)
        split = macs.get(id(module), {})
        if not params and not split:
            continue
        cat = category.get(id(module), "other")
        cat_params[cat] += params
        for c, value in split.items():
            cat_macs[c] += value
        rows.append(ModuleCost(name, type(module).__name__, cat, sum(split.values()), params, dict(split)))
    categories = {c: Cost(cat_macs[c], cat_params[c]) for c in CATEGORIES}
    return MacReport(sum(cat_macs.values()), sum(cat_params.values()), categories, rows, size)


@dataclass(frozen=True)
class PaperFigure:
    """A published cost figure (224x224 input, 1000 classes).

    Attributes:
        model: registered name. experts: 1 for the static baseline. macs, params: in millions (None: not given).
        source: where the figure comes from.
        note: why our count differs, where it does by more than the tolerance of the tests.
    """

    model: str
    experts: int
    macs: float
    params: float | None = None
    source: str = "CondConv paper, Table 2"
    note: str = ""


# why a count differs from a static baseline's published figure (the CondConv paper's table)
_BASELINE_NOTES = {
    "mobilenet_v2": "3.4M is the MobileNetV2 paper's 3.47M (weights without BatchNorm) cut to one decimal; with "
                    "BatchNorm 3.50M, as torchvision and timm count",
}


def _condconv_figures() -> tuple[PaperFigure, ...]:
    """The CondConv paper's table as figures: each architecture's static baseline, then its CondConv models (taken
    from the paper presets, :mod:`condconv.models.presets`, the one place the published figures are written)."""
    figures: dict[tuple[str, int], PaperFigure] = {}
    for preset in PRESETS:
        if preset.paper != "condconv" or preset.macs is None:  # no published figure (e.g. timm's B1 weights)
            continue
        figures.setdefault((preset.model, 1), PaperFigure(preset.model, 1, preset.baseline_macs, preset.baseline_params,
                                                          preset.source, _BASELINE_NOTES.get(preset.model, "")))
        experts = preset.kwargs["num_experts"]
        figures[(preset.model, experts)] = PaperFigure(preset.model, experts, preset.macs, preset.params, preset.source)
    return tuple(figures.values())


#: The CondConv paper's cost table (static baselines and CondConv models, 224x224, 1000 classes).
PAPER_FIGURES = _condconv_figures()
