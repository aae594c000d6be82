"""Training: :func:`train_model`, the plain PyTorch loop behind ``condconv train``.

CondConv: Conditionally Parameterized Convolutions for Efficient Inference (Yang et al., NeurIPS 2019,
arXiv:1904.04971); DynamicConv (Chen et al., CVPR 2020, arXiv:1912.03458) and ODConv (Li, Zhou, Yao, ICLR 2022,
arXiv:2209.07947) anneal their softmax temperature 30 -> 1 over the first iterations, which this loop does.

SGD (Nesterov) or AdamW, linear warm-up then cosine decay per step, label smoothing, dropout, optional mixup, AMP
(bf16/fp16) and channels_last on CUDA, ``torchrun`` + DistributedDataParallel (gloo on CPU, nccl on CUDA), tqdm
progress, JSONL + CSV logs, YAML configs.

Nothing is lost or mislabelled:

- a run folder belongs to one process (:func:`condconv.utils.fileio.folder_lock`);
- checkpoints (:mod:`condconv.models.checkpoint`) are written atomically, and only with finite weights and optimizer
  state: a non-finite loss or weight stops the run and names the last good checkpoint;
- data order is a function of ``seed + epoch`` and augmentation of ``(seed, epoch, index)``, so ``resume`` skips
  exactly the consumed batches: on CPU a run killed with SIGKILL and resumed ends bit-identical to an
  uninterrupted one;
- a resumed run never rewrites its history: fewer epochs than already trained are refused, more extend the run
  (recorded as a new segment);
- every image file is opened before the first step, and each epoch's checkpoint is written before it is evaluated.

Example:
    >>> from condconv import TrainConfig, load_checkpoint, train_model
    >>> result = train_model(TrainConfig(epochs=1, train_size=128, out="runs/doc", progress=False))
    >>> model, config = load_checkpoint(result.checkpoint)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import condconv.models.checkpoint as ckpt
import condconv.training.budget as budget
import condconv.training.config as configuration
import condconv.training.evaluate as evaluation
import condconv.utils.runtime as runtime
from condconv.data import ArrayImageDataset, EpochLoader, ImageDataset, build_dataset
from condconv.data.augment import build_augment
from condconv.nn.routing import TemperatureSchedule, set_temperature
from condconv.training.ema import ModelEma
from condconv.training.optim import build_optimizer, build_scheduler
from condconv.training.runlog import RunLogs, config_drift, describe_drift, recorded_config, write_if_changed
from condconv.utils.checks import OptionError
from condconv.utils.fileio import check_writable, folder_lock

__all__ = ["NonFiniteLossError", "TrainProgress", "TrainResult", "train_model"]

logger = logging.getLogger(__name__)

#: The files ``train_model`` writes in a run folder (besides ``checkpoints/``).
RUN_FILES = ("config.yaml", "log.jsonl", "log.csv", "model.safetensors")


class NonFiniteLossError(RuntimeError):
    """The loss, the weights or the optimizer state became NaN or infinite; the run stopped and the last good
    checkpoint is kept."""


@dataclass
class TrainResult:
    """What :func:`train_model` returns.

    Attributes:
        run_dir: run folder.
        checkpoint: final weights (``run_dir/model.safetensors``; loadable with :func:`condconv.load_checkpoint`).
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


@dataclass(frozen=True)
class TrainProgress:
    """Where a run stands, given to ``train_model(on_step=...)`` after every optimizer step (and its checkpoint).

    Attributes:
        epoch: current epoch (0-based). epochs: epochs in the run. step_in_epoch: steps done in this epoch (1-based
        after the step). steps_per_epoch: steps per epoch. global_step: steps done in the run.
    """

    epoch: int
    epochs: int
    step_in_epoch: int
    steps_per_epoch: int
    global_step: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


