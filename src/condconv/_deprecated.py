"""Old import paths of names that moved: they keep working for one release, with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["forwarder"]


def forwarder(module: str, moved: Mapping[str, tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves moved names (``name -> (new place, getter)``) with a warning."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, get = moved[name]
        warnings.warn(f"{module}.{name} is deprecated: use {where} (the old name will be removed in the next release)",
                      DeprecationWarning, stacklevel=2)
        return get()

    return __getattr__
