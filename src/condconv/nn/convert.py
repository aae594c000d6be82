"""Turn the ``nn.Conv2d`` layers of an existing (pretrained) network into dynamic convolutions, function-preserving.

``nn.Conv1d`` and ``nn.Conv3d`` layers (audio, video models) are converted the same way, into the layer of their rank
(``'condconv'`` puts a :class:`~condconv.CondConv1d` in place of an ``nn.Conv1d``, a :class:`~condconv.CondConv3d`
in place of an ``nn.Conv3d``); "convolutions" below means all three.

CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference", NeurIPS 2019,
arXiv:1904.04971) places its layers in the later part of a network; DynamicConv (Chen et al., CVPR 2020,
arXiv:1912.03458) and ODConv (Li, Zhou, Yao, ICLR 2022, arXiv:2209.07947) replace the convolutions of existing
architectures. :func:`convert` does that for any ``nn.Module``: each selected convolution is replaced by
``Layer.from_conv(conv)``, which computes exactly what the convolution computed (the router starts constant and the
experts are rescaled copies of the kernel), so a converted pretrained model keeps its accuracy and fine-tuning starts
from it. A small ``perturb`` makes the experts differ (with zero mean across experts, so the output is still
unchanged): without it, identical experts receive identical gradients and never diverge.

Which layers: by default the last third of the network's convolutions (in registration order, which is execution
order for sequentially written networks; pass ``example_input`` to use the real execution order), following the
papers' placement in the later layers. ``include`` / ``exclude`` take ``fnmatch`` patterns on the dotted module names
(a pattern naming a parent module, e.g. ``'layer4'``, selects every convolution inside it) or predicates
``(name, conv) -> bool``.

Command line: ``condconv convert MODEL --conv condconv --experts 4 --include 'layer4.*' --out DIR``. This module
depends on the layers only; the checkpoint format (:mod:`condconv.models.checkpoint`) uses :func:`apply_conversion` to
rebuild converted models.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from condconv.nn.layers import LAYERS, LAYERS_BY_RANK, TORCH_CONVS, DynamicConvBase

__all__ = [
    "apply_conversion",
    "conversion_spec",
    "convert",
    "list_convs",
    "select_convs",
]

logger = logging.getLogger(__name__)

Selector = str | Callable[[str, nn.Module], bool]


_TORCH_CONV_TYPES = tuple(TORCH_CONVS.values())


def _rank(module: nn.Module) -> int | None:
    """The spatial rank of an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (or subclass), else None."""
    return next((rank for rank, cls in TORCH_CONVS.items() if isinstance(module, cls)), None)


def _is_convertible(module: nn.Module) -> bool:
    """Plain ``nn.Conv1d/2d/3d`` (or a subclass that keeps its forward, e.g. one that only changes initialisation)."""
    rank = _rank(module)
    return rank is not None and type(module).forward is TORCH_CONVS[rank].forward


def _describe(module: nn.Module) -> str:
    if isinstance(module, DynamicConvBase):
        return f"{type(module).__name__}, already dynamic"
    if isinstance(module, _TORCH_CONV_TYPES):
        return f"{type(module).__name__}, an nn.Conv{_rank(module)}d subclass with its own forward"
    dynamic = [name for name, m in module.named_modules() if isinstance(m, DynamicConvBase)]
    if dynamic:
        return f"{type(module).__name__} whose convolutions {', '.join(dynamic[:3])} are already dynamic"
    return type(module).__name__


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules(remove_duplicate=False) if name]


def _execution_order(model: nn.Module, convs: list[tuple[str, nn.Module]], example_input) -> list[str]:
    """Names of ``convs`` in the order a forward pass on ``example_input`` first calls them (unused ones dropped)."""
    order: list[int] = []
    handles = []
    for module in {id(m): m for _, m in convs}.values():
        handles.append(module.register_forward_pre_hook(lambda mod, args: order.append(id(mod))))
    modes = {id(m): m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for m in model.modules():
            m.train(modes[id(m)])
    first_call: dict[int, int] = {}
    for position, key in enumerate(order):
        first_call.setdefault(key, position)
    called = [(name, m) for name, m in convs if id(m) in first_call]
    unused = [name for name, m in convs if id(m) not in first_call]
    if unused:
        logger.debug("convolutions not called by the example input (left out of the default rule): %s", unused)
    return [name for name, m in sorted(called, key=lambda nm: first_call[id(nm[1])])]


def list_convs(model: nn.Module, *, example_input=None) -> list[str]:
    """Dotted names of the convertible ``nn.Conv2d`` (and ``nn.Conv1d``, ``nn.Conv3d``) layers of ``model``.

    Args:
        model: any module.
        example_input: optional input (or tuple of inputs); if given, the names come in the order a forward pass
            calls the layers, and layers it does not call are left out. Otherwise registration order.
    """
    convs = [(name, m) for name, m in _named_modules(model) if _is_convertible(m)]
    if example_input is not None:
        return _execution_order(model, convs, example_input)
    return [name for name, _ in convs]


def _as_selectors(value, argname: str) -> list[Selector]:
    if value is None:
        return []
    if isinstance(value, str) or callable(value):
        value = [value]
    if not isinstance(value, Iterable):
        raise TypeError(f"{argname} must be a pattern string, a predicate (name, module) -> bool, or a list of them, "
                        f"got {type(value).__name__}")
    selectors = list(value)
    for item in selectors:
        if not (isinstance(item, str) or callable(item)):
            raise TypeError(f"{argname} items must be pattern strings or predicates (name, module) -> bool, "
                            f"got {item!r}")
    if not selectors:
        raise ValueError(f"{argname} is an empty list; pass None for the default")
    return selectors


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _selected_by(selector: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, str):
        return any(fnmatch.fnmatchcase(prefix, selector) for prefix in _ancestors(name))
    return bool(selector(name, module))


def _check_pattern_targets(selector: str, hits: list[str], modules: list[tuple[str, nn.Module]], argname: str,
                           convs: list[str]) -> None:
    """A pattern that selects no convertible conv: say what it matched instead, or that it matched nothing."""
    matched = [(name, m) for name, m in modules if fnmatch.fnmatchcase(name, selector)]
    if not matched:
        hint = ", ".join(convs[:8]) + (", ..." if len(convs) > 8 else "")
        raise ValueError(f"{argname} pattern {selector!r} matches no module of the model; its convolutions "
                         f"(nn.Conv1d/2d/3d) are: {hint or 'none'}")
    if not hits:
        what = ", ".join(f"{name} ({_describe(m)})" for name, m in matched[:6])
        raise TypeError(f"{argname} pattern {selector!r} matches no convertible nn.Conv2d, only: {what} (convertible: "
                        "plain nn.Conv1d, nn.Conv2d and nn.Conv3d layers)")


def select_convs(model: nn.Module, include: Selector | Sequence[Selector] | None = None,
                 exclude: Selector | Sequence[Selector] | None = None, *, example_input=None) -> list[str]:
    """Names of the convolutions :func:`convert` would replace (same arguments; see there).

    Raises:
        ValueError: the model has no ``nn.Conv1d/2d/3d``; an ``include`` pattern matches no module; nothing is left.
        TypeError: an ``include`` pattern matches only modules that are not convertible ``nn.Conv1d/2d/3d`` layers
            (e.g. a ``Linear``, an already dynamic layer, or a Conv2d subclass with its own ``forward``).
    """
    modules = _named_modules(model)
    all_convs = [(name, m) for name, m in modules if _is_convertible(m)]
    conv_names = [name for name, _ in all_convs]
    includes = _as_selectors(include, "include")
    excludes = _as_selectors(exclude, "exclude")
    if not all_convs:
        others = sorted({_describe(m) for _, m in modules if isinstance(m, _TORCH_CONV_TYPES)})
        raise ValueError("model has no convertible nn.Conv2d layer (nor nn.Conv1d, nn.Conv3d)"
                         + (f" (found: {', '.join(others)})" if others else ""))
    if includes:
        chosen: set[str] = set()
        for selector in includes:
            hits = [name for name, m in all_convs if _selected_by(selector, name, m)]
            if isinstance(selector, str):
                _check_pattern_targets(selector, hits, modules, "include", conv_names)
                skipped = [name for name, m in modules if not _is_convertible(m)
                           and isinstance(m, _TORCH_CONV_TYPES) and fnmatch.fnmatchcase(name, selector)]
                if skipped:
                    logger.warning("include %r: skipping %s (not a plain nn.Conv1d/2d/3d)", selector, skipped)
            chosen.update(hits)
        if not chosen:
            raise ValueError("include selects no convolution (the predicate returned False for every convolution)")
        order = list_convs(model, example_input=example_input) if example_input is not None else conv_names
        order += [name for name in conv_names if name not in order]
        selected = [name for name in order if name in chosen]
    else:
        order = list_convs(model, example_input=example_input)
        selected = order[len(order) - math.ceil(len(order) / 3):]
    for selector in excludes:
        before = len(selected)
        module_of = dict(all_convs)
        selected = [name for name in selected if not _selected_by(selector, name, module_of[name])]
        if isinstance(selector, str) and before == len(selected):
            warnings.warn(f"exclude pattern {selector!r} removes none of the selected convolutions", stacklevel=3)
    if not selected:
        raise ValueError("no convolution left to convert after exclude")
    return selected


def _layer_class(conv):
    """A layer class with ``from_conv``, or for a kind name its classes by rank (``{1: CondConv1d, ...}``)."""
    if isinstance(conv, str):
        if conv == "static":
            raise ValueError("conv='static' converts nothing: choose 'condconv', 'dynamic' or 'odconv'")
        if conv not in LAYERS:
            raise ValueError(f"conv must be one of {tuple(LAYERS)} (or a layer class with from_conv), "
                             f"got {conv!r}")
        return {rank: layers[conv] for rank, layers in LAYERS_BY_RANK.items()}
    if isinstance(conv, type) and callable(getattr(conv, "from_conv", None)):
        return conv
    raise TypeError(f"conv must be one of {tuple(LAYERS)} or a layer class with a from_conv classmethod, "
                    f"got {conv!r}")


def convert(
    model: nn.Module,
    conv: str | type = "condconv",
    num_experts: int | None = None,
    include: Selector | Sequence[Selector] | None = None,
    exclude: Selector | Sequence[Selector] | None = None,
    perturb: float = 0.0,
    seed: int | None = None,
    inplace: bool = False,
    *,
    example_input=None,
    **layer_kwargs,
) -> tuple[nn.Module, list[str]]:
    """Replace selected ``nn.Conv2d`` (``nn.Conv1d``, ``nn.Conv3d``) layers of ``model`` by dynamic convolutions that
    compute the same function.

    Each selected convolution ``c`` becomes ``Layer.from_conv(c, num_experts=..., perturb=..., generator=...,
    **layer_kwargs)`` on ``c``'s device and dtype and in ``c``'s train/eval mode. Right after conversion the model's
    outputs equal the original's up to float32 round-off (the routers start constant, the experts are rescaled
    copies of the kernel); fine-tuning then lets routing and experts specialise.

    Args:
        model: any ``nn.Module``; a deep copy is converted unless ``inplace``.
        conv: ``'condconv'`` (:class:`condconv.CondConv2d`, default), ``'dynamic'`` (:class:`condconv.DynamicConv2d`)
            or ``'odconv'`` (:class:`condconv.ODConv2d`) — their 1-D / 3-D classes for ``nn.Conv1d`` / ``nn.Conv3d``
            layers — or any layer class with a ``from_conv`` classmethod.
        num_experts: experts per converted layer; ``None`` takes the layer's default (8, 4, 4).
        include: which convolutions to convert. ``None`` (default): the last third (rounded up) of the model's
            convolutions, in registration order or, with ``example_input``, execution order. A string is an
            ``fnmatch`` pattern on dotted module names (``'layer4.*'``, ``'*.conv2'``; a pattern matching a parent
            module, e.g. ``'layer4'``, selects every convolution inside it); a callable ``(name, conv) -> bool`` is
            asked about each convertible convolution; a list selects the union. Every pattern must select at least
            one convolution (a typo raises instead of silently converting nothing).
        exclude: the same forms; removes convolutions from the selection (a pattern removing nothing warns).
        perturb: relative size of the zero-mean noise added to the experts (times the kernel's std), so they can
            diverge in fine-tuning; the output stays unchanged. Default 0: experts start identical and, receiving
            identical gradients, stay identical — use e.g. ``perturb=0.01`` before fine-tuning.
        seed: makes the conversion reproducible: seeds the noise and the routers' random initialisation (the global
            RNG state is left untouched). ``None``: both come from the global RNG.
        inplace: modify ``model`` itself instead of a deep copy.
        example_input: optional input (or tuple of inputs) used only to order the convolutions by execution.
        **layer_kwargs: passed to ``from_conv`` / the layer (e.g. ``routing='softmax'``, ``temperature=30.0``,
            ``reduction=4``, ``strategy='bmm'``).

    Returns:
        ``(converted model, names of the converted layers)``. A convolution registered under several names (shared)
        is converted once and its replacement set under each name; all names are listed.

    Raises:
        ValueError: unknown ``conv``, bad ``num_experts``/``perturb``/``seed``, ``routing='external'``, an
            ``include`` pattern matching no module, an empty selection, a model without ``nn.Conv1d/2d/3d``.
        TypeError: an ``include`` pattern matching only non-convertible modules (``Linear``, already dynamic layers,
            ``ConvNd`` subclasses that override ``forward``), a ``conv`` that is neither a name nor a layer class.

    Example:
        >>> net, names = condconv.convert(resnet, "condconv", num_experts=4, include="layer4.*", perturb=0.01, seed=0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layer_cls = _layer_class(conv)
    if num_experts is not None and (not isinstance(num_experts, int) or isinstance(num_experts, bool)
                                    or num_experts < 1):
        raise ValueError(f"num_experts must be a positive int or None, got {num_experts!r}")
    if isinstance(perturb, bool) or not isinstance(perturb, (int, float)) or not perturb >= 0:
        raise ValueError(f"perturb must be a non-negative number, got {perturb!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if layer_kwargs.get("routing") == "external":
        raise ValueError("routing='external' needs a model that passes routing weights to each layer; convert() "
                         "cannot wire that: use 'sigmoid' or 'softmax'")
    names = select_convs(model, include, exclude, example_input=example_input)
    return _replace(model, layer_cls, names, num_experts, perturb, seed, inplace, layer_kwargs, verbose=True)


def _replace(model: nn.Module, layer_cls, names: list[str], num_experts: int | None, perturb: float,
             seed: int | None, inplace: bool, layer_kwargs: dict, *, verbose: bool) -> tuple[nn.Module, list[str]]:
    """Replace the convolutions ``names`` (already validated) by ``layer_cls.from_conv`` (``layer_cls``: a class, or
    classes by spatial rank)."""
    if not inplace:
        model = copy.deepcopy(model)
    extra = dict(layer_kwargs)
    if num_experts is not None:
        extra["num_experts"] = num_experts
    paths: dict[int, list[str]] = {}  # a shared convolution is registered under several names
    for name, module in _named_modules(model):
        if _is_convertible(module):
            paths.setdefault(id(module), []).append(name)
    total = len(paths)
    converted: list[str] = []
    made: set[str] = set()
    count = 0
    with torch.random.fork_rng(devices=[]):  # with a seed, the routers' initialisation is reproducible too
        if seed is not None:
            torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for name in names:
            if name in converted:  # another name of a shared convolution, already replaced
                continue
            old = model.get_submodule(name)
            cls = layer_cls[_rank(old)] if isinstance(layer_cls, dict) else layer_cls
            made.add(cls.__name__)
            new = cls.from_conv(old, perturb=float(perturb), generator=generator, **extra)
            new.to(device=old.weight.device, dtype=old.weight.dtype)
            new.train(old.training)
            count += 1
            for path in paths[id(old)]:
                parent_name, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
                converted.append(path)
                if path != name:
                    logger.info("%s shares its convolution with %s: converted too", path, name)
    if verbose and perturb == 0 and num_experts != 1:
        logger.info("perturb=0: the experts of each converted layer start identical and get identical gradients; "
                    "pass perturb>0 (e.g. 0.01) to let them diverge in fine-tuning")
    logger.log(logging.INFO if verbose else logging.DEBUG, "converted %d of %d convolutions to %s", count, total,
               ", ".join(sorted(made)) or "nothing")
    return model, converted


# ----------------------------------------------------------------------------------------------------------------
# conversion records: how a converted checkpoint is rebuilt
# ----------------------------------------------------------------------------------------------------------------
def conversion_spec(conv: str, num_experts: int | None, layers: Sequence[str], **layer_kwargs) -> dict:
    """The JSON-able record of one conversion, stored in a checkpoint's config under ``'convert'`` (a list)."""
    return {"conv": conv, "num_experts": num_experts, "layers": list(layers), "layer_kwargs": dict(layer_kwargs)}


def apply_conversion(model: nn.Module, specs) -> nn.Module:
    """Redo recorded conversions on a freshly built model (in place), so a converted checkpoint's weights fit it.

    Args:
        model: the model built from a checkpoint's ``model`` / ``model_args``.
        specs: ``config.get('convert')``: None, one :func:`conversion_spec` dict or a list of them (applied in
            order).

    Returns:
        ``model`` with the recorded layers replaced (experts as at conversion time; load the weights next).
    """
    if not specs:
        return model
    if isinstance(specs, dict):
        specs = [specs]
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "conv" not in spec or "layers" not in spec:
            raise ValueError(f"conversion record {i} must be a dict with 'conv' and 'layers', got {spec!r}")
        available = set(list_convs(model))
        missing = [name for name in spec["layers"] if name not in available]
        if missing:
            raise ValueError(f"conversion record {i}: the model has no nn.Conv2d named {missing[:5]} (nor "
                             "nn.Conv1d, nn.Conv3d)")
        _replace(model, _layer_class(spec["conv"]), list(spec["layers"]), spec.get("num_experts"), 0.0, None, True,
                 dict(spec.get("layer_kwargs") or {}), verbose=False)
    return model
