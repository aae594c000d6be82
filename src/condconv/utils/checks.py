"""Argument validation shared by the whole package: each check raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence

__all__ = ["MAX_SEED", "OptionError", "flag", "is_integer", "positive_int", "positive_number", "probability",
           "parse_kwargs", "seed_value"]

#: The largest seed every generator a run seeds takes (``numpy.random.seed`` stops at ``2**32 - 1``; ``random`` and
#: ``torch.manual_seed`` take more).
MAX_SEED = 2**32 - 1


class OptionError(ValueError):
    """An invalid value of a named option (``option``); the command line reports it under its flag.

    The message speaks of arguments (``'lr must be a positive number, got -1'``), as the Python API takes them;
    :meth:`with_flags` writes the option names in it as command-line flags (``'--lr must be ...'``).

    Args:
        option: the option's name (a field or argument name, e.g. ``'weight_decay'``).
        message: the whole message, which starts with the option's name (``'lr must be ..., got -1'``).
        mentions: other option names the message refers to, also written as flags by :meth:`with_flags`.
    """

    def __init__(self, option: str, message: str, *, mentions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.option = option
        self.mentions = tuple(mentions)
        self.detail = message[len(option):] if message.startswith(option) else f": {message}"

    def with_flags(self) -> str:
        """The message with ``option`` (its first mention) and every mention of ``mentions`` written as flags
        (``weight_decay`` -> ``--weight-decay``)."""

        def replace(text: str, names: Sequence[str], count: int = 0) -> str:
            if not names:
                return text
            alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
            pattern = rf"(?<![\w\-.=/])({alternatives})(?![\w\-/])"
            return re.sub(pattern, lambda m: flag(m.group(1)), text, count=count)

        return replace(replace(str(self), [self.option], count=1), [n for n in self.mentions if n != self.option])


def flag(option: str) -> str:
    """The command-line flag of an option name (``weight_decay`` -> ``--weight-decay``)."""
    return "--" + option.replace("_", "-")


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer as :class:`torch.nn.Conv2d` takes one: a Python or numpy int, or anything with
    ``__index__`` (bools and floats are not)."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return False
    try:
        operator.index(value)  # e.g. a float tensor has __index__ but refuses it
    except TypeError:
        return False
    return True


def positive_int(value: object, name: str) -> int:
    """``value`` as a Python int if it is an integer (:func:`is_integer`: numpy ints too) >= 1 (bools rejected)."""
    if not is_integer(value) or operator.index(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return operator.index(value)


def seed_value(value: object, name: str = "seed") -> int:
    """``value`` as an int if it is a seed every generator takes: an int in ``[0, MAX_SEED]`` (raises
    :class:`OptionError` naming ``name``)."""
    if not is_integer(value):
        raise OptionError(name, f"{name} must be an int in [0, {MAX_SEED}], got {value!r}")
    number = operator.index(value)
    if not 0 <= number <= MAX_SEED:
        raise OptionError(name, f"{name} must be an int in [0, {MAX_SEED}] (2**32 - 1, the most numpy's generator "
                          f"takes), got {number}")
    return number


def positive_number(value: object, name: str) -> float:
    """``value`` as a float if it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def probability(value: object, name: str) -> float:
    """``value`` as a float if it is a number in [0, 1) (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def parse_kwargs(items: Sequence[str] | None, option: str = "--model-kwargs") -> dict:
    """``['num_classes=10', 'width_mult=0.5']`` -> ``{'num_classes': 10, 'width_mult': 0.5}`` (values read as YAML)."""
    import yaml

    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{option} expects KEY=VALUE pairs, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
