"""Evaluation: accuracy, loss and throughput of a model on a dataset, and of a checkpoint on its (or another) dataset.

``condconv eval`` and ``condconv routing`` both run a checkpoint on data: :func:`dataset_for_checkpoint` builds
that data and checks that it fits the checkpoint (classes, image channels).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from condconv.data import EpochLoader, ImageDataset, build_dataset
from condconv.models.checkpoint import config_classes, config_in_chans, load_checkpoint, resolve_weights_path
from condconv.training.runlog import config_drift, describe_drift, recorded_config
from condconv.utils.checks import OptionError
from condconv.utils.runtime import DistInfo, all_reduce_sum, amp_dtype, autocast, resolve_device

logger = logging.getLogger(__name__)

__all__ = ["check_run_config", "dataset_for_checkpoint", "evaluate", "evaluate_checkpoint", "evaluate_pretrained"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: EpochLoader,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    dist_info: DistInfo | None = None,
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
        dist_info: the process group (several processes evaluate their shards; the sums are all-reduced).

    Returns:
        dict with ``top1``, ``top5``, ``loss``, ``images``, ``per_class_accuracy`` (list, percent; NaN for classes
        without images), ``per_class_count``, ``seconds`` (model time) and ``images_per_s``.
    """
    from tqdm import tqdm

    dist_info = dist_info or DistInfo()
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
        with autocast(device, amp_dtype):
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
    packed = all_reduce_sum(packed, dist_info).cpu()
    loss_sum, top1, top5 = packed[0].item(), packed[1].item(), packed[2].item()
    correct_pc, count_pc = packed[3 : 3 + num_classes], packed[3 + num_classes :]
    n = int(count_pc.sum().item())
    times = torch.tensor([model_time], dtype=torch.float64)
    if dist_info.enabled:
        times = all_reduce_sum(times.to(device), dist_info).cpu() / dist_info.world_size
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


