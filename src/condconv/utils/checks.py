"""Argument validation shared by the whole package: each check raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = ["OptionError", "flag", "positive_int", "positive_number", "probability", "parse_kwargs"]


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


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