# ----------------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------------
def train_model(
    config: configuration.TrainConfig | Mapping[str, Any] | None = None,
    *,
    explicit: Iterable[str] | None = None,
    on_step: Callable[[TrainProgress], None] | None = None,
    accept_config_change: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Train a model; see :class:`~condconv.training.config.TrainConfig` for every option.

    Args:
        config: a :class:`~condconv.training.config.TrainConfig` or a dict of its fields (None: all defaults).
        explicit: names of options given explicitly (on resume only these may override the checkpoint's config;
            default: every option that differs from the defaults).
        on_step: called with a :class:`TrainProgress` after every optimizer step (after that step's checkpoint, if
            one is due), e.g. to drive a progress display.
        accept_config_change: on resume, the run folder's ``config.yaml`` is compared with the configuration recorded
            in the checkpoint; a difference is an error naming the keys unless this is True and every changed key
            may change on resume (``TrainConfig.RESUME_MUTABLE``: ``epochs``, ``eval_every``...), whose edited values
            are then taken (an ``epochs`` raised in a finished run's ``config.yaml`` trains the extra epochs). Options
            given explicitly win over the file. Default False.
        **overrides: more options, e.g. ``train_model(epochs=3, experts=8)``.

    Returns:
        :class:`TrainResult`.

    Raises:
        NonFiniteLossError: the loss or the weights became NaN/inf (the last good checkpoint stays in place).
        FolderBusyError: another process is training into the same run folder.
        ValueError / FileNotFoundError: bad options, data or checkpoints (messages name the option or file).
    """
    if config is None:
        config = configuration.TrainConfig()
    if isinstance(config, Mapping):
        config = configuration.TrainConfig.from_dict(config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    config.validate()
    if explicit is None:
        defaults = configuration.TrainConfig()
        explicit = [f.name for f in dataclasses.fields(configuration.TrainConfig)
                    if getattr(config, f.name) != getattr(defaults, f.name)]
    with runtime.distributed(runtime.device_kind(config.device)) as dist_info:
        return _Trainer(config, list(explicit), dist_info, on_step, accept_config_change).run()


def _default_run_dir(config: configuration.TrainConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{config.model}-{config.conv}-{stamp}"
    n = 1
    while path.exists():  # another run started in the same second
        n += 1
        path = path.with_name(f"{config.model}-{config.conv}-{stamp}-{n}")
    return path


def _run_folder(config: configuration.TrainConfig, explicit: Iterable[str]) -> Path | None:
    """The folder a run writes to: ``out``, else the folder of ``resume`` (None: a fresh default folder)."""
    if config.resume and config.resume != "auto" and not ("out" in explicit and config.out):
        source = Path(config.resume)
        if not source.exists():  # checked before the folder is locked, which would create it
            raise FileNotFoundError(f"no checkpoint to resume: {source} does not exist")
        if (source / "state.pt").is_file():  # a checkpoint folder: run/checkpoints/step-N
            return source.parent.parent
        return source.parent if source.name == "checkpoints" and (source / "latest").is_file() else source
    if config.resume == "auto" and not config.out:
        raise OptionError("resume", "resume needs the run folder: pass it as resume or as out", mentions=("out",))
    return Path(config.out) if config.out else None


def _resume_source(config: configuration.TrainConfig) -> Path | None:
    """The checkpoint a run continues from (None: a fresh run)."""
    if not config.resume:
        return None
    if config.resume == "auto":
        ck = ckpt.latest_checkpoint(config.out)
        if ck is None:
            logger.info("no checkpoint in %s yet: starting fresh", config.out)
        return ck
    ck = ckpt.latest_checkpoint(config.resume)
    if ck is None:
        raise FileNotFoundError(f"no checkpoint to resume in {config.resume} (expected checkpoints/latest)")
    return ck


def _merge_resume_config(state: Mapping[str, Any], config: configuration.TrainConfig, explicit: Iterable[str],
                         source: Path) -> configuration.TrainConfig:
    """The checkpoint's configuration with the explicitly given options that may change on resume."""
    saved = state["config"]
    names = {f.name for f in dataclasses.fields(configuration.TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in names}
    for key in explicit:
        new = getattr(config, key)
        if key in merged and merged[key] != new and key not in configuration.TrainConfig.RESUME_MUTABLE:
            raise OptionError(key, f"{key} cannot change when a run is resumed: {source} was trained with "
                              f"{key}={merged[key]!r}, got {new!r} (to train a changed copy, start from it with init)",
                              mentions=("init",))
        merged[key] = new
    done = int(state["epoch"]) + (1 if int(state["step_in_epoch"]) > 0 else 0)
    if "epochs" in explicit and config.epochs < done:
        raise OptionError("epochs", f"epochs must be >= {done} to resume {source}: the run has already trained {done} "
                          f"of its {saved.get('epochs')} epochs (more extend the run; fewer would rewrite its history)")
    if "epochs" in explicit and saved.get("epochs") != config.epochs:
        logger.warning("resuming with epochs=%s instead of %s: the cosine schedule is recomputed for the new "
                       "length from this step on", config.epochs, saved.get("epochs"))
    merged["resume"] = config.resume
    return configuration.TrainConfig.from_dict(merged, source=str(source))


def _built_experts(model: nn.Module, configured: int | None) -> int | None:
    """The expert count of the model's dynamic layers (None: it has none); ``configured`` if they differ."""
    from condconv.nn.layers import DynamicConvBase

    counts = {m.num_experts for m in model.modules() if isinstance(m, DynamicConvBase)}
    if not counts:
        return None
    return counts.pop() if len(counts) == 1 else configured


def _check_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The name of the first non-finite parameter, buffer or optimizer-state tensor, or None."""
    for name, tensor in [*model.state_dict().items()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    for index, slot in enumerate(optimizer.state.values()):
        for key, value in slot.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"optimizer state {key} of parameter {index}"
    return None


def _nonfinite_message(what: str, epoch: int, step: int, run_dir: Path) -> str:
    last = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
    return (f"{what} at epoch {epoch + 1}, step {step}: training stopped; last good checkpoint: "
            f"{last if last is not None else 'none written yet'} (lower the learning rate, clip the gradients, or use "
            "bf16 instead of fp16 autocast)")


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
class _Trainer:
    """One training run, in named steps: open the run, data, model, optimisation, restore, epochs, finish."""

    def __init__(self, config: configuration.TrainConfig, explicit: list[str], dist_info: runtime.DistInfo,
                 on_step: Callable[[TrainProgress], None] | None, accept_config_change: bool = False) -> None:
        self.config, self.explicit, self.dist, self.on_step = config, explicit, dist_info, on_step
        self.accept_config_change = bool(accept_config_change)
        self.t_start = time.perf_counter()
        self.epoch_stats = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        self.history: list[dict[str, Any]] = []
        self.segments: list[dict[str, Any]] = []
        self.start_epoch = self.start_step = self.global_step = 0

    # ---- open the run ----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        folder = _run_folder(self.config, self.explicit)
        if folder is None:
            folder = _default_run_dir(self.config)
        fresh = not self.config.resume or (self.config.resume == "auto" and ckpt.latest_checkpoint(folder) is None)
        if fresh and not self.config.init:  # before the run folder is made (and after checking it can be)
            if self.dist.main:
                check_writable(folder, folder=True)
            self._preflight()
        self.run_dir = run_dir = Path(runtime.broadcast_object(str(folder), self.dist))
        lock = folder_lock(run_dir, "run folder") if self.dist.main else contextlib.nullcontext()
        with lock:  # the checkpoint is read under the lock: no other process prunes or replaces it meanwhile
            if self.dist.main:
                ckpt.remove_temporaries(run_dir, RUN_FILES)  # files a killed writer left half-written
                ckpt.remove_temporaries(run_dir / "checkpoints")
            resume_ck = _resume_source(self.config)
            state = weights = None
            if resume_ck is not None:
                state = ckpt.read_state(resume_ck / "state.pt")
                weights, meta = ckpt.read_weights(resume_ck / "model.safetensors")
                if str(meta.get("global_step")) != str(state.get("global_step")):
                    raise ValueError(f"mismatched checkpoint {resume_ck}: weights are from step "
                                     f"{meta.get('global_step')}, state from step {state.get('global_step')}")
                self._take_config_changes(resume_ck)
                self.config = _merge_resume_config(state, self.config, self.explicit, resume_ck)
            if (run_dir / "checkpoints" / "latest").exists() and (
                    resume_ck is None or resume_ck.parent.parent.resolve() != run_dir.resolve()):
                raise OptionError("out", f"out: run folder {run_dir} already holds a checkpoint: continue it with "
                                  "resume, or choose another folder", mentions=("resume",))
            self.config = dataclasses.replace(self.config, out=str(run_dir))
            self.device = runtime.resolve_device(self.config.device, self.dist.local_rank)
            with runtime.run_settings(self.config.seed, device=self.device, deterministic=self.config.deterministic):
                return self._train(resume_ck, state, weights)

    def _take_config_changes(self, resume_ck: Path) -> None:
        """Compare the run folder's ``config.yaml`` with the checkpoint's record: refuse a difference (naming the keys),
        or, with ``accept_config_change``, take the edited values of keys that may change on resume."""
        config_file = resume_ck.parent.parent / "config.yaml"
        drift = config_drift(config_file, recorded_config(resume_ck / "model.safetensors"))
        drift = {k: v for k, v in drift.items() if k not in self.explicit}  # given options state the intent
        if not drift:
            return
        fixed = [k for k in drift if k not in configuration.TrainConfig.RESUME_MUTABLE]
        if fixed or not self.accept_config_change:
            advice = (f"restore {', '.join(fixed[:4])} in it (they cannot change on resume; to train a changed copy, "
                      "start from the checkpoint with init)" if fixed else
                      "restore it, or pass accept_config_change to train with the edited values")
            raise OptionError("accept_config_change", f"{config_file} no longer matches the checkpoint {resume_ck}: "
                              f"{describe_drift(drift)}: {advice}", mentions=("init",))
        taken = {k: new for k, (_, new) in drift.items() if k not in self.explicit}
        if taken:
            logger.warning("taking the edited %s from %s", describe_drift({k: drift[k] for k in taken}), config_file)
            self.config = dataclasses.replace(self.config, **taken)
            self.explicit = [*self.explicit, *taken]

    def _train(self, resume_ck: Path | None, state: dict | None, weights: dict | None) -> TrainResult:
        config = self.config
        if config.global_batch_size is not None:  # a recipe's batch over all processes
            if config.global_batch_size % self.dist.world_size:
                raise OptionError("global_batch_size", f"global_batch_size={config.global_batch_size} cannot be "
                                  f"divided among {self.dist.world_size} processes")
            self.config = config = dataclasses.replace(
                config, batch_size=config.global_batch_size // self.dist.world_size)
        self.amp_dtype = runtime.amp_dtype(config.amp, self.device)
        self.channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self._build_data()
        self._build_model(weights, resume_ck)
        self._build_optimisation()
        if state is not None:
            self._restore(state, resume_ck)
        self.first_step = self.global_step
        if self.start_epoch >= config.epochs:
            logger.info("%s has already trained its %d epochs: nothing to train", self.run_dir, config.epochs)
        self._open_folder(resume_ck)
        for epoch in range(self.start_epoch, config.epochs):
            self._train_one_epoch(epoch)
            self.start_step = 0
        return self._finish()

    def _preflight(self) -> None:
        """What can be checked against the data and the model before any folder is made or weight allocated: the
        ``num_classes``/``in_chans`` of ``model_kwargs`` against the dataset, and the memory training needs."""
        config = self.config
        train_ds = self._train_dataset(config)
        configuration.check_dataset_kwargs(config.model_kwargs, train_ds.num_classes, train_ds.in_chans, train_ds.name)
        batch = config.batch_size
        if config.global_batch_size is not None:
            batch = max(config.global_batch_size // self.dist.world_size, 1)
        args = configuration.model_args(config, train_ds.num_classes, train_ds.in_chans)
        try:
            estimate = budget.estimate_training_memory(
                config.model, args, (train_ds.in_chans, train_ds.image_size, train_ds.image_size), batch,
                optimizer=config.optimizer, momentum=config.momentum, ema=config.ema_decay > 0)
        except Exception as exc:  # noqa: BLE001 - a model the meta device cannot build: the real build reports it
            logger.debug("no memory estimate for %s: %s", config.model, exc)
            return
        device = runtime.resolve_device(config.device, self.dist.local_rank)
        processes = budget.local_processes() if self.dist.enabled else 1
        budget.check_training_memory(estimate, device, processes, what=f"{config.model} ({config.conv}, "
                                     f"experts={config.experts}, width={config.width}, batch {batch})")

    def _train_dataset(self, config: configuration.TrainConfig) -> ImageDataset:
        """The training split (built once: :meth:`_preflight` and :meth:`_build_data` share it)."""
        key = (config.dataset, config.data_dir, config.train_size, config.image_size, config.seed)
        cached = self.__dict__.get("_train_ds_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        train_ds = build_dataset(config.dataset, "train", data_dir=config.data_dir, train_size=config.train_size,
                                 image_size=config.image_size, seed=config.seed)
        self._train_ds_cache = (key, train_ds)
        return train_ds

    # ---- data ------------------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        config, dist = self.config, self.dist
        train_ds = self._train_dataset(config)
        self._train_ds_cache = None
        test_ds = build_dataset(config.dataset, "test", data_dir=config.data_dir, image_size=config.image_size,
                                seed=config.seed)
        train_ds, test_ds = self._checked(train_ds, test_ds)
        # translations and cutouts are in pixels of a 224-pixel image: scaled to the images'
        train_ds.policy = build_augment(config.augment, randaug_layers=config.randaug_layers,
                                        randaug_magnitude=config.randaug_magnitude, reference_size=224)
        pin = self.device.type == "cuda"
        self.train_loader = EpochLoader(train_ds, config.batch_size, shuffle=True, seed=config.seed, drop_last=True,
                                        rank=dist.rank, world_size=dist.world_size, num_workers=config.workers,
                                        pin_memory=pin)
        eval_batch = max(config.batch_size, 256) if isinstance(test_ds, ArrayImageDataset) else 2 * config.batch_size
        self.test_loader = EpochLoader(test_ds, eval_batch, rank=dist.rank, world_size=dist.world_size,
                                       num_workers=config.workers, pin_memory=pin)
        self.train_ds, self.steps_per_epoch = train_ds, len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise OptionError("batch_size", f"batch_size={config.batch_size} x {dist.world_size} process(es) "
                              f"exceeds the {len(train_ds)} training images")

    def _checked(self, *datasets: ImageDataset) -> list[ImageDataset]:
        """``datasets`` after opening every image file once (headers only): all unreadable files in one message."""
        bad = {}
        for ds in datasets:
            check = getattr(ds, "check_files", None)
            if check is not None:
                bad[ds.split] = check(progress=self.config.progress and self.dist.main)
        found = [item for files in bad.values() for item in files]
        if not found:
            return list(datasets)
        listing = "; ".join(f"{path}: {why}" for path, why in found[:10]) + (" ..." if len(found) > 10 else "")
        counts = ", ".join(f"{len(files)} of {len(ds)} {ds.split}" for ds in datasets
                           for files in [bad.get(ds.split, [])] if files)
        if not self.config.skip_bad_images:
            raise OptionError("skip_bad_images", f"{len(found)} image file(s) cannot be read ({counts}): {listing} "
                              "(fix or remove them, or pass skip_bad_images to go on without them)")
        logger.warning("leaving out %d unreadable image file(s) (%s): %s", len(found), counts, listing)
        return [ds.without({path for path, _ in bad[ds.split]}) if bad.get(ds.split) else ds for ds in datasets]

    # ---- model -----------------------------------------------------------------------------------------------
    def _build_model(self, weights: dict | None, resume_ck: Path | None) -> None:
        config, train_ds = self.config, self.train_ds
        conversions = None
        if config.init:
            model, init_cfg = ckpt.load_checkpoint(config.init)
            args, conversions = dict(init_cfg["model_args"]), init_cfg.get("convert")
            got = (ckpt.config_classes(init_cfg), ckpt.config_in_chans(init_cfg))
            if got != (train_ds.num_classes, train_ds.in_chans):
                raise OptionError("init", f"init checkpoint {config.init} has {got[0]} classes and {got[1]} input "
                                  f"channels, {train_ds.name} has {train_ds.num_classes} and {train_ds.in_chans}")
            overridden = [k for k in ("model", "conv", "experts", "width", "dropout", "model_kwargs")
                          if k in self.explicit]
            if overridden and weights is None:
                logger.warning("init: the architecture is the checkpoint's; ignoring %s", ", ".join(overridden))
            self.config = config = dataclasses.replace(
                config, model=init_cfg["model"], conv=str(args.get("conv", "static")), experts=args.get("num_experts"),
                width=args.get("width_mult"), dropout=args.get("dropout"))
        else:
            args = configuration.model_args(config, train_ds.num_classes, train_ds.in_chans)
            model = ckpt.build_model(config.model, args)
        self.params = sum(p.numel() for p in model.parameters())
        saved = config.to_dict()
        saved.update(experts=_built_experts(model, config.experts), params=self.params)  # what the model really has
        if conversions:
            saved["convert"] = conversions
        saved.update(model_args=args, num_classes=train_ds.num_classes, in_chans=train_ds.in_chans,
                     train_images=len(train_ds),  # what train_size gave (all images when it asks for more)
                     image_size=train_ds.image_size, classes=list(train_ds.classes), mean=list(train_ds.mean),
                     std=list(train_ds.std), dataset_name=train_ds.name)
        self.saved_config = saved
        if weights is not None:
            ckpt.load_state_dict(model, weights, resume_ck / "model.safetensors")
        if config.sync_bn and self.dist.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if self.channels_last:
            runtime.to_channels_last(model)
        self.model = self.ddp_model = model
        if self.dist.enabled:
            torch.manual_seed(config.seed + 1_000_003 * self.dist.rank)  # distinct dropout masks per process
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # ---- optimisation ----------------------------------------------------------------------------------------
    def _build_optimisation(self) -> None:
        config = self.config
        self.optimizer = build_optimizer(self.model, config, world_size=self.dist.world_size)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch, world_size=self.dist.world_size)
        self.ema = ModelEma(self.model, config.ema_decay, warmup=config.ema_warmup) if config.ema_decay > 0 else None
        fp16 = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        temp_epochs = config.temperature_epochs
        if temp_epochs is None:
            temp_epochs = 0.1 * config.epochs if config.conv in ("dynamic", "odconv") else 0.0
        iterations = int(round(temp_epochs * self.steps_per_epoch))
        self.temperature = None
        if iterations > 0:
            self.temperature = TemperatureSchedule(config.temperature_start, config.temperature_end, iterations)
            if set_temperature(self.model, config.temperature_start) == 0:
                logger.warning("temperature annealing requested but %s has no router with a temperature",
                               config.model)
                self.temperature = None

    def _restore(self, state: dict[str, Any], source: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if not state.get("ema"):
                raise ValueError(f"checkpoint {source} holds no weight average, but ema_decay={self.config.ema_decay}")
            self.ema.load_state_dict(state["ema"])
        self.start_epoch, self.start_step = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        self.segments = list(state.get("segments", []))
        if state.get("world_size", 1) != self.dist.world_size:
            logger.warning("resuming a %s-process run with %s processes: data order and random streams differ",
                           state.get("world_size"), self.dist.world_size)
        per_rank = list(state["per_rank"])
        mine = per_rank[self.dist.rank] if self.dist.rank < len(per_rank) else per_rank[0]
        self.epoch_stats = dict(mine["epoch_stats"])
        runtime.set_rng_state(mine["rng"])
        logger.info("resumed %s at epoch %d, step %d (global step %d)", source, self.start_epoch + 1,
                    self.start_step, self.global_step)

    def _open_folder(self, resume_ck: Path | None) -> None:
        """Logs, segments and ``config.yaml`` of the run folder (written by rank 0, and only where they change)."""
        if not self.segments or self.segments[-1]["epochs"] != self.config.epochs:
            self.segments.append({"epochs": self.config.epochs, "from_step": self.global_step,
                                  "started": _dt.datetime.now().isoformat(timespec="seconds")})
        self.saved_config["segments"] = self.segments
        forked = resume_ck is not None and resume_ck.parent.parent.resolve() != self.run_dir.resolve()
        self.saved_config["resume"] = str(resume_ck) if forked else None  # the run continues itself: no record
        self.logs = RunLogs(self.run_dir, self.dist.main)
        if self.dist.main:
            import yaml

            self.logs.truncate(self.global_step)  # records written after the checkpoint (or before the first one)
            write_if_changed(self.run_dir / "config.yaml", yaml.safe_dump(self.saved_config, sort_keys=False))
            logger.info("%s | %s params | %s", self.train_ds.describe(), f"{self.params:,}", self.device)
        if self.history and self.history[-1].get("pending_eval"):  # stopped between an epoch's save and its eval
            logged = self.logs.epoch_record(self.history[-1]["epoch"], self.global_step) if self.dist.main else None
            logged = runtime.broadcast_object(logged, self.dist)
            if logged is not None and "eval" in logged:  # it was evaluated and logged: take the record as it is
                self.history[-1] = {k: v for k, v in logged.items() if k != "pending_eval"}
            else:
                self._evaluate_epoch(self.history[-1])

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _save(self, epoch: int, step_in_epoch: int) -> None:
        """Checkpoint after ``global_step`` (every process contributes its RNG state and running sums)."""
        bad = _check_finite(self.model, self.optimizer)
        if bad is not None:
            raise NonFiniteLossError(_nonfinite_message(f"non-finite values in {bad}", epoch, self.global_step,
                                                        self.run_dir))
        mine = {"rng": runtime.get_rng_state(), "epoch_stats": dict(self.epoch_stats)}
        per_rank = runtime.all_gather_object(mine, self.dist)
        if not self.dist.main:
            return
        state = {
            "format": ckpt.CHECKPOINT_FORMAT, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "global_step": self.global_step, "world_size": self.dist.world_size,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state_dict() if self.ema is not None else None, "per_rank": per_rank,
            "config": self.config.to_dict(), "history": self.history, "segments": self.segments,
        }  # fmt: skip
        ckpt.write_checkpoint(self.run_dir, self.model, state, self.saved_config, self.config.keep_checkpoints)

    # ---- epochs ----------------------------------------------------------------------------------------------
    def _train_one_epoch(self, epoch: int) -> None:
        from tqdm import tqdm

        config = self.config
        self.train_loader.set_epoch(epoch)
        self.ddp_model.train()
        if config.freeze_bn:
            for m in self.ddp_model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        first = self.start_step if epoch == self.start_epoch else 0
        if epoch != self.start_epoch:
            self.epoch_stats = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}",
                   leave=False, disable=not (config.progress and self.dist.main), dynamic_ncols=True)
        t_epoch, images = time.perf_counter(), 0
        pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        check_every = 1 if self.device.type != "cuda" else config.log_every
        step_in_epoch = first
        for x, y in self.train_loader.iterate(first):
            loss, correct = self._step(x, y, epoch, step_in_epoch)
            step_in_epoch += 1
            images += x.shape[0]
            pending.append((loss, correct, x.shape[0]))
            bar.update(1)
            must_save = (config.checkpoint_every > 0 and self.global_step % config.checkpoint_every == 0
                         and step_in_epoch < self.steps_per_epoch)
            if len(pending) >= check_every or must_save or step_in_epoch == self.steps_per_epoch:
                self._flush(pending, epoch)  # raises on a non-finite loss
                self._log_step(epoch, bar, images, t_epoch)
            if must_save:
                self._save(epoch, step_in_epoch)
            if self.on_step is not None:
                self.on_step(TrainProgress(epoch, config.epochs, step_in_epoch, self.steps_per_epoch,
                                           self.global_step))
        bar.close()
        self._end_epoch(epoch, time.perf_counter() - t_epoch, images)

    def _step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step_in_epoch: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the (still on-device) loss and number of correct predictions."""
        config = self.config
        if self.temperature is not None:
            set_temperature(self.model, self.temperature.value(self.global_step))
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y_b, lam = None, 1.0
        if config.mixup > 0:
            rng = np.random.default_rng([config.seed, epoch, step_in_epoch, self.dist.rank])
            lam = float(rng.beta(config.mixup, config.mixup))
            perm = torch.from_numpy(rng.permutation(x.shape[0])).to(self.device)
            x = lam * x + (1.0 - lam) * x[perm]
            y_b = y[perm]
        with runtime.autocast(self.device, self.amp_dtype):
            logits = self.ddp_model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        if y_b is not None:
            loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, y_b, label_smoothing=config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.global_step += 1
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def _flush(self, pending: list, epoch: int) -> None:
        """Move the pending losses to the host, stopping on a non-finite one."""
        if not pending:
            return
        values = torch.stack([torch.stack([p[0].float(), p[1].float()]) for p in pending]).cpu().tolist()
        first = self.global_step - len(pending) + 1  # the global step of pending[0]
        for index, ((loss, correct), (_, _, n)) in enumerate(zip(values, pending)):
            if not math.isfinite(loss):
                raise NonFiniteLossError(_nonfinite_message(f"non-finite loss ({loss})", epoch, first + index,
                                                            self.run_dir))
            self.epoch_stats["loss_sum"] += loss * n
            self.epoch_stats["correct"] += correct
            self.epoch_stats["count"] += n
        pending.clear()

    def _temperature_now(self) -> float | None:
        return self.temperature.value(self.global_step - 1) if self.temperature else None

    def _log_step(self, epoch: int, bar, images: int, t_epoch: float) -> None:
        if not self.dist.main:
            return
        stats = self.epoch_stats
        elapsed = max(time.perf_counter() - t_epoch, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        loss = stats["loss_sum"] / max(stats["count"], 1)
        acc = 100.0 * stats["correct"] / max(stats["count"], 1)
        img_s = images * self.dist.world_size / elapsed
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}", refresh=False)
        if self.global_step % self.config.log_every == 0:
            self.logs.write({"type": "step", "epoch": epoch + 1, "step": self.global_step, "loss": loss,
                             "train_acc": acc, "lr": lr, "temperature": self._temperature_now(),
                             "images_per_s": img_s})

    def _end_epoch(self, epoch: int, seconds: float, images: int) -> None:
        """Epoch record, checkpoint (before the evaluation, so a bad test set costs no training), evaluation."""
        config = self.config
        stats = self.epoch_stats
        totals = runtime.all_reduce_sum(torch.tensor([stats["loss_sum"], stats["correct"], stats["count"]],
                                                     dtype=torch.float64, device=self.device), self.dist).tolist()
        record: dict[str, Any] = {
            "type": "epoch", "epoch": epoch + 1, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
            "temperature": self._temperature_now(), "train_loss": totals[0] / max(totals[2], 1),
            "train_acc": 100.0 * totals[1] / max(totals[2], 1), "epoch_seconds": seconds,
            "train_images_per_s": images * self.dist.world_size / max(seconds, 1e-9),
        }  # fmt: skip
        is_last = epoch + 1 == config.epochs
        if (config.eval_every and (epoch + 1) % config.eval_every == 0) or is_last:
            record["pending_eval"] = True
        self.history.append(record)
        self.epoch_stats = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        if is_last or (config.checkpoint_epochs and (epoch + 1) % config.checkpoint_epochs == 0):
            self._save(epoch + 1, 0)
        if record.get("pending_eval"):
            self._evaluate_epoch(record)
        else:
            self.logs.write(record)
            self._log_epoch(record)

    def _evaluate(self) -> dict[str, Any]:
        """Test metrics of the model, or of its weight average when there is one (the raw weights' under ``raw``)."""
        def run() -> dict[str, Any]:
            return evaluation.evaluate(self.model, self.test_loader, device=self.device, amp_dtype=self.amp_dtype,
                                       channels_last=self.channels_last, dist_info=self.dist)

        ev = run()
        if self.ema is None:
            return ev
        with self.ema.applied(self.model):
            averaged = run()
        averaged["raw"] = {k: ev[k] for k in ("loss", "top1", "top5")}
        return averaged

    def _evaluate_epoch(self, record: dict[str, Any]) -> None:
        ev = self._evaluate()
        record.pop("pending_eval", None)
        record.update(test_loss=ev["loss"], test_top1=ev["top1"], test_top5=ev["top5"],
                      eval={k: ev[k] for k in ("loss", "top1", "top5", "images")})
        if "raw" in ev:  # test_* are the weight average's
            record["eval_raw"] = ev["raw"]
        self.logs.write(record)
        self._log_epoch(record)

    def _log_epoch(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        msg = (f"epoch {record['epoch']}/{self.config.epochs}: loss {record['train_loss']:.4f} "
               f"acc {record['train_acc']:.2f}%")
        if "test_top1" in record:
            msg += (f" | test loss {record['test_loss']:.4f} top-1 {record['test_top1']:.2f}% "
                    f"top-5 {record['test_top5']:.2f}%")
        logger.info(msg + f" | {record['epoch_seconds']:.1f}s")

    # ---- the end ---------------------------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        final = self.run_dir / "model.safetensors"
        unchanged = self.global_step == self.first_step and ckpt.weights_step(final) == self.global_step
        if self.dist.main and not unchanged:  # a finished run resumed again trains and writes nothing
            # the final weights are what was evaluated: the weight average when there is one
            with self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext():
                ckpt.save_weights(self.model, final, self.saved_config, global_step=self.global_step)
        last = self.history[-1].get("eval") if self.history else None
        if last is None:
            ev = self._evaluate()
            last = {k: ev[k] for k in ("loss", "top1", "top5", "images")}
        return TrainResult(
            run_dir=self.run_dir, checkpoint=final, config=self.saved_config, history=self.history,
            top1=float(last["top1"]), top5=float(last["top5"]), loss=float(last["loss"]), params=self.params,
            steps=self.global_step, seconds=time.perf_counter() - self.t_start,
        )  # fmt: skip
