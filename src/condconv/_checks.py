"""Argument validation shared by the whole package: each check raises ``ValueError`` naming the argument."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["OptionError", "positive_int", "positive_number", "probability", "parse_kwargs"]


class OptionError(ValueError):
    """An invalid value of a named option (``option``); the command line reports it under its flag.

    Args:
        option: the option's name (a field or argument name, e.g. ``'weight_decay'``).
        message: the whole message, which starts with the option's name (``'lr must be ..., got -1'``).
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.detail = message[len(option):] if message.startswith(option) else f": {message}"


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_number(value: object, name: str) -> float:
    """``value`` as a float if it is a real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
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
