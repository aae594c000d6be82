"""The checkpoint format: weights with their configuration, training state, and how a model is rebuilt from them.

- ``model.safetensors``: the model's ``state_dict`` as safetensors, with the training configuration as JSON in the
  metadata (key ``condconv_config``), so a weights file alone rebuilds its model (:func:`load_checkpoint`),
  including layer conversions recorded by :func:`condconv.nn.convert` (``config['convert']``).
- A checkpoint folder ``checkpoints/step-NNNNNNNN/`` holds ``model.safetensors`` and ``state.pt`` (optimizer,
  scheduler, random states, position in the epoch, ...; only tensors, numbers and plain containers, read back with
  ``torch.load(weights_only=True)``). It is written to a temporary folder of its own, fsynced and renamed into
  place; then the ``checkpoints/latest`` pointer is replaced atomically, and older checkpoints are pruned.

Nothing here runs code from a file: safetensors holds only tensors and ``weights_only`` refuses anything else.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condconv.models import create_model, is_model
from condconv.nn.convert import apply_conversion
from condconv.utils.fileio import TMP_PREFIX, OutputError, atomic_write_bytes, fsync_dir, output_error, public_mode
from condconv.utils.runtime import unwrap

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONFIG_METADATA_KEY",
    "build_model",
    "config_classes",
    "config_in_chans",
    "default_input_size",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_state_dict",
    "read_state",
    "read_weights",
    "remove_temporaries",
    "resolve_weights_path",
    "save_weights",
    "weights_step",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CONFIG_METADATA_KEY = "condconv_config"


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------
def _weights_bytes(model: nn.Module, metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    # clone: safetensors refuses tensors sharing storage, and CUDA/channels_last tensors must become plain CPU ones
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}
    return save(tensors, metadata=dict(metadata))


def _metadata(config: Mapping[str, Any], **extra: Any) -> dict[str, str]:
    meta = {CONFIG_METADATA_KEY: json.dumps(dict(config), sort_keys=True)}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save_weights(model: nn.Module, path: str | os.PathLike, config: Mapping[str, Any], **metadata: Any) -> Path:
    """Atomically write ``model``'s state_dict as safetensors with ``config`` (JSON) in the metadata."""
    return atomic_write_bytes(Path(path), _weights_bytes(model, _metadata(config, **metadata)))


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing or malformed file raises an error naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for truncated or malformed files
        raise ValueError(f"corrupt or unreadable weights file {path}: {exc}") from exc
    return tensors, metadata


