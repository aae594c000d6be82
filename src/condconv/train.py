"""Training and evaluation: ``condconv train`` / ``condconv eval`` and the Python API behind them.

CondConv: Conditionally Parameterized Convolutions for Efficient Inference (Yang et al., NeurIPS 2019,
arXiv:1904.04971); DynamicConv (Chen et al., CVPR 2020, arXiv:1912.03458) and ODConv (Li, Zhou, Yao, ICLR 2022,
arXiv:2209.07947) anneal their softmax temperature 30 -> 1 over the first iterations, which this loop does.

A plain PyTorch loop: SGD (Nesterov) or AdamW, linear warm-up then cosine decay per step, label smoothing,
dropout, optional mixup, AMP (bf16/fp16) and channels_last on CUDA, ``torchrun`` + DistributedDataParallel
(gloo on CPU, nccl on CUDA), tqdm progress, JSONL + CSV logs, YAML configs.

Nothing is lost: checkpoints are written atomically (temp file, fsync, ``os.replace``; a checkpoint is a folder
``checkpoints/step-NNNNNNNN/`` renamed into place, then the ``checkpoints/latest`` pointer is replaced), weights as
safetensors (with the config in the metadata, so a weights file alone rebuilds its model), the training state
(optimizer, scheduler, RNG states, position in the epoch, config) with ``torch.save`` and read back with
``weights_only=True``. Data order is a function of ``seed + epoch`` and augmentation of ``(seed, epoch, index)``,
so ``--resume`` skips exactly the consumed batches: on CPU a run killed with SIGKILL and resumed ends with
weights bit-identical to an uninterrupted run. A non-finite loss stops the run and leaves the last good
checkpoint in place.

Example:
    >>> from condconv.train import TrainConfig, train_model, load_checkpoint
    >>> result = train_model(TrainConfig(epochs=1, train_size=128, out="runs/doc", progress=False))
    >>> model, config = load_checkpoint(result.checkpoint)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from condconv._checks import parse_kwargs
from condconv.data import ArrayImageDataset, EpochLoader, build_dataset
from condconv.layers import CONV_KINDS

__all__ = [
    "CONV_KINDS",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "add_checkpoint_data_arguments",
    "add_eval_arguments",
    "add_train_arguments",
    "build_model",
    "evaluate",
    "evaluate_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config_file",
    "run_eval",
    "run_train",
    "save_weights",
    "train",
    "train_model",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_CONFIG_METADATA_KEY = "condconv_config"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that defines a training run (CLI flags, YAML keys and Python fields share these names).

    The defaults train a small model (MobileNetV1-CIFAR at width 0.25, CondConv with 4 experts) on the embedded
    digits in well under a minute of CPU; for CIFAR or ImageNet set the width, epochs, batch size and lr.

    Model:
        model: registered model name (``condconv.list_models()``).
        conv: 'static', 'condconv', 'dynamic' or 'odconv'.
        experts: number of experts (None: the layer's default; ignored for 'static').
        width: width multiplier (None: the model's default).
        dropout: dropout before the classifier (None: the model's default).
        model_kwargs: further keyword arguments of ``create_model``.
        init: start from the weights of a ``condconv train`` or ``condconv convert`` checkpoint (fine-tuning); the
            architecture (model, conv, experts, width, conversions) is then the checkpoint's. It must stay
            available to resume the run.
    Data:
        dataset: 'digits', 'cifar10', 'cifar100', 'imagefolder' or a folder.
        data_dir: folder of CIFAR data or the ImageFolder root.
        train_size: images (int) or fraction (float) of the training split to use (fixed stratified subset).
        image_size: ImageFolder crop size (default 224).
        workers: DataLoader worker processes (ImageFolder only).
    Optimisation:
        epochs, batch_size (per process), optimizer ('sgd' Nesterov or 'adamw'), lr (peak), momentum,
        weight_decay (not applied to biases and norm parameters), warmup_epochs (linear warm-up, then cosine to
        min_lr, per step), label_smoothing, mixup (Beta(alpha, alpha); 0 = off), grad_clip (max norm; None = off),
        freeze_bn (BatchNorm layers use running statistics; their affine parameters still train), sync_bn (CUDA).
    Dynamic convolutions:
        temperature_start, temperature_end, temperature_epochs: linear annealing of the routers' softmax
        temperature over the first ``temperature_epochs`` epochs' iterations. None = 10% of the epochs for
        'dynamic'/'odconv' and off otherwise; 0 = off.
    Runtime:
        device ('auto', 'cpu', 'cuda', 'cuda:1'), amp ('auto' = bf16 on CUDA, none on CPU; 'none', 'bf16', 'fp16'),
        channels_last (None = on CUDA), seed, deterministic.
    Output:
        out: run folder (default ``runs/<model>-<conv>-<time>``), resume ('auto' or a run folder / checkpoint),
        checkpoint_every (steps, 0 = only at epoch ends), checkpoint_epochs (every N epochs, 0 = only the end),
        keep_checkpoints, eval_every (epochs, 0 = only at the end), log_every (steps), progress (tqdm bar).
    """

    model: str = "mobilenet_v1_cifar"
    conv: str = "condconv"
    experts: int | None = 4
    width: float | None = 0.25
    dropout: float | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    train_size: int | float | None = None
    image_size: int | None = None
    workers: int = 4
    epochs: int = 8
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    grad_clip: float | None = None
    freeze_bn: bool = False
    sync_bn: bool = False
    temperature_start: float = 30.0
    temperature_end: float = 1.0
    temperature_epochs: float | None = None
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    seed: int = 0
    deterministic: bool = False
    out: str | None = None
    resume: str | None = None
    checkpoint_every: int = 0
    checkpoint_epochs: int = 1
    keep_checkpoints: int = 1
    eval_every: int = 1
    log_every: int = 10
    progress: bool = True

    # keys that may differ between a checkpoint and the command that resumes it
    RESUME_MUTABLE = (
        "epochs", "device", "workers", "progress", "out", "resume", "checkpoint_every", "checkpoint_epochs",
        "keep_checkpoints", "eval_every", "log_every", "data_dir", "amp", "channels_last", "deterministic",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping; keys may use '-' or '_'. Unknown keys raise ``ValueError`` naming ``source``."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            k = str(key).replace("-", "_")
            if k not in names:
                raise ValueError(f"{source}: unknown training option {key!r} (known: {', '.join(sorted(names))})")
            kwargs[k] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""

        def bad(name: str, expected: str) -> None:
            raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.model, str) or not self.model:
            bad("model", "a registered model name")
        if self.conv not in CONV_KINDS:
            bad("conv", f"one of {', '.join(CONV_KINDS)}")
        if self.experts is not None and (not _is_int(self.experts) or self.experts < 1):
            bad("experts", "a positive int or None")
        if self.width is not None and not (_is_number(self.width) and self.width > 0):
            bad("width", "a positive number or None")
        if self.dropout is not None and not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            bad("dropout", "in [0, 1) or None")
        if not isinstance(self.model_kwargs, dict):
            bad("model_kwargs", "a dict")
        for name in ("epochs", "batch_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an int >= 1")
        for name in ("workers", "checkpoint_every", "checkpoint_epochs", "eval_every", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an int >= 0")
        for name in ("keep_checkpoints", "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an int >= 1")
        if self.optimizer not in ("sgd", "adamw"):
            bad("optimizer", "'sgd' or 'adamw'")
        if not (_is_number(self.lr) and self.lr > 0):
            bad("lr", "a positive number")
        for name in ("momentum", "weight_decay", "warmup_epochs", "min_lr", "mixup"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "a number >= 0")
        if not (_is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            bad("label_smoothing", "in [0, 1)")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            bad("grad_clip", "a positive number or None")
        for name in ("temperature_start", "temperature_end"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "a positive number")
        if self.temperature_epochs is not None and not (
            _is_number(self.temperature_epochs) and self.temperature_epochs >= 0
        ):
            bad("temperature_epochs", "a number >= 0 or None")
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            bad("amp", "'auto', 'none', 'bf16' or 'fp16'")
        if not isinstance(self.device, str):
            bad("device", "'auto', 'cpu' or 'cuda[:N]'")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) file of training options into a dict; errors name the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"malformed config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"malformed config file {path}: expected a mapping of options, got {type(data).__name__}")
    return data


@dataclass
class TrainResult:
    """What :func:`train_model` returns.

    Attributes:
        run_dir: run folder.
        checkpoint: final weights (``run_dir/model.safetensors``; loadable with :func:`load_checkpoint`).
        config: the resolved configuration (dict).
        history: one dict per epoch (train loss/accuracy, test metrics when evaluated, lr, temperature, time).
        top1, top5, loss: final test metrics (top-1/top-5 in percent).
        params: parameters of the model.
        steps: optimizer steps taken in total.
        seconds: wall time of this call.
    """

    run_dir: Path
    checkpoint: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    top1: float
    top5: float
    loss: float
    params: int
    steps: int
    seconds: float


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------
def _model_args(config: TrainConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": int(num_classes), "in_chans": int(in_chans), "conv": config.conv}
    if config.width is not None:
        kwargs["width_mult"] = float(config.width)
    if config.dropout is not None:
        kwargs["dropout"] = float(config.dropout)
    if config.experts is not None and config.conv != "static":
        kwargs["num_experts"] = int(config.experts)
    kwargs.update(config.model_kwargs)
    return kwargs


def build_model(name: str, model_args: Mapping[str, Any]) -> nn.Module:
    """``condconv.models.create_model(name, **model_args)`` (imported lazily: tools sit above the zoo)."""
    from condconv.models import create_model

    return create_model(name, **dict(model_args))


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _to_channels_last(model: nn.Module) -> None:
    # Module.to(memory_format=...) rejects the 5-D expert weights, so convert the 4-D tensors one by one.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------------
# atomic files and checkpoints
# ----------------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _weights_bytes(model: nn.Module, metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    # clone: safetensors refuses tensors sharing storage, and CUDA/channels_last tensors must become plain CPU ones
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _unwrap(model).state_dict().items()}
    return save(tensors, metadata=dict(metadata))


def save_weights(model: nn.Module, path: str | os.PathLike, config: Mapping[str, Any], **metadata: Any) -> Path:
    """Atomically write ``model``'s state_dict as safetensors with ``config`` (JSON) in the metadata."""
    meta = {_CONFIG_METADATA_KEY: json.dumps(dict(config), sort_keys=True)}
    meta.update({k: str(v) for k, v in metadata.items()})
    path = Path(path)
    _atomic_write_bytes(path, _weights_bytes(model, meta))
    return path


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

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


def _config_from_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(_CONFIG_METADATA_KEY)
    if raw is None:
        raise ValueError(f"weights file {path} has no '{_CONFIG_METADATA_KEY}' metadata: not written by condconv train")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"weights file {path} has malformed '{_CONFIG_METADATA_KEY}' metadata: {exc}") from exc
    if not isinstance(config, dict) or "model" not in config or "model_args" not in config:
        raise ValueError(f"weights file {path}: metadata config lacks 'model'/'model_args'")
    return config


