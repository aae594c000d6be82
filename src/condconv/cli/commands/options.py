"""Command-line options shared by several subcommands: the training options (every field of
``TrainConfig`` as a flag) and the checkpoint + data options of ``eval`` and ``routing``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from condconv.training.config import MODEL_CONV_KINDS, TrainConfig, load_config_file
from condconv.training.optim import OPTIMIZERS
from condconv.utils.checks import OptionError, flag, parse_kwargs
from condconv.utils.fileio import check_writable
from condconv.utils.runtime import AMP_CHOICES

__all__ = ["add_checkpoint_data_arguments", "add_force_argument", "add_training_options", "config_from_args", "flag",
           "new_output", "non_negative_float", "non_negative_int", "none_or", "positive_int"]


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    return _int_at_least(text, 1, "a positive int")


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0."""
    return _int_at_least(text, 0, "an int >= 0")


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: overwrite existing output files."""
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def new_output(path: str | os.PathLike, force: bool, *, folder: bool = False) -> Path:
    """Check, before any work, that ``path`` can be written and does not exist yet (unless ``force``).

    Raises:
        FileExistsError: ``path`` exists and ``force`` is off (the message says to pass ``--force``).
        OutputError: it cannot be written.
    """
    path = Path(path)
    if path.exists() and not force and (not folder or (path.is_dir() and any(path.iterdir()))):
        raise FileExistsError(f"{path} already exists: pass --force to overwrite it, or choose another path")
    return check_writable(path, folder=folder)


def _int_or_float(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def none_or(cast):
    """An argparse type: ``'none'``/``'null'``/empty -> ``None``, anything else ``cast(text)``."""

    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else cast(text)

    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


class _Adder:
    """Adds TrainConfig options to argument groups, with suppressed defaults (only given flags appear in the
    namespace) and the default shown in the help."""

    def __init__(self, parser: argparse.ArgumentParser, include: Iterable[str] | None, defaults: Mapping[str, Any]):
        self.parser, self.defaults = parser, defaults
        self.keep = set(include) if include is not None else None
        self.group = parser

    def section(self, title: str) -> _Adder:
        self.group = self.parser.add_argument_group(title)
        return self

    def __call__(self, name: str, *flags: str, **kw: Any) -> None:
        if self.keep is not None and name not in self.keep:
            return
        kw.setdefault("dest", name)
        kw["default"] = argparse.SUPPRESS
        if "help" in kw and "%(default)" not in kw["help"]:
            kw["help"] += f" (default: {self.defaults.get(name)})"
        self.group.add_argument(*flags, **kw)


def _model_and_data(add: _Adder) -> None:
    add.section("model")
    add("model", "--model", "-m", help="registered model name")
    add("conv", "--conv", choices=MODEL_CONV_KINDS,
        help="convolution kind of the dynamic layers ('kernelwarehouse' for the kw_* presets)")
    add("experts", "--experts", "-e", type=none_or(int), help="experts per dynamic layer")
    add("width", "--width", "-w", type=none_or(float), help="width multiplier")
    add("dropout", "--dropout", type=none_or(float), help="dropout before the classifier (None: model default)")
    add("model_kwargs", "--model-kwargs", nargs="*", metavar="KEY=VALUE", help="more create_model kwargs (YAML values)")
    add("init", "--init", metavar="CHECKPOINT", help="fine-tune: start from a train/convert checkpoint's model and "
        "weights")
    add.section("data")
    add("dataset", "--dataset", "-d", help="digits | cifar10 | cifar100 | imagefolder | PATH")
    add("data_dir", "--data-dir", help="CIFAR folder or ImageFolder root")
    add("train_size", "--train-size", type=none_or(_int_or_float), help="training images (int) or fraction (float)")
    add("image_size", "--image-size", type=none_or(int), help="ImageFolder crop size")
    add("workers", "--workers", type=none_or(int), help="DataLoader workers (ImageFolder; None: min(4, CPUs))")
    add("skip_bad_images", "--skip-bad-images", action=argparse.BooleanOptionalAction,
        help="leave out unreadable image files instead of stopping before training")
    add("augment", "--augment", choices=("none", "autoaugment", "randaugment"),
        help="augmentation policy on the training crops")
    add("randaug_layers", "--randaug-layers", type=int, help="RandAugment: operations per image")
    add("randaug_magnitude", "--randaug-magnitude", type=float, help="RandAugment: magnitude (0-10 scale)")


def _optimisation(add: _Adder) -> None:
    add.section("optimisation")
    add("epochs", "--epochs", type=int, help="epochs")
    add("batch_size", "--batch-size", "-b", type=int, help="batch size per process")
    add("global_batch_size", "--global-batch-size", type=none_or(int),
        help="batch over all processes (sets --batch-size to it divided by the processes)")
    add("optimizer", "--optimizer", choices=OPTIMIZERS, help="optimizer (rmsprop_tf: RMSProp as TensorFlow)")
    add("lr", "--lr", type=float, help="peak learning rate")
    add("lr_reference_batch", "--lr-reference-batch", type=none_or(int),
        help="global batch --lr is meant for; scaled linearly to the real one")
    add("momentum", "--momentum", type=float, help="momentum (SGD, RMSProp)")
    add("nesterov", "--nesterov", action=argparse.BooleanOptionalAction, help="SGD: Nesterov momentum")
    add("rmsprop_decay", "--rmsprop-decay", type=float, help="RMSProp mean-square decay")
    add("rmsprop_eps", "--rmsprop-eps", type=float, help="RMSProp epsilon (inside the square root)")
    add("weight_decay", "--weight-decay", "--wd", type=float, help="weight decay")
    add("weight_decay_exclude", "--weight-decay-exclude", choices=("norm_and_bias", "norm", "none"),
        help="parameters without weight decay")
    add("lr_schedule", "--lr-schedule", choices=("cosine", "step", "exponential", "constant"),
        help="learning-rate schedule after the warm-up, per step")
    add("warmup_epochs", "--warmup-epochs", type=float, help="linear warm-up epochs")
    add("min_lr", "--min-lr", type=float, help="final learning rate of the cosine")
    add("lr_milestones", "--lr-milestones", type=float, nargs="+", help="epochs of the step schedule's decays")
    add("lr_gamma", "--lr-gamma", type=none_or(float), help="factor per decay (None: 0.1 step, 0.97 exponential)")
    add("lr_decay_epochs", "--lr-decay-epochs", type=float, help="epochs between exponential decays")
    add("lr_staircase", "--lr-staircase", action=argparse.BooleanOptionalAction,
        help="exponential decay in whole steps (TensorFlow's staircase)")
    add("ema_decay", "--ema-decay", type=float, help="moving average of the weights, evaluated and saved (0 = off)")
    add("ema_warmup", "--ema-warmup", action=argparse.BooleanOptionalAction,
        help="EMA decay capped by (1 + k) / (10 + k) at update k, as TensorFlow's")
    add("label_smoothing", "--label-smoothing", type=float, help="label smoothing")
    add("mixup", "--mixup", type=float, help="mixup alpha (0 = off)")
    add("grad_clip", "--grad-clip", type=none_or(float), help="clip gradient norm")
    add("freeze_bn", "--freeze-bn", action=argparse.BooleanOptionalAction, help="BatchNorm uses running stats")
    add("sync_bn", "--sync-bn", action=argparse.BooleanOptionalAction, help="SyncBatchNorm under DDP (CUDA)")
    add.section("dynamic convolutions")
    add("temperature_start", "--temperature-start", type=float, help="initial router temperature")
    add("temperature_end", "--temperature-end", type=float, help="final router temperature")
    add("temperature_epochs", "--temperature-epochs", type=none_or(float),
        help="anneal epochs (None: 10%% for dynamic/odconv)")


def _runtime_and_output(add: _Adder) -> None:
    add.section("runtime")
    add("device", "--device", help="auto | cpu | cuda | cuda:N")
    add("amp", "--amp", choices=AMP_CHOICES, help="mixed precision")
    add("channels_last", "--channels-last", action=argparse.BooleanOptionalAction,
        help="channels_last memory format (None: on CUDA)")
    add("seed", "--seed", type=int, help="random seed")
    add("deterministic", "--deterministic", action=argparse.BooleanOptionalAction, help="deterministic algorithms")
    add.section("output")
    add("out", "--out", "-o", help="run folder")
    add("resume", "--resume", nargs="?", const="auto", metavar="RUN_DIR",
        help="continue the latest checkpoint of RUN_DIR (or of --out)")
    add("checkpoint_every", "--checkpoint-every", type=int, help="also checkpoint every N steps (0 = epoch ends only)")
    add("checkpoint_epochs", "--checkpoint-epochs", type=int, help="checkpoint every N epochs")
    add("keep_checkpoints", "--keep-checkpoints", type=int, help="checkpoints kept")
    add("eval_every", "--eval-every", type=int, help="evaluate every N epochs (0 = at the end)")
    add("log_every", "--log-every", type=int, help="log every N steps")
    add("progress", "--progress", action=argparse.BooleanOptionalAction, help="progress bar")


def add_training_options(parser: argparse.ArgumentParser, *, include: Iterable[str] | None = None,
                         defaults: Mapping[str, Any] | None = None) -> None:
    """Add the ``TrainConfig`` options to ``parser`` (only given flags reach the namespace).

    Args:
        parser: the parser.
        include: option names to add (default: all).
        defaults: defaults shown in the help (default: :class:`~condconv.training.config.TrainConfig`'s).
    """
    shown = TrainConfig().to_dict()
    shown.update(defaults or {})
    add = _Adder(parser, include, shown)
    _model_and_data(add)
    _optimisation(add)
    _runtime_and_output(add)


# what a run folder's config.yaml records besides the options (derived from the data and the model, or per call)
_RUN_RECORD = ("model_args", "params", "train_images", "num_classes", "in_chans", "classes", "mean", "std",
               "dataset_name", "segments", "convert", "out", "resume")


def _file_options(cfg_file: str, names: set[str]) -> dict[str, Any]:
    """The options of a YAML file (keys with '-' or '_'); a run folder's ``config.yaml`` gives the run's options."""
    file_values = load_config_file(cfg_file)
    if "model_args" in file_values:  # a run's config.yaml: its options, without what the run derived from them
        file_values = {k: v for k, v in file_values.items() if k not in _RUN_RECORD}
    for k in file_values:
        if str(k).replace("-", "_") not in names:
            raise ValueError(f"config file {cfg_file}: unknown option {k!r}")
    return {str(k).replace("-", "_"): v for k, v in file_values.items()}


def config_from_args(args: argparse.Namespace, *, base: Mapping[str, Any] | None = None
                     ) -> tuple[TrainConfig, list[str]]:
    """TrainConfig from defaults <- ``base`` <- ``--config`` file <- given flags; also the explicitly given names.

    Raises:
        OptionError: an invalid flag value, named by its flag (``--lr must be a positive number, got -1.0``).
        ValueError: an invalid value in the ``--config`` file (named by the file and its key).
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = dict(base or {})
    explicit: list[str] = list(values)
    cfg_file = getattr(args, "config", None)
    if cfg_file:
        file_values = _file_options(cfg_file, names)
        values.update(file_values)
        explicit += list(file_values)
    given = {k: v for k, v in vars(args).items() if k in names}
    if "model_kwargs" in given:
        given["model_kwargs"] = {**values.get("model_kwargs", {}), **parse_kwargs(given["model_kwargs"])}
    values.update(given)
    explicit += list(given)
    try:
        cfg = TrainConfig.from_dict(values, source=str(cfg_file or "options"))
    except OptionError as exc:
        if cfg_file and exc.option not in given:
            raise ValueError(f"config file {cfg_file}: {exc}") from None
        raise OptionError(exc.option, exc.with_flags()) from None
    except TypeError as exc:
        raise ValueError(f"{cfg_file or 'options'}: {exc}") from exc
    return cfg, sorted(set(explicit))


def add_checkpoint_data_arguments(parser: argparse.ArgumentParser, *, optional_checkpoint: bool = False) -> None:
    """The options ``condconv eval`` and ``condconv routing`` share: a checkpoint, the data to run it on, device
    (``optional_checkpoint``: the command can take a model another way, ``condconv eval --model --pretrained``)."""
    parser.add_argument("checkpoint", nargs="?" if optional_checkpoint else None,
                        help="run folder, checkpoint folder or model.safetensors")
    parser.add_argument("--dataset", "--data", "-d", default=None, help="dataset (default: the checkpoint's)")
    parser.add_argument("--data-dir", default=None, help="CIFAR folder or ImageFolder root (default: the checkpoint's)")
    parser.add_argument("--split", default="test", help="train | test (default: test)")
    parser.add_argument("--batch-size", "-b", type=positive_int, default=256, help="batch size (default: 256)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument("--workers", type=none_or(non_negative_int), default=None,
                        help="DataLoader workers (ImageFolder; default: min(4, CPUs))")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
