"""Checkpoints of the official KernelWarehouse code, read without running code from the file.

Li and Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024, arXiv:2406.07879. The official
``main.py`` saves (``utils.save_model``) ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` and, with EMA,
``'model_ema'``; ``args`` is an ``argparse.Namespace``. :func:`load_kernelwarehouse_weights` reads such a file with
``torch.load(weights_only=True)``, allowing that one class (read into a plain record, :class:`TrainingArgs`: no
argparse code runs), and renames its keys to the presets of :mod:`condconv.models.kernelwarehouse`:

- ``warehouse_manager.weights.{i}`` -> ``warehouse.cells.{i}``;
- ``<layer>.attention.norm1.*`` -> ``<layer>.attention.norm.*``;
- ``<layer>.attention.temperature``, which the official model keeps as a plain attribute, is added at 0 (the end
  of its annealing; :func:`condconv.set_temperature` changes it);
- a ``module.`` prefix (a model saved from its DistributedDataParallel wrapper) is removed.

Every other key (stem, BatchNorm, attention ``fc1``/``fc2``/``fc3``/``basis_bias``, classifier) already has the
preset's name. Example::

    model = condconv.create_model("kw_resnet18_1x")
    model.load_state_dict(load_kernelwarehouse_weights("checkpoint-best.pth"))
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["TrainingArgs", "detect", "load_kernelwarehouse_weights", "convert_state_dict", "read_checkpoint",
           "preset_name"]

_WAREHOUSE_PREFIX = "warehouse_manager.weights."
_KEYS = ("model", "args")


class TrainingArgs:
    """The ``args`` record of an official checkpoint (its ``argparse.Namespace`` read as plain attributes)."""

    def __repr__(self) -> str:
        return f"TrainingArgs({', '.join(f'{k}={v!r}' for k, v in sorted(vars(self).items()))})"


def read_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint dictionary at ``path`` (``weights_only``; ``argparse.Namespace`` read as
    :class:`TrainingArgs`, nothing else allowed beyond tensors, numbers and containers).

    Raises:
        ValueError: the file cannot be read this way (names the file and why).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals([(TrainingArgs, "argparse.Namespace")]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable KernelWarehouse checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict saved by the official main.py, got {type(obj).__name__}")
    return obj


_BUDGETS = {0.25: "1d4x", 0.5: "1d2x", 1.0: "1x", 2.0: "2x", 4.0: "4x"}
_MODELS = {"kw_resnet18": "kw_resnet18", "kw_resnet50": "kw_resnet50", "kw_mobilenetv2_100": "kw_mobilenet_v2_100",
           "kw_mobilenetv2_050": "kw_mobilenet_v2_050", "kw_convnext_tiny": "kw_convnext_tiny"}


def preset_name(args: object) -> str | None:
    """The preset an official run's ``args`` (its ``--model`` and ``--cell_num_ratio``) trained, e.g.
    ``'kw_resnet18_1d4x'``; ``'convnext_tiny'`` for that baseline; ``None`` when no preset matches."""
    model = getattr(args, "model", None)
    if model == "convnext_tiny":
        return model
    if model in ("kw1d2x_mobilenetv2_100", "kw1d2x_mobilenetv2_050"):
        return f"kw_mobilenet_v2_{model[-3:]}_1d2x"
    ratio = getattr(args, "cell_num_ratio", None)
    if isinstance(ratio, (list, tuple)) and len(ratio) == 1:
        ratio = ratio[0]
    if model not in _MODELS or isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        return None
    budget = _BUDGETS.get(float(ratio))
    return None if budget is None else f"{_MODELS[model]}_{budget}"


def detect(obj: object) -> bool:
    """Whether ``obj`` (a loaded checkpoint) is one of the official code's: ``model`` and ``args`` entries, and the
    model has warehouse cells (``warehouse_manager.weights.*``)."""
    if not isinstance(obj, Mapping) or not all(k in obj for k in _KEYS) or not isinstance(obj["model"], Mapping):
        return False
    return any(isinstance(k, str) and k.removeprefix("module.").startswith(_WAREHOUSE_PREFIX) for k in obj["model"])


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official model's ``state_dict`` in the presets' names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_WAREHOUSE_PREFIX):
            key = "warehouse.cells." + key[len(_WAREHOUSE_PREFIX):]
        key = key.replace(".attention.norm1.", ".attention.norm.")
        out[key] = value
        if key.endswith(".attention.fc1.weight"):
            out[key[:-len("fc1.weight")] + "temperature"] = torch.zeros((), dtype=torch.float32)
    return out


def load_kernelwarehouse_weights(path: str | Path, *, key: str = "model") -> dict[str, torch.Tensor]:
    """The weights of the official checkpoint at ``path``, in the presets' names.

    Args:
        path: a ``checkpoint-*.pth`` of the official ``main.py``.
        key: ``'model'`` (default) or ``'model_ema'`` (the EMA weights, when saved).

    Returns:
        A ``state_dict`` for ``condconv.create_model(<kw preset>)``.

    Raises:
        ValueError: not such a checkpoint, or no ``key`` in it (names the file).
    """
    obj = read_checkpoint(path)
    if not detect(obj):
        raise ValueError(f"{path}: not an official KernelWarehouse checkpoint (expected 'model' with "
                         f"'{_WAREHOUSE_PREFIX}*' keys and 'args'; got keys {sorted(map(str, obj))})")
    if key not in obj or not isinstance(obj[key], Mapping):
        raise ValueError(f"{path}: no {key!r} weights in this checkpoint (keys {sorted(map(str, obj))})")
    return convert_state_dict(obj[key])
