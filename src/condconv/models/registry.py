"""Model registry: build any model of the zoo by name.

Example:
    >>> from condconv.models import create_model, list_models
    >>> list_models("mobilenet_v1*")
    ['mobilenet_v1', 'mobilenet_v1_cifar']
    >>> model = create_model("resnet18_cifar", num_classes=10, conv="condconv", num_experts=4)
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "register_alias", "register_family", "create_model", "list_models", "is_model",
           "resolve_name"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register a model builder under its function name (or ``name``); usable as ``@register_model``.

    Raises:
        ValueError: when the name is already registered.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name if name is not None else builder.__name__
        if not isinstance(key, str) or not key:
            raise ValueError(f"model name must be a non-empty string, got {key!r}")
        if key in _MODELS:
            raise ValueError(f"a model named {key!r} is already registered")
        _MODELS[key] = builder
        return builder

    return decorate(fn) if fn is not None else decorate


def register_alias(alias: str, name: str) -> None:
    """Accept ``alias`` (another code's name, e.g. timm's ``tf_efficientnet_cc_b0_8e``) for the registered ``name``;
    aliases build the same model but are not listed by :func:`list_models`."""
    if name not in _MODELS:
        raise ValueError(f"cannot alias {alias!r} to unregistered model {name!r}")
    if alias in _MODELS or _ALIASES.get(alias, name) != name:
        raise ValueError(f"a model or alias named {alias!r} is already registered")
    _ALIASES[alias] = name


def resolve_name(name: str) -> str:
    """The registered name of ``name`` (itself, or the model an alias stands for)."""
    return _ALIASES.get(name, name)


def register_family(name: str, build: Callable[..., nn.Module], summary: str) -> tuple[Callable, Callable]:
    """Register ``name`` and its 32x32-input variant ``<name>_cifar`` for ``build(small_input=..., **kwargs)``.

    Returns:
        The two registered builders (keyword arguments only).
    """

    def full(**kwargs) -> nn.Module:
        return build(small_input=False, **kwargs)

    def small(**kwargs) -> nn.Module:
        return build(small_input=True, **kwargs)

    small_what = "32x32 inputs (stride 1 in the stem and the next downsampling unit: total stride 8)"
    for fn, key, what in ((full, name, "224x224 inputs"), (small, f"{name}_cifar", small_what)):
        fn.__name__ = fn.__qualname__ = key
        fn.__doc__ = f"{summary} For {what}. Keyword arguments: see :meth:`condconv.models.blocks.Architecture.build`."
        register_model(fn)
    return full, small


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by an ``fnmatch`` pattern (``'resnet*'``)."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model (or an alias of one)."""
    return name in _MODELS or name in _ALIASES


def create_model(name: str, *, pretrained: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build the registered model ``name`` (or an alias); keyword arguments go to its builder.

    ``pretrained``: a weights file (or condconv run folder) loaded into the model whole, in any format
    :func:`condconv.models.pretrained.load_pretrained` recognises (the official ODConv checkpoints, timm
    state_dicts, condconv's own files); a file that does not fit is refused with a one-line error.

    Common arguments: ``num_classes=1000``, ``in_chans=3``, ``width_mult`` (families that have one), ``dropout``,
    ``conv='static'|'condconv'|'dynamic'|'odconv'``, ``num_experts``, ``dynamic_blocks``, ``dynamic_head``,
    ``dynamic_classifier``, ``shared_routing``, ``conv_kwargs``, ``features_only``.

    Raises:
        ValueError: unknown name (the closest registered names are suggested).
    """
    key = resolve_name(name)
    if key not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (list_models() gives all {len(_MODELS)} names)")
    model = _MODELS[key](**kwargs)
    if pretrained is not None:
        from condconv.models.pretrained import load_pretrained  # the loader imports the checkpoint format

        load_pretrained(model, pretrained, name=name)
    return model
