"""The papers' ImageNet training recipes as YAML option files (``condconv train --recipe NAME``).

Recipes of "CondConv: Conditionally Parameterized Convolutions for Efficient Inference" (Yang et al., arXiv
1904.04971), "Dynamic Convolution: Attention over Convolution Kernels" (Chen et al., arXiv 1912.03458) and
"Omni-Dimensional Dynamic Convolution" (Li et al., arXiv 2209.07947). Each file ``NAME.yaml`` here has two sections:
``about`` (paper, setup, reference accuracy, and ``unverified``: the options whose value could not be checked against
the official code or paper text) and ``options``: training options by their :class:`~condconv.config.TrainConfig`
names, with the source of each value in a comment. :func:`load_recipe` returns the options; :func:`recipe_about` the
rest.

Options the recipes use that ``TrainConfig`` has today: model, conv, experts, width, dropout, model_kwargs, dataset,
image_size, epochs, batch_size (the papers' global batch), optimizer, lr, momentum, weight_decay, warmup_epochs,
min_lr, label_smoothing, mixup, grad_clip, temperature_start, temperature_end, temperature_epochs (10: the papers
anneal over a fixed 10 epochs, not a fraction).

New training options (:data:`KNOBS`, name: type = default, meaning):

- optimizer: str = 'sgd' -- new choice ``'rmsprop_tf'`` (:class:`condconv.optim.RMSpropTF`); 'sgd', 'adamw' as today.
- nesterov: bool = True -- SGD with Nesterov momentum (today's behaviour) or plain momentum (False: ODConv's code).
- rmsprop_decay: float = 0.9 -- RMSProp mean-square decay (TensorFlow's ``decay``, torch's ``alpha``); in [0, 1).
- rmsprop_eps: float = 1e-3 -- RMSProp epsilon, inside the square root; > 0.
- weight_decay_exclude: str = 'norm_and_bias' -- parameters without weight decay: 'norm_and_bias' (today), 'norm'
  (the TPU trainer: BatchNorm only), 'none' (every parameter decayed: ODConv's code).
- lr_reference_batch: int | None = None -- the global batch ``lr`` is tuned for; the optimizer uses
  ``lr * batch_size * world_size / lr_reference_batch`` (None: ``lr`` as given).
- lr_schedule: str = 'cosine' -- 'cosine' (to ``min_lr``), 'step', 'exponential' or 'constant'; all per optimizer
  step after ``warmup_epochs`` of linear warm-up.
- lr_milestones: list[float] = [30, 60, 90] -- epochs at which 'step' multiplies the lr by ``lr_gamma``.
- lr_gamma: float | None = None -- factor of each decay (None: 0.1 for 'step', 0.97 for 'exponential'); > 0.
- lr_decay_epochs: float = 2.4 -- interval of the 'exponential' decays, in epochs; > 0.
- lr_staircase: bool = True -- 'exponential' decays at whole intervals (TensorFlow's staircase) or continuously.
- ema_decay: float = 0.0 -- exponential moving average of the weights (:class:`condconv.ema.ModelEma`); 0 = off;
  in [0, 1). The TPU trainer evaluates the averaged weights.
- ema_warmup: bool = True -- TensorFlow's ``min(decay, (1 + k) / (10 + k))`` at update ``k``.
- augment: str = 'none' -- 'none', 'autoaugment' (policy v0) or 'randaugment' (:mod:`condconv.augment`), on the
  uint8 training crop after the random crop and flip.
- randaug_layers: int = 2 -- RandAugment's N; >= 0.
- randaug_magnitude: float = 10 -- RandAugment's M (0..10 scale; above 10 extrapolates); >= 0.

Model-builder options, under ``model_kwargs`` (:data:`MODEL_KNOBS`; the model builders must accept them):

- drop_connect_rate: float = 0.0 -- stochastic depth of the inverted-residual blocks (TF EfficientNet's
  ``1 - survival_prob``, scaled linearly with the block index: block ``i`` of ``n`` drops with ``rate * i / n``).
- bn_momentum: float | None = None -- BatchNorm momentum in PyTorch's convention (``1 -`` TensorFlow's: TF 0.99 is
  0.01 here); None: the builder's default (0.1).
- bn_eps: float | None = None -- BatchNorm epsilon (None: 1e-5; the TPU trainer's EfficientNets use 1e-3).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from condconv._checks import OptionError

__all__ = ["KNOBS", "MODEL_KNOBS", "Knob", "list_recipes", "load_recipe", "recipe_about", "validate_knobs"]


class Knob(NamedTuple):
    """An option the recipes need: its name, Python type (as text), default and meaning."""

    name: str
    type: str
    default: Any
    meaning: str


KNOBS: tuple[Knob, ...] = (
    Knob("optimizer", "str", "sgd", "'sgd', 'adamw' or 'rmsprop_tf' (new choice: RMSProp with TensorFlow semantics)"),
    Knob("nesterov", "bool", True, "SGD with Nesterov momentum (True) or plain momentum (False)"),
    Knob("rmsprop_decay", "float", 0.9, "RMSProp mean-square decay, in [0, 1)"),
    Knob("rmsprop_eps", "float", 1e-3, "RMSProp epsilon inside the square root, > 0"),
    Knob("weight_decay_exclude", "str", "norm_and_bias", "parameters without weight decay: 'norm_and_bias', "
         "'norm' or 'none'"),
    Knob("lr_reference_batch", "int | None", None, "global batch lr is for; lr scaled linearly to the real one"),
    Knob("lr_schedule", "str", "cosine", "'cosine', 'step', 'exponential' or 'constant' (per step, after warm-up)"),
    Knob("lr_milestones", "list[float]", [30, 60, 90], "epochs of the 'step' decays"),
    Knob("lr_gamma", "float | None", None, "factor per decay (None: 0.1 'step', 0.97 'exponential')"),
    Knob("lr_decay_epochs", "float", 2.4, "interval of the 'exponential' decays, in epochs"),
    Knob("lr_staircase", "bool", True, "'exponential' decays at whole intervals (True) or continuously"),
    Knob("ema_decay", "float", 0.0, "EMA of the weights, 0 = off, in [0, 1)"),
    Knob("ema_warmup", "bool", True, "EMA decay capped by (1 + k) / (10 + k) at update k"),
    Knob("augment", "str", "none", "'none', 'autoaugment' or 'randaugment'"),
    Knob("randaug_layers", "int", 2, "RandAugment's N, >= 0"),
    Knob("randaug_magnitude", "float", 10.0, "RandAugment's M, >= 0"),
)
MODEL_KNOBS: tuple[Knob, ...] = (
    Knob("drop_connect_rate", "float", 0.0, "stochastic depth of the residual blocks (max rate, linear in depth)"),
    Knob("bn_momentum", "float | None", None, "BatchNorm momentum, PyTorch convention (1 - TensorFlow's)"),
    Knob("bn_eps", "float | None", None, "BatchNorm epsilon"),
)

_SUFFIX = ".yaml"


def _folder():  # an importlib.resources Traversable
    return resources.files(__name__)


def list_recipes() -> list[str]:
    """The names of the packaged recipes, sorted."""
    return sorted(p.name[: -len(_SUFFIX)] for p in _folder().iterdir() if p.name.endswith(_SUFFIX))


def _read(name: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The parsed file of a recipe name or YAML path, and how to name it in messages."""
    import yaml

    text = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not isinstance(text, str) or not text:
        raise TypeError(f"name must be a recipe name or a YAML file path, got {name!r}")
    is_path = isinstance(name, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text
    if is_path:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        source, raw = str(path), path.read_text(encoding="utf-8")
    else:
        entry = _folder() / f"{text}{_SUFFIX}"
        if not entry.is_file():
            raise ValueError(f"unknown recipe {text!r}; available: {', '.join(list_recipes())} (or a YAML file path)")
        source, raw = f"recipe {text!r}", entry.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"malformed {source}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"malformed {source}: expected a mapping, got {type(data).__name__}")
    return data, source


def load_recipe(name: str | os.PathLike) -> dict[str, Any]:
    """The training options of a recipe: a packaged name (:func:`list_recipes`) or a YAML file path.

    A file with an ``options`` section gives that section; a file without one is read as a plain mapping of options.
    The result is a fresh dict (changing it does not change later loads).

    Raises:
        ValueError: unknown recipe name (the message lists the available ones) or malformed file.
        FileNotFoundError: a path that does not exist.
    """
    data, source = _read(name)
    options = data["options"] if "options" in data else data
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"malformed {source}: 'options' must be a mapping of option names to values")
    return copy.deepcopy(options)


