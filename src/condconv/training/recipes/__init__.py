"""The papers' ImageNet training recipes as YAML option files (``condconv train --recipe NAME``).

Recipes of "CondConv: Conditionally Parameterized Convolutions for Efficient Inference" (Yang et al., arXiv
1904.04971), "Dynamic Convolution: Attention over Convolution Kernels" (Chen et al., arXiv 1912.03458) and
"Omni-Dimensional Dynamic Convolution" (Li et al., arXiv 2209.07947). Each file ``NAME.yaml`` here has two sections:
``about`` (paper, setup, reference accuracy, and ``unverified``: the options whose value could not be checked against
the official code or paper text) and ``options``: training options by their ``TrainConfig``
names, with the source of each value in a comment. :func:`load_recipe` returns the options; :func:`recipe_about` the
rest.

Every option of a recipe is a :class:`~condconv.training.config.TrainConfig` field, documented there, and also works on
its own from the command line and a config file; :data:`KNOBS` lists the ones the recipes brought (with their
defaults and meanings), :data:`MODEL_KNOBS` the model-builder options
they set under ``model_kwargs`` (``drop_connect_rate``, ``bn_momentum``, ``bn_eps``). The papers anneal the routers'
temperature over a fixed 10 epochs (``temperature_epochs: 10``), not a fraction of the run.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from condconv.data.augment import AUGMENTATIONS
from condconv.utils.checks import OptionError

__all__ = ["KNOBS", "MODEL_KNOBS", "Knob", "OPTIMIZERS", "SCHEDULES", "WEIGHT_DECAY_EXCLUDE", "list_recipes",
           "load_recipe", "recipe_about", "validate_knobs"]

#: The choices of ``optimizer``, ``lr_schedule`` and ``weight_decay_exclude`` (built by training.optim).
OPTIMIZERS = ("sgd", "adamw", "rmsprop_tf")
SCHEDULES = ("cosine", "step", "exponential", "constant")
WEIGHT_DECAY_EXCLUDE = ("norm_and_bias", "norm", "none")


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


def _one_of(choices: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(c) for c in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def validate_knobs(options: Mapping[str, Any]) -> None:
    """Check the values of the :data:`KNOBS` present in ``options`` (others are ignored).

    Raises:
        ValueError (``condconv.utils.checks.OptionError``): the first invalid knob, named with the expected value.
    """
    checks = {
        "optimizer": (lambda v: v in OPTIMIZERS, _one_of(OPTIMIZERS)),
        "nesterov": (lambda v: isinstance(v, bool), "a bool"),
        "rmsprop_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "rmsprop_eps": (lambda v: _number(v) and v > 0, "a positive number"),
        "weight_decay_exclude": (lambda v: v in WEIGHT_DECAY_EXCLUDE, _one_of(WEIGHT_DECAY_EXCLUDE)),
        "lr_reference_batch": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                               "an int >= 1 or None"),
        "lr_schedule": (lambda v: v in SCHEDULES, _one_of(SCHEDULES)),
        "lr_milestones": (lambda v: isinstance(v, (list, tuple)) and all(_number(m) and m >= 0 for m in v),
                          "a list of epochs >= 0"),
        "lr_gamma": (lambda v: v is None or (_number(v) and v > 0), "a positive number or None"),
        "lr_decay_epochs": (lambda v: _number(v) and v > 0, "a positive number"),
        "lr_staircase": (lambda v: isinstance(v, bool), "a bool"),
        "ema_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "ema_warmup": (lambda v: isinstance(v, bool), "a bool"),
        "augment": (lambda v: v in AUGMENTATIONS, _one_of(AUGMENTATIONS)),
        "randaug_layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
        "randaug_magnitude": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    }
    for name, (ok, expected) in checks.items():
        if name in options and not ok(options[name]):
            raise _bad(name, expected, options[name])