def _load_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    own = _unwrap(model).state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise ValueError(f"checkpoint {path} does not match the model: {'; '.join(parts)}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"training state file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"corrupt or unreadable training state {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"training state {path} is not a condconv checkpoint (format {CHECKPOINT_FORMAT})")
    return state


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


def _write_checkpoint(
    run_dir: Path, model: nn.Module, state: dict[str, Any], config: dict[str, Any], keep: int
) -> Path:
    ckdir = run_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    step = int(state["global_step"])
    name = f"step-{step:08d}"
    final = ckdir / name
    tmp = ckdir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {_CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True), "global_step": str(step)}
    for fname, data in (("model.safetensors", _weights_bytes(model, meta)), ("state.pt", _state_bytes(state))):
        with open(tmp / fname, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # left by a crashed timeline after the pointer's checkpoint: never the pointer's target
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckdir)
    _atomic_write_bytes(ckdir / "latest", (name + "\n").encode())
    # prune: keep the newest `keep` checkpoints up to this one, drop stale ones from a crashed timeline
    steps = sorted(
        int(p.name[5:]) for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
    )
    keep_set = {s for s in steps if s <= step}
    keep_set = set(sorted(keep_set)[-keep:])
    for s in steps:
        if s not in keep_set:
            shutil.rmtree(ckdir / f"step-{s:08d}", ignore_errors=True)
    for p in ckdir.iterdir():
        if p.name.startswith(".tmp-") and p != tmp:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return final


