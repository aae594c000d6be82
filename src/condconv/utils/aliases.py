"""Lazy public names and old module paths: the one mechanism behind ``condconv.X`` and the moved modules.

``condconv/__init__.py`` lists its public names as ``name -> module`` and imports a module only when one of its
names is first used (``import condconv`` and ``condconv --version`` do not import torch). Modules that moved to a
folder in 0.3 (``condconv.layers`` -> ``condconv.nn.layers``, ...) keep importing for one release through
:class:`MovedModuleFinder`: the old path *is* the new module (same object, same classes), with one
``DeprecationWarning`` per old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MOVED_MODULES", "MovedModuleFinder", "install_moved_modules", "lazy_attributes"]

#: Old module path -> new module path (0.2 -> 0.3). A prefix also moves everything below it.
MOVED_MODULES: dict[str, str] = {
    "condconv._checks": "condconv.utils.checks",
    "condconv.fileio": "condconv.utils.fileio",
    "condconv.runtime": "condconv.utils.runtime",
    "condconv.functional": "condconv.nn.functional",
    "condconv.layers": "condconv.nn.layers",
    "condconv.routing": "condconv.nn.routing",
    "condconv.reference": "condconv.nn.reference",
    "condconv.convert": "condconv.nn.convert",
    "condconv.ops": "condconv.nn.ops",
    "condconv.profile": "condconv.models.macs",
    "condconv.papers": "condconv.models.papers",
    "condconv.checkpoint": "condconv.models.checkpoint",
    "condconv.augment": "condconv.data.augment",
    "condconv.export": "condconv.deploy.export",
    "condconv.quantize": "condconv.deploy.quantize",
    "condconv.config": "condconv.training.config",
    "condconv.recipes": "condconv.training.recipes",
    "condconv.optim": "condconv.training.optim",
    "condconv.ema": "condconv.training.ema",
    "condconv.train": "condconv.training.loop",
    "condconv.evaluate": "condconv.training.evaluate",
    "condconv.analysis": "condconv.training.analysis",
    "condconv.sweep": "condconv.training.sweep",
    "condconv.runlog": "condconv.training.runlog",
    "condconv.plots": "condconv.training.plots",
    "condconv.bench_models": "condconv.bench.models",
    "condconv.commands": "condconv.cli.commands",
}


def _new_name(fullname: str) -> str | None:
    for old, new in MOVED_MODULES.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        if _new_name(self.old.rpartition(".")[0]) is None:  # below a moved parent, the parent has warned already
            warnings.warn(f"module {self.old} moved to {self.new}; the old path will be removed in the next release",
                          DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module: types.ModuleType) -> None:  # the new module is already executed
        sys.modules[self.old] = module


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Serves each old module path of :data:`MOVED_MODULES` as its new module, with a ``DeprecationWarning``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = _new_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new))


def install_moved_modules() -> None:
    """Put :class:`MovedModuleFinder` on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


class _Package(types.ModuleType):
    """The package's module type: a submodule import never replaces a public name (``condconv.convert`` stays the
    function when the old module path ``condconv.convert`` is imported)."""

    _lazy_names: Mapping[str, str] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self)._lazy_names and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def lazy_attributes(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``names[name]`` (a module path) on first use.

    The package's module also becomes a :class:`_Package`, so that importing a submodule whose name is a public
    attribute does not shadow the attribute.
    """
    module = sys.modules[package]
    module.__class__ = type("_Package", (_Package,), {"_lazy_names": dict(names)})

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        types.ModuleType.__setattr__(module, name, value)  # cached: the next access is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(names))

    return __getattr__, __dir__
