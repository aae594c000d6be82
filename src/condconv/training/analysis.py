"""The routing analysis of the CondConv paper: how each dynamic layer weighs its experts, per class.

CondConv: Conditionally Parameterized Convolutions for Efficient Inference (Yang et al., NeurIPS 2019,
arXiv:1904.04971) shows the mean routing weights per class: early layers route every class alike, late layers route
by class. :func:`routing_statistics` measures this for any model and dataset, with each layer's *class
dependence* (the share of its routing variance that the class explains).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condconv.nn.layers import DynamicConvBase
from condconv.utils.fileio import atomic_write_text

__all__ = ["RoutingStats", "dynamic_layers", "routing_statistics", "write_routing_csv"]


@dataclass
class RoutingStats:
    """Mean routing weights per class of every dynamic layer.

    Attributes:
        layers: layer names (module paths).
        num_experts: experts per layer.
        classes: class names.
        means: (layers, classes, max experts) mean routing weight per class (NaN past a layer's experts).
        counts: images per class.
        class_dependence: per layer, the share of the routing weights' variance explained by the class
            (eta squared, averaged over experts): near 0 = all classes routed alike, near 1 = routing by class.
    """

    layers: list[str]
    num_experts: list[int]
    classes: list[str]
    means: np.ndarray
    counts: np.ndarray
    class_dependence: list[float] = field(default_factory=list)


def dynamic_layers(model: nn.Module) -> list[tuple[str, DynamicConvBase]]:
    """``(name, layer)`` of every dynamic convolution of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicConvBase)]


class _RoutingTap:
    """Forward hooks that record the expert routing of every dynamic layer: on the layer's router (its output, or
    the ``expert`` field of ODConv's attentions) or, for layers fed external (block-shared) routing, on their
    ``routing_weights`` argument."""

    def __init__(self, layers: Sequence[tuple[str, DynamicConvBase]]) -> None:
        self.captured: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for index, (_, layer) in enumerate(layers):
            router = getattr(layer, "router", None)
            if router is not None:
                self.handles.append(router.register_forward_hook(self._router_hook(index)))
            else:
                self.handles.append(layer.register_forward_pre_hook(self._argument_hook(index), with_kwargs=True))

    def _record(self, index: int, weights: object) -> None:
        if isinstance(weights, torch.Tensor):
            self.captured.setdefault(index, []).append(weights.detach().float())

    def _router_hook(self, index: int):
        return lambda _module, _inputs, output: self._record(index, getattr(output, "expert", output))

    def _argument_hook(self, index: int):
        return lambda _module, args, kwargs: self._record(
            index, kwargs.get("routing_weights", args[1] if len(args) > 1 else None))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _class_dependence(sums: torch.Tensor, sq: torch.Tensor, counts: torch.Tensor, n_exp: Sequence[int]
                      ) -> tuple[np.ndarray, list[float]]:
    """Per-class means (layers, classes, experts) and each layer's eta squared, averaged over its experts."""
    total = counts.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (sums / counts.view(1, -1, 1)).numpy()
        grand = (sums.sum(1) / total).numpy()  # (L, E)
        total_var = sq.numpy() / float(total) - grand**2  # population variance over images
        between = counts.numpy()[None, :, None] * (means - grand[:, None, :]) ** 2
        between = np.nansum(between, axis=1) / float(total)
        dependence = []
        for li, e in enumerate(n_exp):
            tv, bv = total_var[li, :e], between[li, :e]
            ok = tv > 1e-12
            dependence.append(float(np.mean(bv[ok] / tv[ok])) if ok.any() else 0.0)
    for li, e in enumerate(n_exp):
        means[li, :, e:] = np.nan
    return means, dependence


@torch.no_grad()
def routing_statistics(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    classes: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
    progress: bool = False,
) -> RoutingStats:
    """Collect each dynamic layer's expert routing over a dataset, averaged per class.

    Args:
        model: a model with CondConv2d / DynamicConv2d / ODConv2d layers.
        loader: (images, labels) batches.
        num_classes: number of classes.
        classes: class names.
        device: where to run.
        max_images: stop after this many images (a positive int; ``None``: all).
        progress: tqdm bar.

    Returns:
        :class:`RoutingStats`.

    Raises:
        ValueError: the model has no dynamic layer with expert routing, the loader gave no images, or a bad
            ``max_images``.
    """
    from tqdm import tqdm

    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
    layers = dynamic_layers(model)
    if not layers:
        raise ValueError("the model has no dynamic layer (CondConv2d/DynamicConv2d/ODConv2d) to analyse")
    max_e = max(int(layer.num_experts) for _, layer in layers)
    sums = torch.zeros(len(layers), num_classes, max_e, dtype=torch.float64)
    sq = torch.zeros(len(layers), max_e, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    seen_layers: set[int] = set()
    model.eval().to(device)
    tap, seen = _RoutingTap(layers), 0
    try:
        for x, y in tqdm(loader, desc="routing", disable=not progress, leave=False, dynamic_ncols=True):
            if max_images is not None and seen + len(y) > max_images:
                x, y = x[: max_images - seen], y[: max_images - seen]
            tap.captured.clear()
            model(x.to(device))
            y = y.to(torch.int64)
            for i, ws in tap.captured.items():
                w = torch.stack(ws).mean(0).double().cpu()  # (B, E); mean over repeated calls of one layer
                sums[i, :, :w.shape[1]].index_add_(0, y, w)
                sq[i, :w.shape[1]] += (w * w).sum(0)
                seen_layers.add(i)
            counts += torch.bincount(y, minlength=num_classes).double()
            seen += len(y)
            if max_images is not None and seen >= max_images:
                break
    finally:
        tap.remove()
    if seen == 0:
        raise ValueError("the data loader gave no images to analyse")
    keep = sorted(seen_layers)
    if not keep:
        raise ValueError("the model has no dynamic layer with expert routing (CondConv2d/DynamicConv2d/ODConv2d)")
    n_exp = [int(layers[i][1].num_experts) for i in keep]
    means, dependence = _class_dependence(sums[keep], sq[keep], counts, n_exp)
    return RoutingStats(
        layers=[layers[i][0] for i in keep], num_experts=n_exp,
        classes=list(classes) if classes else [str(c) for c in range(num_classes)],
        means=means, counts=counts.numpy().astype(np.int64), class_dependence=dependence,
    )  # fmt: skip


def write_routing_csv(stats: RoutingStats, path: str | os.PathLike) -> Path:
    """One row per (layer, class, expert): the mean routing weight and the layer's class dependence."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer_index", "layer", "class_index", "class", "images", "expert", "mean_weight", "class_dependence"])
    for li, name in enumerate(stats.layers):
        for ci, cname in enumerate(stats.classes):
            for e in range(stats.num_experts[li]):
                v = stats.means[li, ci, e]
                w.writerow([li, name, ci, cname, int(stats.counts[ci]), e, f"{v:.6g}" if np.isfinite(v) else "",
                            f"{stats.class_dependence[li]:.4f}"])  # fmt: skip
    return atomic_write_text(path, buf.getvalue())