def _state_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": _py_state_to_plain(random.getstate()),
    }


def _py_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _set_rng_state(rng: Mapping[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        cuda_states = list(rng["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has %d CUDA RNG states, this machine %d devices: not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
    n = rng["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = rng["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _resolve_checkpoint_path(path: str | os.PathLike) -> Path:
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


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint.

    Args:
        path: a run folder (its final ``model.safetensors``, else its latest checkpoint), a checkpoint folder
            (``checkpoints/step-N``) or a ``.safetensors`` file written by ``condconv train`` (or ``condconv convert``:
            its recorded layer conversions are redone before the weights are loaded).
        map_location: device of the returned model.

    Returns:
        ``(model, config)``: the model (eval mode) built with ``create_model(config['model'],
        **config['model_args'])`` and loaded with the weights; the training config as a dict (with
        ``model_args``, ``num_classes``, ``in_chans``, ``image_size``, ``classes``, ``mean``, ``std``).

    Raises:
        FileNotFoundError: nothing to load at ``path``.
        ValueError: corrupt file, or weights that do not match the model (the message names the file).
    """
    weights = _resolve_checkpoint_path(path)
    tensors, metadata = _read_weights(weights)
    config = _config_from_metadata(weights, metadata)
    model = build_model(config["model"], config["model_args"])
    if config.get("convert"):  # a `condconv convert` checkpoint: redo its recorded layer conversions first
        from condconv.convert import apply_conversion

        apply_conversion(model, config["convert"])
    _load_state_dict(model, tensors, weights)
    model.eval()
    return model.to(map_location), config


def _config_classes(config: Mapping[str, Any]) -> int:
    return int(config.get("num_classes") or config["model_args"].get("num_classes", 1000))


def _config_in_chans(config: Mapping[str, Any]) -> int:
    return int(config.get("in_chans") or config["model_args"].get("in_chans", 3))


# ----------------------------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local, False)
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
    return _Dist(dist.get_rank(), dist.get_world_size(), local, True)


def _all_reduce_sum(values: torch.Tensor, dist_info: _Dist) -> torch.Tensor:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _broadcast_object(obj: Any, dist_info: _Dist) -> Any:
    if not dist_info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _resolve_device(spec: str, dist_info_local_rank: int = 0) -> torch.device:
    spec = str(spec).lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", dist_info_local_rank)
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {spec!r}")
    return dev


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: EpochLoader,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    _dist: _Dist | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 accuracy (percent), mean cross-entropy, per-class accuracy and throughput.

    Args:
        model: the model (put in eval mode here).
        loader: an unshuffled :class:`~condconv.data.EpochLoader`; with several processes each evaluates its shard
            and the sums are all-reduced.
        device: where to run.
        amp_dtype: autocast dtype (None = full precision).
        channels_last: feed channels_last inputs.
        progress: tqdm bar.

    Returns:
        dict with ``top1``, ``top5``, ``loss``, ``images``, ``per_class_accuracy`` (list, percent; NaN for classes
        without images), ``per_class_count``, ``seconds`` (model time) and ``images_per_s``.
    """
    from tqdm import tqdm

    dist_info = _dist or _Dist()
    device = torch.device(device)
    num_classes = loader.dataset.num_classes
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.float64, device=device)
    correct_pc = torch.zeros(num_classes, dtype=torch.float64, device=device)
    count_pc = torch.zeros(num_classes, dtype=torch.float64, device=device)
    k = min(5, num_classes)
    model_time = 0.0
    bar = tqdm(
        total=len(loader), desc="eval", leave=False, disable=not (progress and dist_info.main), dynamic_ncols=True
    )
    for x, y in loader:
        t0 = time.perf_counter()
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.topk(k, dim=1).indices
        hit = pred.eq(y.view(-1, 1))
        top1 += hit[:, 0].sum().double()
        top5 += hit.any(dim=1).sum().double()
        correct_pc.index_add_(0, y, hit[:, 0].double())
        count_pc.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_time += time.perf_counter() - t0
        bar.update(1)
    bar.close()
    packed = torch.cat([torch.stack([loss_sum, top1, top5]), correct_pc, count_pc])
    packed = _all_reduce_sum(packed, dist_info).cpu()
    loss_sum, top1, top5 = packed[0].item(), packed[1].item(), packed[2].item()
    correct_pc, count_pc = packed[3 : 3 + num_classes], packed[3 + num_classes :]
    n = int(count_pc.sum().item())
    times = torch.tensor([model_time], dtype=torch.float64)
    if dist_info.enabled:
        times = _all_reduce_sum(times.to(device), dist_info).cpu() / dist_info.world_size
    model.train(was_training)
    per_class = [(100.0 * c / m) if m > 0 else float("nan") for c, m in zip(correct_pc.tolist(), count_pc.tolist())]
    seconds = float(times[0])
    return {
        "images": n,
        "loss": loss_sum / max(n, 1),
        "top1": 100.0 * top1 / max(n, 1),
        "top5": 100.0 * top5 / max(n, 1),
        "top_k": k,
        "per_class_accuracy": per_class,
        "per_class_count": [int(c) for c in count_pc.tolist()],
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
    }


# ----------------------------------------------------------------------------------------------------------------
# logs
# ----------------------------------------------------------------------------------------------------------------
_CSV_FIELDS = [
    "epoch", "step", "lr", "temperature", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5",
    "epoch_seconds", "train_images_per_s",
]  # fmt: skip


class _Logs:
    """JSONL (step and epoch records) + CSV (epoch records) in the run folder; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.jsonl, self.csv, self.enabled = run_dir / "log.jsonl", run_dir / "log.csv", enabled

    def truncate(self, max_step: int) -> None:
        """Drop records after ``max_step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.jsonl.is_file():
            return
        keep = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if int(rec.get("step", 0)) <= max_step:
                keep.append(json.dumps(rec))
        _atomic_write_bytes(self.jsonl, ("\n".join(keep) + ("\n" if keep else "")).encode())
        self._rewrite_csv()

    def _rewrite_csv(self) -> None:
        rows = []
        if self.jsonl.is_file():
            for line in self.jsonl.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if rec.get("type") == "epoch":
                        rows.append(rec)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in _CSV_FIELDS})
        _atomic_write_bytes(self.csv, buf.getvalue().encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("type") == "epoch":
            new = not self.csv.is_file()
            with open(self.csv, "a", encoding="utf-8", newline="") as f:
                w = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow({k: record.get(k, "") for k in _CSV_FIELDS})


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, *, warmup: int, total: int, peak: float, floor: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    min_ratio = floor / peak
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _default_run_dir(config: TrainConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model}-{config.conv}-{stamp}"


def _resume_source(config: TrainConfig) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        if not config.out:
            raise ValueError("resume='auto' needs out (--out RUN_DIR); or pass the run folder: --resume RUN_DIR")
        ck = latest_checkpoint(config.out)
        if ck is None:
            logger.info("no checkpoint in %s yet: starting fresh", config.out)
        return ck
    ck = latest_checkpoint(config.resume)
    if ck is None:
        raise FileNotFoundError(f"no checkpoint to resume in {config.resume} (expected checkpoints/latest)")
    return ck


def _merge_resume_config(
    saved: dict[str, Any], config: TrainConfig, explicit: Iterable[str], source: Path
) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in names}
    for key in explicit:
        new = getattr(config, key)
        if key in merged and merged[key] != new and key not in TrainConfig.RESUME_MUTABLE:
            raise ValueError(
                f"cannot resume {source} with {key}={new!r}: the checkpoint was trained with {key}={merged[key]!r}"
            )
        merged[key] = new
    if "epochs" in explicit and saved.get("epochs") != config.epochs:
        logger.warning(
            "resuming with epochs=%s instead of %s: the learning-rate schedule changes",
            config.epochs,
            saved.get("epochs"),
        )
    merged["resume"] = config.resume
    return TrainConfig.from_dict(merged, source=str(source))


def train_model(
    config: TrainConfig | Mapping[str, Any] | None = None, *, explicit: Iterable[str] | None = None, **overrides: Any
) -> TrainResult:
    """Train a model; see :class:`TrainConfig` for every option.

    Args:
        config: a :class:`TrainConfig` or a dict of its fields (None: all defaults).
        explicit: names of options given explicitly (on resume only these may override the checkpoint's config;
            default: every option that differs from the defaults).
        **overrides: more options, e.g. ``train_model(epochs=3, experts=8)``.

    Returns:
        :class:`TrainResult`.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint stays in place).
        ValueError / FileNotFoundError: bad options, data or checkpoints (messages name the option or file).
    """
    if config is None:
        config = TrainConfig()
    if isinstance(config, Mapping):
        config = TrainConfig.from_dict(config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    config.validate()
    if explicit is None:
        defaults = TrainConfig()
        explicit = [
            f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)
        ]
    explicit = list(explicit)

    t_start = time.perf_counter()
    device_kind = (
        "cuda"
        if (config.device == "auto" and torch.cuda.is_available()) or str(config.device).startswith("cuda")
        else "cpu"
    )
    dist_info = _init_distributed(device_kind)
    try:
        return _train(config, explicit, dist_info, t_start)
    finally:
        if dist_info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, explicit: list[str], dist_info: _Dist, t_start: float) -> TrainResult:
    from tqdm import tqdm

    from condconv.routing import TemperatureSchedule, set_temperature

    # ---- resume source and run folder -------------------------------------------------------------------------
    resume_ck = _resume_source(config)
    state: dict[str, Any] | None = None
    resume_weights: dict[str, torch.Tensor] | None = None
    if resume_ck is not None:
        state = _read_state(resume_ck / "state.pt")
        resume_weights, meta = _read_weights(resume_ck / "model.safetensors")
        if str(meta.get("global_step")) != str(state.get("global_step")):
            raise ValueError(
                f"mismatched checkpoint {resume_ck}: weights are from step {meta.get('global_step')}, "
                f"state from step {state.get('global_step')}"
            )
        config = _merge_resume_config(state["config"], config, explicit, resume_ck)
        run_dir = Path(config.out) if "out" in explicit and config.out else resume_ck.parent.parent
    else:
        run_dir = Path(config.out) if config.out else _default_run_dir(config)
        run_dir = Path(_broadcast_object(str(run_dir), dist_info))
        if dist_info.main and (run_dir / "checkpoints" / "latest").exists():
            raise ValueError(
                f"run folder {run_dir} already holds a checkpoint: pass --resume to continue it or another --out"
            )
    config = dataclasses.replace(config, out=str(run_dir))

    device = _resolve_device(config.device, dist_info.local_rank)
    amp_dtype = _amp_dtype(config.amp, device)
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- seeds, data, model -----------------------------------------------------------------------------------
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    train_ds = build_dataset(
        config.dataset,
        "train",
        data_dir=config.data_dir,
        train_size=config.train_size,
        image_size=config.image_size,
        seed=config.seed,
    )
    test_ds = build_dataset(
        config.dataset, "test", data_dir=config.data_dir, image_size=config.image_size, seed=config.seed
    )
    pin = device.type == "cuda"
    train_loader = EpochLoader(
        train_ds, config.batch_size, shuffle=True, seed=config.seed, drop_last=True, rank=dist_info.rank,
        world_size=dist_info.world_size, num_workers=config.workers, pin_memory=pin,
    )  # fmt: skip
    test_loader = EpochLoader(
        test_ds, max(config.batch_size, 256) if isinstance(test_ds, ArrayImageDataset) else 2 * config.batch_size,
        rank=dist_info.rank, world_size=dist_info.world_size, num_workers=config.workers, pin_memory=pin,
    )  # fmt: skip
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} x {dist_info.world_size} process(es) exceeds "
            f"the {len(train_ds)} training images"
        )
    total_steps = steps_per_epoch * config.epochs

    conversions = None
    if config.init:
        model, init_cfg = load_checkpoint(config.init)
        model_args, conversions = dict(init_cfg["model_args"]), init_cfg.get("convert")
        got = (_config_classes(init_cfg), int(model_args.get("in_chans", 3)))
        if got != (train_ds.num_classes, train_ds.in_chans):
            raise ValueError(
                f"init checkpoint {config.init} has {got[0]} classes and {got[1]} input channels, "
                f"{train_ds.name} has {train_ds.num_classes} and {train_ds.in_chans}"
            )
        overridden = [k for k in ("model", "conv", "experts", "width", "dropout", "model_kwargs") if k in explicit]
        if overridden and state is None:
            logger.warning("--init: the architecture is the checkpoint's; ignoring %s", ", ".join(overridden))
        config = dataclasses.replace(
            config, model=init_cfg["model"], conv=str(model_args.get("conv", "static")),
            experts=model_args.get("num_experts"), width=model_args.get("width_mult"),
            dropout=model_args.get("dropout"),
        )  # fmt: skip
    else:
        model_args = _model_args(config, train_ds.num_classes, train_ds.in_chans)
        model = build_model(config.model, model_args)
    params = _count_params(model)
    saved_config = config.to_dict()
    if conversions:
        saved_config["convert"] = conversions
    saved_config.update(
        model_args=model_args, num_classes=train_ds.num_classes, in_chans=train_ds.in_chans,
        image_size=train_ds.image_size,
        classes=list(train_ds.classes), mean=list(train_ds.mean), std=list(train_ds.std), dataset_name=train_ds.name,
    )  # fmt: skip
    if resume_weights is not None:
        _load_state_dict(model, resume_weights, resume_ck / "model.safetensors")
    if config.sync_bn and dist_info.enabled and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        _to_channels_last(model)
    if dist_info.enabled:
        torch.manual_seed(config.seed + 1_000_003 * dist_info.rank)  # distinct dropout masks per process
        ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        ddp_model = model

    # ---- optimizer, schedule, temperature ---------------------------------------------------------------------
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    lr_fn = _make_lr_fn(warmup, total_steps, config.lr, config.min_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    scaler = torch.amp.GradScaler("cuda", enabled=(amp_dtype == torch.float16 and device.type == "cuda"))
    temp_epochs = config.temperature_epochs
    if temp_epochs is None:
        temp_epochs = 0.1 * config.epochs if config.conv in ("dynamic", "odconv") else 0.0
    temp_iters = int(round(temp_epochs * steps_per_epoch))
    temp_sched = (
        TemperatureSchedule(config.temperature_start, config.temperature_end, iterations=max(temp_iters, 1))
        if temp_iters > 0
        else None
    )
    if temp_sched is not None and set_temperature(model, config.temperature_start) == 0:
        logger.warning("temperature annealing requested but %s has no router with a temperature", config.model)
        temp_sched = None

    start_epoch, start_step, global_step = 0, 0, 0
    history: list[dict[str, Any]] = []
    epoch_stats = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, global_step = (
            int(state["epoch"]),
            int(state["step_in_epoch"]),
            int(state["global_step"]),
        )
        history = list(state.get("history", []))
        per_rank = list(state["per_rank"])
        if state.get("world_size", 1) != dist_info.world_size:
            logger.warning(
                "resuming a %s-process run with %s processes: data order and random streams differ",
                state.get("world_size"), dist_info.world_size,
            )  # fmt: skip
        mine = per_rank[dist_info.rank] if dist_info.rank < len(per_rank) else per_rank[0]
        epoch_stats = dict(mine["epoch_stats"])
        _set_rng_state(mine["rng"])
        logger.info(
            "resumed %s at epoch %d, step %d (global step %d)", resume_ck, start_epoch + 1, start_step, global_step
        )

    logs = _Logs(run_dir, dist_info.main)
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is not None:
            logs.truncate(global_step)
        elif logs.jsonl.exists():  # a run that died before its first checkpoint starts over
            logs.truncate(0)
        _write_config_yaml(run_dir / "config.yaml", saved_config)
        logger.info("%s | %s params | %s", train_ds.describe(), f"{params:,}", device)

    def save(epoch: int, step_in_epoch: int) -> None:
        # every process contributes its RNG state and running epoch sums; rank 0 writes
        mine = {"rng": _rng_state(), "epoch_stats": dict(epoch_stats)}
        per_rank = [mine]
        if dist_info.enabled:
            import torch.distributed as dist

            per_rank = [None] * dist_info.world_size
            dist.all_gather_object(per_rank, mine)
        if not dist_info.main:
            return
        st = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "world_size": dist_info.world_size,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "per_rank": per_rank,
            "config": config.to_dict(),
            "history": history,
        }
        _write_checkpoint(run_dir, model, st, saved_config, config.keep_checkpoints)

    # ---- loop ---------------------------------------------------------------------------------------------------
    last_eval: dict[str, Any] | None = history[-1].get("eval") if history and history[-1].get("eval") else None
    check_every = 1 if device.type != "cuda" else config.log_every
    # testing aid (tests/test_train.py): SIGKILL this process right after the given global step
    kill_at_step = int(os.environ.get("CONDCONV_TEST_KILL_AT_STEP", "0") or 0)
    for epoch in range(start_epoch, config.epochs):
        train_loader.set_epoch(epoch)
        _set_train_mode(ddp_model, config.freeze_bn)
        first = start_step if epoch == start_epoch else 0
        if epoch != start_epoch:
            epoch_stats = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        bar = tqdm(
            total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
            disable=not (config.progress and dist_info.main), dynamic_ncols=True,
        )  # fmt: skip
        t_epoch, images_seen = time.perf_counter(), 0
        pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        step_in_epoch = first
        for x, y in train_loader.iterate(first):
            if temp_sched is not None:
                set_temperature(model, temp_sched.value(global_step))
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y_b, lam = None, 1.0
            if config.mixup > 0:
                rng = np.random.default_rng([config.seed, epoch, step_in_epoch, dist_info.rank])
                lam = float(rng.beta(config.mixup, config.mixup))
                perm = torch.from_numpy(rng.permutation(x.shape[0])).to(device)
                x = lam * x + (1.0 - lam) * x[perm]
                y_b = y[perm]
            with _autocast(device, amp_dtype):
                logits = ddp_model(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            if y_b is not None:
                loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, y_b, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            step_in_epoch += 1
            images_seen += x.shape[0]
            pending.append((loss.detach(), (logits.detach().argmax(1) == y).sum(), x.shape[0]))
            bar.update(1)
            must_save = (
                config.checkpoint_every > 0
                and global_step % config.checkpoint_every == 0
                and step_in_epoch < steps_per_epoch
            )
            if len(pending) >= check_every or must_save or step_in_epoch == steps_per_epoch:
                _flush_pending(pending, epoch_stats, global_step, epoch, run_dir)  # raises on a non-finite loss
                if dist_info.main:
                    elapsed = max(time.perf_counter() - t_epoch, 1e-9)
                    lr = optimizer.param_groups[0]["lr"]
                    loss_avg = epoch_stats["loss_sum"] / max(epoch_stats["count"], 1)
                    acc = 100.0 * epoch_stats["correct"] / max(epoch_stats["count"], 1)
                    img_s = images_seen * dist_info.world_size / elapsed
                    bar.set_postfix(
                        loss=f"{loss_avg:.3f}", acc=f"{acc:.1f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}", refresh=False
                    )
                    if global_step % config.log_every == 0:
                        logs.write({
                            "type": "step", "epoch": epoch + 1, "step": global_step, "loss": loss_avg, "train_acc": acc,
                            "lr": lr, "temperature": temp_sched.value(global_step - 1) if temp_sched else None,
                            "images_per_s": img_s,
                        })  # fmt: skip
            if must_save:
                save(epoch, step_in_epoch)
            if kill_at_step and global_step == kill_at_step:  # test hook: die like a preempted job
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        epoch_seconds = time.perf_counter() - t_epoch

        # epoch summary (train stats all-reduced across processes)
        totals = _all_reduce_sum(
            torch.tensor(
                [epoch_stats["loss_sum"], epoch_stats["correct"], epoch_stats["count"]],
                dtype=torch.float64,
                device=device,
            ),
            dist_info,
        ).tolist()
        record: dict[str, Any] = {
            "type": "epoch", "epoch": epoch + 1, "step": global_step, "lr": optimizer.param_groups[0]["lr"],
            "temperature": temp_sched.value(global_step - 1) if temp_sched else None,
            "train_loss": totals[0] / max(totals[2], 1), "train_acc": 100.0 * totals[1] / max(totals[2], 1),
            "epoch_seconds": epoch_seconds,
            "train_images_per_s": images_seen * dist_info.world_size / max(epoch_seconds, 1e-9),
        }  # fmt: skip
        is_last = epoch + 1 == config.epochs
        if (config.eval_every and (epoch + 1) % config.eval_every == 0) or is_last:
            ev = evaluate(
                model, test_loader, device=device, amp_dtype=amp_dtype, channels_last=channels_last, _dist=dist_info
            )
            record.update(test_loss=ev["loss"], test_top1=ev["top1"], test_top5=ev["top5"])
            last_eval = {k: ev[k] for k in ("loss", "top1", "top5", "images")}
            record["eval"] = last_eval
        history.append(record)
        logs.write(record)
        if dist_info.main:
            msg = f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%"
            if "test_top1" in record:
                msg += (
                    f" | test loss {record['test_loss']:.4f} top-1 {record['test_top1']:.2f}%"
                    f" top-5 {record['test_top5']:.2f}%"
                )
            logger.info(msg + f" | {epoch_seconds:.1f}s")
        epoch_stats = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        if is_last or (config.checkpoint_epochs and (epoch + 1) % config.checkpoint_epochs == 0):
            save(epoch + 1, 0)
        start_step = 0

    final = run_dir / "model.safetensors"
    if dist_info.main:
        save_weights(model, final, saved_config, global_step=global_step)
    if last_eval is None:  # resumed after the last epoch had finished
        ev = evaluate(
            model, test_loader, device=device, amp_dtype=amp_dtype, channels_last=channels_last, _dist=dist_info
        )
        last_eval = {k: ev[k] for k in ("loss", "top1", "top5", "images")}
    return TrainResult(
        run_dir=run_dir, checkpoint=final, config=saved_config, history=history, top1=float(last_eval["top1"]),
        top5=float(last_eval["top5"]), loss=float(last_eval["loss"]), params=params, steps=global_step,
        seconds=time.perf_counter() - t_start,
    )  # fmt: skip


class _LrFactor:
    """Picklable per-step learning-rate factor (warm-up then cosine)."""

    def __init__(self, warmup: int, total: int, peak: float, floor: float) -> None:
        self.warmup, self.total, self.peak, self.floor = warmup, total, peak, floor

    def __call__(self, step: int) -> float:
        return _lr_factor(step, warmup=self.warmup, total=self.total, peak=self.peak, floor=self.floor)


def _make_lr_fn(warmup: int, total: int, peak: float, floor: float):
    fn = _LrFactor(warmup, total, peak, floor)
    return lambda step: fn(step)  # a lambda: LambdaLR keeps it out of state_dict (only tensors and numbers saved)


def _flush_pending(pending: list, stats: dict[str, float], global_step: int, epoch: int, run_dir: Path) -> None:
    if not pending:
        return
    values = torch.stack([torch.stack([p[0].float(), p[1].float()]) for p in pending]).cpu().tolist()
    for (loss_v, correct_v), (_, _, n) in zip(values, pending):
        if not math.isfinite(loss_v):
            last = latest_checkpoint(run_dir)
            raise NonFiniteLossError(
                f"non-finite loss ({loss_v}) at epoch {epoch + 1}, step <= {global_step}: training stopped; "
                f"last good checkpoint: {last if last is not None else 'none written yet'} (lower --lr, enable "
                f"--grad-clip, or use --amp bf16 instead of fp16)"
            )
        stats["loss_sum"] += loss_v * n
        stats["correct"] += correct_v
        stats["count"] += n
    pending.clear()


def _write_config_yaml(path: Path, config: Mapping[str, Any]) -> None:
    import yaml

    _atomic_write_bytes(path, yaml.safe_dump(dict(config), sort_keys=False).encode())


# ----------------------------------------------------------------------------------------------------------------
# checkpoint evaluation
# ----------------------------------------------------------------------------------------------------------------
def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 256,
    device: str = "auto",
    amp: str = "none",
    workers: int = 4,
    image_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint (see :func:`load_checkpoint`) on a dataset (default: the one it was trained on).

    Returns:
        :func:`evaluate`'s dict plus ``checkpoint``, ``model``, ``dataset``, ``split`` and ``classes``.
    """
    model, config = load_checkpoint(checkpoint)
    dataset = dataset or config.get("dataset", "digits")
    data_dir = data_dir if data_dir is not None else config.get("data_dir")
    ds = build_dataset(
        dataset, split, data_dir=data_dir, image_size=image_size or config.get("image_size"), augment=False
    )
    if ds.num_classes != _config_classes(config):
        raise ValueError(
            f"checkpoint {checkpoint} predicts {_config_classes(config)} classes but {dataset} has {ds.num_classes}"
        )
    if ds.in_chans != _config_in_chans(config):
        raise ValueError(
            f"checkpoint {checkpoint} takes {_config_in_chans(config)}-channel images but {dataset} has {ds.in_chans}"
        )
    dev = _resolve_device(device)
    amp_dtype = _amp_dtype(amp, dev)
    model.to(dev)
    loader = EpochLoader(ds, batch_size, num_workers=workers, pin_memory=dev.type == "cuda")
    result = evaluate(model, loader, device=dev, amp_dtype=amp_dtype, progress=progress)
    result.update(
        checkpoint=str(checkpoint), model=config["model"], dataset=ds.name, split=ds.split, classes=list(ds.classes)
    )
    return result


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def _opt_int_or_float(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _none_or(cast):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else cast(text)

    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


def add_training_options(
    parser: argparse.ArgumentParser, *, include: Iterable[str] | None = None, defaults: Mapping[str, Any] | None = None
) -> None:
    """Add the :class:`TrainConfig` options to ``parser`` (defaults suppressed: only given flags appear).

    Args:
        parser: the parser.
        include: option names to add (default: all).
        defaults: defaults shown in the help (default: :class:`TrainConfig`'s).
    """
    d = TrainConfig().to_dict()
    d.update(defaults or {})
    S = argparse.SUPPRESS
    keep = set(include) if include is not None else None

    def add(name: str, *flags: str, **kw: Any) -> None:
        if keep is not None and name not in keep:
            return
        kw.setdefault("dest", name)
        kw["default"] = S
        if "help" in kw and "%(default)" not in kw["help"]:
            kw["help"] += f" (default: {d.get(name)})"
        (group.add_argument)(*flags, **kw)

    group = parser.add_argument_group("model")
    add("model", "--model", "-m", help="registered model name")
    add("conv", "--conv", choices=CONV_KINDS, help="convolution kind of the dynamic layers")
    add("experts", "--experts", "-e", type=_none_or(int), help="experts per dynamic layer")
    add("width", "--width", "-w", type=_none_or(float), help="width multiplier")
    add("dropout", "--dropout", type=_none_or(float), help="dropout before the classifier (None: model default)")
    add("model_kwargs", "--model-kwargs", nargs="*", metavar="KEY=VALUE", help="more create_model kwargs (YAML values)")
    add(
        "init",
        "--init",
        metavar="CHECKPOINT",
        help="fine-tune: start from a train/convert checkpoint's model and weights",
    )
    group = parser.add_argument_group("data")
    add("dataset", "--dataset", "-d", help="digits | cifar10 | cifar100 | imagefolder | PATH")
    add("data_dir", "--data-dir", help="CIFAR folder or ImageFolder root")
    add(
        "train_size", "--train-size", type=_none_or(_opt_int_or_float), help="training images (int) or fraction (float)"
    )
    add("image_size", "--image-size", type=_none_or(int), help="ImageFolder crop size")
    add("workers", "--workers", type=int, help="DataLoader workers (ImageFolder)")
    group = parser.add_argument_group("optimisation")
    add("epochs", "--epochs", type=int, help="epochs")
    add("batch_size", "--batch-size", "-b", type=int, help="batch size per process")
    add("optimizer", "--optimizer", choices=("sgd", "adamw"), help="optimizer")
    add("lr", "--lr", type=float, help="peak learning rate")
    add("momentum", "--momentum", type=float, help="SGD momentum (Nesterov)")
    add("weight_decay", "--weight-decay", "--wd", type=float, help="weight decay (not on biases/norms)")
    add("warmup_epochs", "--warmup-epochs", type=float, help="linear warm-up epochs")
    add("min_lr", "--min-lr", type=float, help="final learning rate of the cosine")
    add("label_smoothing", "--label-smoothing", type=float, help="label smoothing")
    add("mixup", "--mixup", type=float, help="mixup alpha (0 = off)")
    add("grad_clip", "--grad-clip", type=_none_or(float), help="clip gradient norm")
    add("freeze_bn", "--freeze-bn", action=argparse.BooleanOptionalAction, help="BatchNorm uses running stats")
    add("sync_bn", "--sync-bn", action=argparse.BooleanOptionalAction, help="SyncBatchNorm under DDP (CUDA)")
    group = parser.add_argument_group("dynamic convolutions")
    add("temperature_start", "--temperature-start", type=float, help="initial router temperature")
    add("temperature_end", "--temperature-end", type=float, help="final router temperature")
    add(
        "temperature_epochs",
        "--temperature-epochs",
        type=_none_or(float),
        help="anneal epochs (None: 10%% for dynamic/odconv)",
    )
    group = parser.add_argument_group("runtime")
    add("device", "--device", help="auto | cpu | cuda | cuda:N")
    add("amp", "--amp", choices=("auto", "none", "bf16", "fp16"), help="mixed precision")
    add(
        "channels_last",
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last memory format (None: on CUDA)",
    )
    add("seed", "--seed", type=int, help="random seed")
    add("deterministic", "--deterministic", action=argparse.BooleanOptionalAction, help="deterministic algorithms")
    group = parser.add_argument_group("output")
    add("out", "--out", "-o", help="run folder")
    add(
        "resume",
        "--resume",
        nargs="?",
        const="auto",
        metavar="RUN_DIR",
        help="continue the latest checkpoint of RUN_DIR (or of --out)",
    )
    add("checkpoint_every", "--checkpoint-every", type=int, help="also checkpoint every N steps (0 = epoch ends only)")
    add("checkpoint_epochs", "--checkpoint-epochs", type=int, help="checkpoint every N epochs")
    add("keep_checkpoints", "--keep-checkpoints", type=int, help="checkpoints kept")
    add("eval_every", "--eval-every", type=int, help="evaluate every N epochs (0 = at the end)")
    add("log_every", "--log-every", type=int, help="log every N steps")
    add("progress", "--progress", action=argparse.BooleanOptionalAction, help="progress bar")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``condconv train``."""
    parser.add_argument(
        "--config", "-c", metavar="FILE.yaml", help="YAML file of options (flags given here override it)"
    )
    add_training_options(parser)


def config_from_args(
    args: argparse.Namespace, *, base: Mapping[str, Any] | None = None
) -> tuple[TrainConfig, list[str]]:
    """TrainConfig from defaults <- ``base`` <- ``--config`` file <- given flags; also the explicit names."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = dict(base or {})
    explicit: list[str] = list(values)
    cfg_file = getattr(args, "config", None)
    if cfg_file:
        file_values = load_config_file(cfg_file)
        for k in file_values:
            if str(k).replace("-", "_") not in names:
                raise ValueError(f"config file {cfg_file}: unknown option {k!r}")
        file_values = {str(k).replace("-", "_"): v for k, v in file_values.items()}
        values.update(file_values)
        explicit += list(file_values)
    given = {k: v for k, v in vars(args).items() if k in names}
    if "model_kwargs" in given:
        given["model_kwargs"] = {**values.get("model_kwargs", {}), **parse_kwargs(given["model_kwargs"])}
    values.update(given)
    explicit += list(given)
    try:
        cfg = TrainConfig.from_dict(values, source=str(cfg_file or "options"))
    except TypeError as exc:
        raise ValueError(f"{cfg_file or 'options'}: {exc}") from exc
    return cfg, sorted(set(explicit))


def run_train(args: argparse.Namespace) -> int:
    """``condconv train``: train and print the final metrics."""
    config, explicit = config_from_args(args)
    result = train_model(config, explicit=explicit)
    c = result.config
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{c['model']} ({c['conv']}, experts={c['experts']}, width={c['width']}) on {c['dataset']}: "
            f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  "
            f"params {result.params:,}  steps {result.steps}  {result.seconds:.1f}s\nweights: {result.checkpoint}"
        )
    return 0


def add_checkpoint_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``condconv eval`` and ``condconv routing`` share: a checkpoint, the data to run it on, device."""
    parser.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    parser.add_argument("--dataset", "-d", default=None, help="dataset (default: the checkpoint's)")
    parser.add_argument("--data-dir", default=None, help="CIFAR folder or ImageFolder root (default: the checkpoint's)")
    parser.add_argument("--split", default="test", help="train | test (default: test)")
    parser.add_argument("--batch-size", "-b", type=int, default=256, help="batch size (default: 256)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``condconv eval``."""
    add_checkpoint_data_arguments(parser)
    parser.add_argument(
        "--amp", default="none", choices=("none", "bf16", "fp16", "auto"), help="mixed precision (default: none)"
    )
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (default: 4)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="ImageFolder crop size (default: the checkpoint's)"
    )
    parser.add_argument(
        "--json", metavar="FILE", default=None, help="also write the results as JSON ('-' = stdout only)"
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")


def run_eval(args: argparse.Namespace) -> int:
    """``condconv eval``: top-1/top-5, loss, per-class accuracy and images/s of a checkpoint."""
    res = evaluate_checkpoint(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, split=args.split, batch_size=args.batch_size,
        device=args.device, amp=args.amp, workers=args.workers, image_size=args.image_size, progress=args.progress,
    )  # fmt: skip
    if args.json == "-":
        json.dump(_json_safe(res), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{res['model']} on {res['dataset']}/{res['split']} ({res['images']} images)")
    print(
        f"  top-1 {res['top1']:.2f}%   top-{res['top_k']} {res['top5']:.2f}%   loss {res['loss']:.4f}   "
        f"{res['images_per_s']:.0f} images/s (model)"
    )
    pcs = list(zip(res["classes"], res["per_class_accuracy"], res["per_class_count"]))
    if len(pcs) <= 20:
        print("  per-class accuracy: " + "  ".join(f"{c}: {a:.1f}% ({n})" for c, a, n in pcs))
    else:
        valid = sorted((a, c) for c, a, n in pcs if n > 0)
        print("  lowest per-class accuracy: " + ", ".join(f"{c} {a:.1f}%" for a, c in valid[:5]))
    if args.json:
        _atomic_write_bytes(Path(args.json), json.dumps(_json_safe(res), indent=2).encode())
        print(f"  written: {args.json}")
    return 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


train = train_model