def dataset_for_checkpoint(checkpoint: str | os.PathLike, config: Mapping[str, Any], *, dataset: str | None = None,
                           data_dir: str | None = None, split: str = "test", image_size: int | None = None
                           ) -> ImageDataset:
    """The evaluation data for a checkpoint: its own dataset unless ``dataset`` is given, checked to fit the model.

    Raises:
        ValueError: the dataset's classes or image channels differ from the checkpoint's (the message names both).
    """
    name = dataset or config.get("dataset", "digits")
    folder = data_dir if data_dir is not None else config.get("data_dir")
    preprocess = None
    if isinstance(config.get("preprocess"), dict) and image_size is None and str(name).lower() == "imagefolder":
        from condconv.models.pretrained import EvalConfig  # an imported model: evaluated as its source does

        raw = config["preprocess"]
        preprocess = EvalConfig(int(raw["image_size"]), float(raw["crop_pct"]), str(raw["interpolation"]),
                                tuple(raw["mean"]), tuple(raw["std"]))
    ds = build_dataset(name, split, data_dir=folder, image_size=image_size or config.get("image_size"), augment=False,
                       preprocess=preprocess)
    if ds.num_classes != config_classes(config):
        raise ValueError(f"checkpoint {checkpoint} predicts {config_classes(config)} classes but {name} has "
                         f"{ds.num_classes}")
    if ds.in_chans != config_in_chans(config):
        raise ValueError(f"checkpoint {checkpoint} takes {config_in_chans(config)}-channel images but {name} has "
                         f"{ds.in_chans}")
    return ds


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 256,
    device: str = "auto",
    amp: str = "none",
    workers: int = 0,
    image_size: int | None = None,
    progress: bool = False,
    accept_config_change: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint (see :func:`condconv.load_checkpoint`) on a dataset (default: the one it was trained on).

    The final weights of a run folder are first compared with its ``config.yaml`` (:func:`check_run_config`).

    Returns:
        :func:`evaluate`'s dict plus ``checkpoint``, ``model``, ``dataset``, ``split`` and ``classes``.
    """
    check_run_config(checkpoint, accept_config_change)
    model, config = load_checkpoint(checkpoint)
    ds = dataset_for_checkpoint(checkpoint, config, dataset=dataset, data_dir=data_dir, split=split,
                                image_size=image_size)
    dev = resolve_device(device)
    model.to(dev)
    loader = EpochLoader(ds, batch_size, num_workers=workers, pin_memory=dev.type == "cuda")
    result = evaluate(model, loader, device=dev, amp_dtype=amp_dtype(amp, dev), progress=progress)
    result.update(checkpoint=str(checkpoint), model=config["model"], dataset=ds.name, split=ds.split,
                  classes=list(ds.classes))
    return result


def check_run_config(checkpoint: str | os.PathLike, accept_config_change: bool = False) -> None:
    """Refuse weights whose run folder's ``config.yaml`` no longer says what they were trained with.

    Only weights with a ``config.yaml`` beside them (a run folder's final ``model.safetensors``) are compared; the
    weights are always evaluated as they were trained, whatever the file says.

    Args:
        checkpoint: what :func:`condconv.load_checkpoint` takes.
        accept_config_change: go on (with a warning) when only keys that may change on resume differ
            (``TrainConfig.RESUME_MUTABLE``: epochs, eval_every, ...). Default False.

    Raises:
        OptionError: the keys that differ, with their recorded and edited values.
    """
    from condconv.training.config import TrainConfig

    weights = resolve_weights_path(checkpoint)
    config_file = Path(weights).parent / "config.yaml"
    drift = config_drift(config_file, recorded_config(weights))
    if not drift:
        return
    fixed = [k for k in drift if k not in TrainConfig.RESUME_MUTABLE]
    if fixed or not accept_config_change:
        advice = (f"restore {', '.join(fixed[:4])} in it: the weights were trained with the recorded values" if fixed
                  else "restore it, or pass accept_config_change to evaluate the weights as they were trained")
        raise OptionError("accept_config_change", f"{config_file} no longer matches the weights {weights}: "
                          f"{describe_drift(drift)}: {advice}")
    logger.warning("%s was edited (%s): evaluating %s as it was trained", config_file, describe_drift(drift), weights)


def evaluate_pretrained(
    model_name: str,
    pretrained: str | os.PathLike,
    *,
    data_dir: str | os.PathLike,
    dataset: str = "imagefolder",
    split: str = "test",
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    device: str = "auto",
    amp: str = "none",
    workers: int | None = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a published checkpoint as its source does: ``create_model(model_name, pretrained=...)`` on an
    ImageFolder tree (an ImageNet validation folder) with the model's published evaluation preprocessing
    (:func:`condconv.models.pretrained.eval_config`: resize, crop, interpolation, mean/std).

    Returns:
        :func:`evaluate`'s dict plus ``checkpoint`` (the file), ``model``, ``dataset``, ``split``, ``classes`` and
        ``preprocess`` (the preprocessing used, as a dict).

    Raises:
        ValueError: the file does not fit the model, or the folder's class count differs from the model's.
    """
    from dataclasses import asdict

    from condconv.models import create_model
    from condconv.models.pretrained import eval_config

    model = create_model(model_name, pretrained=pretrained, **dict(model_kwargs or {}))
    cfg = eval_config(model_name)
    ds = build_dataset(dataset, split, data_dir=data_dir, augment=False, preprocess=cfg)
    if ds.num_classes != model.num_classes:
        raise ValueError(f"{model_name} from {pretrained} predicts {model.num_classes} classes but {data_dir} has "
                         f"{ds.num_classes} class folders")
    dev = resolve_device(device)
    model.to(dev)
    loader = EpochLoader(ds, batch_size, num_workers=workers, pin_memory=dev.type == "cuda")
    result = evaluate(model, loader, device=dev, amp_dtype=amp_dtype(amp, dev), progress=progress)
    result.update(checkpoint=str(pretrained), model=model_name, dataset=ds.name, split=ds.split,
                  classes=list(ds.classes), preprocess=asdict(cfg))
    return result