def weights_step(path: str | os.PathLike) -> int | None:
    """The ``global_step`` recorded in a weights file's metadata (None: no such file, or none recorded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return int((f.metadata() or {}).get("global_step", ""))
    except Exception:  # noqa: BLE001 - unreadable, or without a step
        return None


def _config_from_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        raise ValueError(f"weights file {path} has no '{CONFIG_METADATA_KEY}' metadata: not written by condconv train "
                         "or condconv convert")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"weights file {path} has malformed '{CONFIG_METADATA_KEY}' metadata: {exc}") from exc
    if not isinstance(config, dict) or "model" not in config or "model_args" not in config:
        raise ValueError(f"weights file {path}: metadata config lacks 'model'/'model_args'")
    return config


def load_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    what: str = "checkpoint") -> None:
    """Copy ``tensors`` into ``model``: every key and shape must match (the error names the file, calling it
    ``what``, and the first missing, unexpected and mis-shaped keys)."""
    own = unwrap(model).state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise ValueError(f"{what} {path} does not match the model: {'; '.join(parts)}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])


# ----------------------------------------------------------------------------------------------------------------
# training state and checkpoint folders
# ----------------------------------------------------------------------------------------------------------------
def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("\n")[0].strip()
        if "Weights only load failed" in detail or "weights_only" in str(exc):
            # torch's message is a paragraph suggesting weights_only=False, which would run the file's code
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            detail = ("it holds objects other than tensors, numbers and plain containers"
                      f"{f' ({found.group(1)})' if found else ''}, which are never loaded")
        raise ValueError(f"refusing to load {what} {path}: {detail}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"corrupt or unreadable {what} {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` (format-checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state file not found: {path}")
    state = _torch_load(path, "training state")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"training state {path} is not a condconv checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _state_bytes(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder of a run folder (or ``path`` itself if it is one); None if there is none."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    ckdir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = ckdir / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable checkpoint pointer {pointer}: {exc}") from exc
    target = ckdir / name
    if not name.startswith("step-") or not target.is_dir():
        raise ValueError(f"checkpoint pointer {pointer} names a missing checkpoint {target}")
    return target


def remove_temporaries(folder: str | os.PathLike, names: tuple[str, ...] | None = None) -> int:
    """Remove the temporary files and folders a killed writer left in ``folder`` (names starting ``.tmp-``).

    Only safe while no other process writes there (a run folder's lock guarantees it). Returns how many went.

    Args:
        folder: the folder.
        names: only the temporaries of these files (``.tmp-<name>.*``; default: every ``.tmp-*`` entry).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    prefixes = (TMP_PREFIX,) if names is None else tuple(f"{TMP_PREFIX}{n}." for n in names)
    removed = 0
    for p in folder.iterdir():
        if p.name.startswith(prefixes):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed += 1
    return removed


def _write_files(folder: Path, files: Mapping[str, bytes], final: Path) -> None:
    """Write and fsync ``files`` into ``folder``; errors name the file by its place in ``final``."""
    for name, data in files.items():
        try:
            with open(folder / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise output_error(final / name, exc, sum(len(d) for d in files.values())) from None
    fsync_dir(folder)


def write_checkpoint(run_dir: str | os.PathLike, model: nn.Module, state: Mapping[str, Any],
                     config: Mapping[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-<global_step>/`` atomically, point ``checkpoints/latest`` at it, prune old ones.

    The checkpoint is written into a temporary folder unique to this call (removed if anything fails, so a full
    disk leaves no half-written folder), renamed into place, and only then is ``latest`` replaced.

    Args:
        run_dir: the run folder.
        model: the model (its weights and buffers are saved with ``config`` in the metadata).
        state: the training state (``global_step`` names the checkpoint).
        config: the run's configuration.
        keep: how many checkpoints (up to this one) to keep.

    Returns:
        The checkpoint folder.
    """
    ckdir = Path(run_dir) / "checkpoints"
    step = int(state["global_step"])
    name = f"step-{step:08d}"
    files = {"model.safetensors": _weights_bytes(model, _metadata(config, global_step=step)),
             "state.pt": _state_bytes(state)}
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=ckdir))
    except OSError as exc:
        raise output_error(ckdir, exc) from None
    final = ckdir / name
    try:
        public_mode(tmp, folder=True)
        _write_files(tmp, files, final)
        if final.exists():  # left by a crashed timeline after the pointer's checkpoint: never the pointer's target
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckdir)
    except BaseException as exc:  # a full disk, a write error, Ctrl-C: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise output_error(ckdir / name, exc) from None
        raise
    atomic_write_bytes(ckdir / "latest", (name + "\n").encode())
    _prune(ckdir, step, keep)
    return final


def _prune(ckdir: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``; drop later ones (from a crashed timeline)."""
    steps = sorted(int(p.name[5:]) for p in ckdir.iterdir()
                   if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit())
    keep_set = set(sorted(s for s in steps if s <= step)[-keep:])
    for s in steps:
        if s not in keep_set:
            shutil.rmtree(ckdir / f"step-{s:08d}", ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# rebuilding models
# ----------------------------------------------------------------------------------------------------------------
def resolve_weights_path(path: str | os.PathLike) -> Path:
    """Weights file of a run folder (final weights, else latest checkpoint), checkpoint folder or weights file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        return path.with_name("model.safetensors") if path.name == "state.pt" else path
    if (path / "state.pt").is_file() or (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    ck = latest_checkpoint(path)
    if ck is None:
        raise FileNotFoundError(f"no checkpoint in {path}: expected model.safetensors or checkpoints/latest")
    return ck / "model.safetensors"


def build_model(name: str, model_args: Mapping[str, Any]) -> nn.Module:
    """``condconv.create_model(name, **model_args)``."""
    return create_model(name, **dict(model_args))


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained or converted model from its checkpoint.

    Args:
        path: a run folder (its final ``model.safetensors``, else its latest checkpoint), a checkpoint folder
            (``checkpoints/step-N``) or a ``.safetensors`` file written by ``condconv train`` or ``condconv convert``
            (recorded layer conversions are redone before the weights are loaded).
        map_location: device of the returned model.

    Returns:
        ``(model, config)``: the model (eval mode) built with ``create_model(config['model'],
        **config['model_args'])`` and loaded with the weights; the training config as a dict (with
        ``model_args``, ``num_classes``, ``in_chans``, ``image_size``, ``classes``, ``mean``, ``std``).

    Raises:
        FileNotFoundError: nothing to load at ``path``.
        ValueError: corrupt file, or weights that do not match the model (the message names the file).
    """
    weights = resolve_weights_path(path)
    tensors, metadata = read_weights(weights)
    config = _config_from_metadata(weights, metadata)
    model = build_model(config["model"], config["model_args"])
    apply_conversion(model, config.get("convert"))
    load_state_dict(model, tensors, weights)
    model.eval()
    return model.to(map_location), config


def config_classes(config: Mapping[str, Any]) -> int:
    """Classes a checkpoint's model predicts."""
    return int(config.get("num_classes") or config["model_args"].get("num_classes", 1000))


def config_in_chans(config: Mapping[str, Any]) -> int:
    """Image channels a checkpoint's model takes."""
    return int(config.get("in_chans") or config["model_args"].get("in_chans", 3))


def load_model(source: str | os.PathLike, model_kwargs: Mapping[str, Any] | None = None,
               weights: str | os.PathLike | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A model from a checkpoint path, or a registered model name built fresh (optionally with pretrained weights).

    Args:
        source: a run folder, checkpoint folder or ``.safetensors`` file written by ``condconv train`` /
            ``condconv convert``; otherwise a registered model name (``condconv.list_models()``).
        model_kwargs: ``create_model`` keyword arguments (registered names only).
        weights: a weights file loaded whole into a registered model: a state_dict (``.safetensors``, ``.pt``), a
            training checkpoint wrapping one, an official ODConv checkpoint or a timm file
            (:func:`condconv.models.pretrained.load_pretrained`).

    Returns:
        ``(model in eval mode, config)``; config has at least ``model`` and ``model_args``.

    Raises:
        ValueError: ``source`` is neither an existing path nor a registered name (the message says which it looks
            like and suggests close model names), or ``model_kwargs``/``weights`` given with a checkpoint.
    """
    text = str(source)
    if Path(text).exists():
        if model_kwargs:
            raise ValueError(f"model_kwargs apply to registered model names, not to the checkpoint {text}")
        if weights is not None:
            raise ValueError(f"weights apply to registered model names, not to the checkpoint {text}")
        return load_checkpoint(text)
    if not is_model(text):
        if os.sep in text or text.startswith(".") or text.endswith(".safetensors"):
            raise FileNotFoundError(f"checkpoint not found: {text} (and it is not a registered model name)")
        create_model(text)  # raises ValueError with close-name suggestions
    args = dict(model_kwargs or {})
    # weights: any file condconv.models.pretrained reads (condconv's, official ODConv, timm), loaded whole
    model = create_model(text, pretrained=weights, **args)
    model.eval()
    return model, {"model": text, "model_args": args}


def default_input_size(model_name: str, config: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of a model's inputs: the checkpoint's ``in_chans``/``image_size``, else 32x32 for ``*_cifar``
    models and 224x224 otherwise."""
    config = config or {}
    args = config.get("model_args", {})
    chans = int(config.get("in_chans") or args.get("in_chans") or 3)
    size = config.get("image_size") or (32 if str(model_name).endswith("_cifar") else 224)
    return (chans, int(size), int(size))
