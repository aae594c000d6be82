"""Training configuration: :class:`TrainConfig` (every option of ``condconv train``) and YAML option files.

CLI flags, YAML keys and Python fields share their names (a flag ``--weight-decay`` is the key ``weight-decay`` or
``weight_decay`` and the field ``weight_decay``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from condconv.nn.layers import CONV_KINDS
from condconv.training.recipes import load_recipe, validate_knobs
from condconv.utils.checks import OptionError, seed_value

__all__ = ["DATASET_MODEL_KWARGS", "FLAG_MODEL_KWARGS", "MODEL_CONV_KINDS", "TrainConfig", "check_dataset_kwargs",
           "check_model_kwargs", "load_config_file", "model_args"]

#: ``conv`` values: the layer kinds the zoo's families take, and 'kernelwarehouse' for the KernelWarehouse presets
#: (``kw_*``, whose layers are fixed: no ``conv``/``num_experts`` argument is passed to them)
MODEL_CONV_KINDS = (*CONV_KINDS, "kernelwarehouse")


@dataclass
class TrainConfig:
    """Everything that defines a training run (CLI flags, YAML keys and Python fields share these names).

    The defaults train a small model (MobileNetV1-CIFAR at width 0.25, CondConv with 4 experts) on the embedded
    digits in well under a minute of CPU; for CIFAR or ImageNet set the width, epochs, batch size and lr.

    Model:
        model: registered model name (``condconv.list_models()``).
        conv: 'static', 'condconv', 'dynamic' or 'odconv'; 'kernelwarehouse' for the ``kw_*`` presets.
        experts: number of experts (None: the layer's default; ignored for 'static').
        width: width multiplier (None: the model's default).
        dropout: dropout before the classifier (None: the model's default).
        model_kwargs: further keyword arguments of ``create_model``; not those an option sets (``width_mult``,
            ``num_experts``, ``conv``, ``dropout``: refused naming the option), and ``num_classes``/``in_chans`` only
            with the dataset's values.
        init: start from the weights of a ``condconv train`` or ``condconv convert`` checkpoint (fine-tuning); the
            architecture (model, conv, experts, width, conversions) is then the checkpoint's. It must stay
            available to resume the run.
    Data:
        dataset: 'digits', 'cifar10', 'cifar100', 'imagefolder' or a folder.
        data_dir: folder of CIFAR data or the ImageFolder root.
        train_size: images (int) or fraction (float) of the training split to use (fixed stratified subset).
        image_size: ImageFolder crop size (default 224).
        workers: DataLoader worker processes (ImageFolder only; None: ``min(4, CPU count)``).
        skip_bad_images: leave out image files that cannot be read (default: stop before training and list them).
    Optimisation:
        epochs, batch_size (per process), optimizer ('sgd' Nesterov or 'adamw'), lr (peak), momentum,
        weight_decay (not applied to biases and norm parameters), warmup_epochs (linear warm-up, then cosine to
        min_lr, per step), label_smoothing, mixup (Beta(alpha, alpha); 0 = off), grad_clip (max norm; None = off),
        freeze_bn (BatchNorm layers use running statistics; their affine parameters still train), sync_bn (CUDA).
        Relations checked by :meth:`validate`: momentum in [0, 1), min_lr <= lr, warmup_epochs <= epochs,
        lr_milestones strictly increasing, seed in [0, 2**32 - 1].
    Dynamic convolutions:
        temperature_start, temperature_end, temperature_epochs: linear annealing of the routers' softmax
        temperature over the first ``temperature_epochs`` epochs' iterations (the papers: 10 epochs). None = 10% of
        the epochs for 'dynamic'/'odconv' and off otherwise; 0 = off.
    Recipes (:mod:`condconv.training.recipes`; each option also works on its own):
        recipe: name of the recipe the options came from (recorded; :meth:`from_recipe` loads one).
        global_batch_size: the batch over all processes (set: ``batch_size`` becomes it divided by the processes).
        optimizer 'rmsprop_tf' (RMSProp with TensorFlow's semantics) with rmsprop_decay, rmsprop_eps; nesterov (SGD:
        Nesterov or plain momentum); weight_decay_exclude ('norm_and_bias', 'norm' or 'none': what is not decayed);
        lr_reference_batch (lr is scaled linearly from this global batch to the real one); lr_schedule ('cosine',
        'step', 'exponential', 'constant', after the warm-up) with lr_milestones (epochs), lr_gamma, lr_decay_epochs,
        lr_staircase; ema_decay (exponential moving average of the weights, 0 = off; evaluated and saved as the final
        weights) with ema_warmup; augment ('none', 'autoaugment', 'randaugment') with randaug_layers and
        randaug_magnitude. Model options of the recipes (drop_connect_rate, bn_momentum, bn_eps) go in model_kwargs.
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
    workers: int | None = None
    skip_bad_images: bool = False
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
    recipe: str | None = None
    global_batch_size: int | None = None
    nesterov: bool = True
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1e-3
    weight_decay_exclude: str = "norm_and_bias"
    lr_reference_batch: int | None = None
    lr_schedule: str = "cosine"
    lr_milestones: list[float] = field(default_factory=lambda: [30.0, 60.0, 90.0])
    lr_gamma: float | None = None
    lr_decay_epochs: float = 2.4
    lr_staircase: bool = True
    ema_decay: float = 0.0
    ema_warmup: bool = True
    augment: str = "none"
    randaug_layers: int = 2
    randaug_magnitude: float = 10.0
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
        "skip_bad_images",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("dataset", "data_dir", "init", "out", "resume"):  # paths may be given as Path objects
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

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

    @classmethod
    def from_recipe(cls, name: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """The options of a recipe (:func:`condconv.training.recipes.load_recipe`: a packaged name or a YAML file), with
        ``overrides`` on top; ``recipe`` records the name."""
        values = load_recipe(name)
        values.update(overrides)
        values.setdefault("recipe", str(name))
        return cls.from_dict(values, source=f"recipe {name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""

        def bad(name: str, expected: str) -> None:
            raise OptionError(name, f"{name} must be {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.model, str) or not self.model:
            bad("model", "a registered model name")
        if self.conv not in MODEL_CONV_KINDS:
            bad("conv", f"one of {', '.join(MODEL_CONV_KINDS)}")
        if self.experts is not None and (not _is_int(self.experts) or self.experts < 1):
            bad("experts", "a positive int or None")
        if self.width is not None and not (_is_number(self.width) and self.width > 0):
            bad("width", "a positive number or None")
        if self.dropout is not None and not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            bad("dropout", "in [0, 1) or None")
        if not isinstance(self.model_kwargs, dict):
            bad("model_kwargs", "a dict")
        check_model_kwargs(self.model_kwargs, FLAG_MODEL_KWARGS)
        if not isinstance(self.dataset, str) or not self.dataset:
            bad("dataset", "a dataset name or a folder (str)")
        for name in ("data_dir", "init", "out", "resume"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                bad(name, "a path (str) or None")
        if self.train_size is not None and not (
            (_is_int(self.train_size) and self.train_size >= 1)
            or (isinstance(self.train_size, (float, np.floating)) and 0 < self.train_size <= 1)
        ):
            bad("train_size", "a positive int (images), a fraction in (0, 1] or None")
        if self.image_size is not None and not (_is_int(self.image_size) and self.image_size >= 8):
            bad("image_size", "an int >= 8 or None")
        for name in ("epochs", "batch_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an int >= 1")
        if self.workers is not None and not (_is_int(self.workers) and self.workers >= 0):
            bad("workers", "an int >= 0 or None")
        if not isinstance(self.skip_bad_images, bool):
            bad("skip_bad_images", "a bool")
        seed_value(self.seed, "seed")
        for name in ("checkpoint_every", "checkpoint_epochs", "eval_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an int >= 0")
        for name in ("keep_checkpoints", "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an int >= 1")
        if self.global_batch_size is not None and not (_is_int(self.global_batch_size) and self.global_batch_size >= 1):
            bad("global_batch_size", "an int >= 1 or None")
        if self.recipe is not None and not isinstance(self.recipe, str):
            bad("recipe", "a recipe name or None")
        validate_knobs(self.to_dict())  # optimizer, schedules, weight average, augmentation
        if not (_is_number(self.lr) and self.lr > 0):
            bad("lr", "a positive number")
        for name in ("momentum", "weight_decay", "warmup_epochs", "min_lr", "mixup"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "a number >= 0")
        self._check_relations()
        if not (_is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            bad("label_smoothing", "in [0, 1)")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            bad("grad_clip", "a positive number or None")
        if not (_is_number(self.temperature_start) and self.temperature_start > 0):
            bad("temperature_start", "a positive number")
        if not (_is_number(self.temperature_end) and self.temperature_end >= 0):  # KernelWarehouse ends at 0
            bad("temperature_end", "a number >= 0")
        if self.temperature_epochs is not None and not (
            _is_number(self.temperature_epochs) and self.temperature_epochs >= 0
        ):
            bad("temperature_epochs", "a number >= 0 or None")
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            bad("amp", "'auto', 'none', 'bf16' or 'fp16'")
        if not isinstance(self.device, str):
            bad("device", "'auto', 'cpu' or 'cuda[:N]'")

    def _check_relations(self) -> None:
        """Ranges that depend on other options (after each option's own check)."""
        if not self.momentum < 1:
            raise OptionError("momentum", f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.min_lr > self.lr:
            raise OptionError("min_lr", f"min_lr ({self.min_lr!r}) must not exceed lr ({self.lr!r}): the decay would "
                              "raise the learning rate", mentions=("lr",))
        if self.warmup_epochs > self.epochs:
            raise OptionError("warmup_epochs", f"warmup_epochs ({self.warmup_epochs!r}) must not exceed epochs "
                              f"({self.epochs!r}): the run would end before its warm-up", mentions=("epochs",))
        milestones = list(self.lr_milestones)
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise OptionError("lr_milestones", f"lr_milestones must be strictly increasing epochs, got {milestones}")



#: ``create_model`` arguments that an option sets (``model_kwargs`` must not set them behind its back) -> the option.
FLAG_MODEL_KWARGS = {"width_mult": "width", "num_experts": "experts", "conv": "conv", "dropout": "dropout"}
#: ``create_model`` arguments the dataset sets: ``model_kwargs`` may repeat them only with the dataset's values.
DATASET_MODEL_KWARGS = ("num_classes", "in_chans")


def check_model_kwargs(model_kwargs: Mapping[str, Any], owners: Mapping[str, str]) -> None:
    """Refuse a ``model_kwargs`` key that an option sets (``owners``: key -> option), naming the option to use.

    Raises:
        OptionError: the first such key (the command line writes both names as flags).
    """
    for key in model_kwargs:
        if key in owners:
            option = owners[key]
            what = f"{key!r}, which {option} sets" if key != option else f"{option}, which has its own option"
            raise OptionError("model_kwargs", f"model_kwargs must not set {what} (the run would be recorded with "
                              f"the option's value, not the one used): use {option} instead", mentions=(option,))


def check_dataset_kwargs(model_kwargs: Mapping[str, Any], num_classes: int, in_chans: int, dataset: str) -> None:
    """``num_classes``/``in_chans`` given in ``model_kwargs`` must be the dataset's.

    Raises:
        OptionError: a value that differs (naming the key, the value and the dataset's).
    """
    for key, wanted in zip(DATASET_MODEL_KWARGS, (num_classes, in_chans)):
        if key in model_kwargs and model_kwargs[key] != wanted:
            raise OptionError("model_kwargs", f"model_kwargs {key}={model_kwargs[key]!r} does not match the dataset "
                              f"{dataset}, which has {wanted}: leave {key} out (the dataset sets it)")


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


def model_args(config: TrainConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    """The ``create_model`` keyword arguments of a training configuration for a dataset's classes and channels."""
    kwargs: dict[str, Any] = {"num_classes": int(num_classes), "in_chans": int(in_chans)}
    if config.conv != "kernelwarehouse":
        kwargs["conv"] = config.conv
    if config.width is not None:
        kwargs["width_mult"] = float(config.width)
    if config.dropout is not None:
        kwargs["dropout"] = float(config.dropout)
    if config.experts is not None and config.conv not in ("static", "kernelwarehouse"):
        kwargs["num_experts"] = int(config.experts)
    kwargs.update(config.model_kwargs)
    return kwargs