def recipe_about(name: str | os.PathLike) -> dict[str, Any]:
    """The ``about`` section of a recipe (paper, setup, reference accuracy, ``unverified`` options); {} if none."""
    data, source = _read(name)
    about = data.get("about", {})
    if not isinstance(about, dict):
        raise ValueError(f"malformed {source}: 'about' must be a mapping")
    return copy.deepcopy(about)


def _bad(name: str, expected: str, value: Any) -> ValueError:
    return OptionError(name, f"{name} must be {expected}, got {value!r}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def validate_knobs(options: Mapping[str, Any]) -> None:
    """Check the values of the :data:`KNOBS` present in ``options`` (others are ignored).

    Raises:
        ValueError (``condconv._checks.OptionError``): the first invalid knob, named with the expected value.
    """
    checks = {
        "optimizer": (lambda v: v in ("sgd", "adamw", "rmsprop_tf"), "'sgd', 'adamw' or 'rmsprop_tf'"),
        "nesterov": (lambda v: isinstance(v, bool), "a bool"),
        "rmsprop_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "rmsprop_eps": (lambda v: _number(v) and v > 0, "a positive number"),
        "weight_decay_exclude": (lambda v: v in ("norm_and_bias", "norm", "none"), "'norm_and_bias', 'norm' or 'none'"),
        "lr_reference_batch": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                               "an int >= 1 or None"),
        "lr_schedule": (lambda v: v in ("cosine", "step", "exponential", "constant"),
                        "'cosine', 'step', 'exponential' or 'constant'"),
        "lr_milestones": (lambda v: isinstance(v, (list, tuple)) and all(_number(m) and m >= 0 for m in v),
                          "a list of epochs >= 0"),
        "lr_gamma": (lambda v: v is None or (_number(v) and v > 0), "a positive number or None"),
        "lr_decay_epochs": (lambda v: _number(v) and v > 0, "a positive number"),
        "lr_staircase": (lambda v: isinstance(v, bool), "a bool"),
        "ema_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "ema_warmup": (lambda v: isinstance(v, bool), "a bool"),
        "augment": (lambda v: v in ("none", "autoaugment", "randaugment"), "'none', 'autoaugment' or 'randaugment'"),
        "randaug_layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
        "randaug_magnitude": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    }
    for name, (ok, expected) in checks.items():
        if name in options and not ok(options[name]):
            raise _bad(name, expected, options[name])
