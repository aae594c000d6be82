"""Figures of ``condconv sweep`` and ``condconv routing`` (PNG files drawn with matplotlib's Agg canvas).

CondConv: Conditionally Parameterized Convolutions for Efficient Inference (Yang et al., NeurIPS 2019,
arXiv:1904.04971): its MobileNetV1 study plots multiply-adds against top-1 accuracy with one line per width
multiplier and one point per expert count; its routing analysis shows that early layers route every class alike
and late layers route by class. :func:`plot_macs_vs_accuracy` and :func:`plot_routing` draw both for any model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from condconv.utils.fileio import atomic_output

__all__ = ["plot_macs_vs_accuracy", "plot_routing"]


def _figure(**kwargs):
    """A matplotlib figure on its own Agg canvas: no pyplot, so the process's backend and figure list are untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_macs_vs_accuracy(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    metric: str = "top1",
) -> Path:
    """MADDs (x, millions) against accuracy (y, percent): one line per width, points labelled by expert count.

    Args:
        rows: summary rows with ``width``, ``experts``, ``macs`` and ``<metric>_mean`` (optional ``<metric>_std``,
            drawn as error bars, and ``n``).
        path: output PNG.
        title: figure title.
        metric: accuracy column prefix.

    Returns:
        The written path.
    """
    from matplotlib import colormaps

    path = Path(path)
    widths = sorted({float(r["width"]) for r in rows})
    fig = _figure(figsize=(7.0, 4.8), dpi=120)
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    for i, w in enumerate(widths):
        pts = sorted((r for r in rows if float(r["width"]) == w), key=lambda r: (float(r["macs"]), int(r["experts"])))
        if not pts:
            continue
        x = np.array([float(r["macs"]) / 1e6 for r in pts])
        y = np.array([float(r[f"{metric}_mean"]) for r in pts])
        err = np.array([float(r.get(f"{metric}_std") or 0.0) for r in pts])
        color = cmap(0.15 + 0.7 * i / max(1, len(widths) - 1))
        ax.errorbar(x, y, yerr=err, marker="o", ms=5, lw=1.6, capsize=3, color=color, label=f"width {w:g}x")
        for xi, yi, r in zip(x, y, pts):
            ax.annotate(
                str(int(r["experts"])), (xi, yi), textcoords="offset points", xytext=(4, 5), fontsize=8, color=color
            )
    ax.set_xlabel("multiply-adds per image (millions)")
    ax.set_ylabel("top-1 accuracy (%)" if metric == "top1" else f"{metric} (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="points: experts (1 = static)", fontsize=8, title_fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_routing(
    means: np.ndarray,
    layer_names: Sequence[str],
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    class_dependence: Sequence[float] | None = None,
    max_classes: int = 10,
    title: str | None = None,
) -> Path:
    """Mean routing weights per class: one heatmap (layers x experts) per class, plus per-layer class dependence.

    Args:
        means: (layers, classes, experts) mean routing weight (NaN where a layer has fewer experts).
        layer_names: names of the layers (rows).
        class_names: names of the classes.
        path: output PNG.
        class_dependence: per-layer share of routing variance explained by the class (0..1), drawn as bars.
        max_classes: classes drawn (the first ``max_classes``; the CSV has all).
        title: figure title.

    Returns:
        The written path.
    """
    path = Path(path)
    n_layers, n_classes, n_experts = means.shape
    shown = list(range(min(n_classes, max_classes)))
    panels = len(shown) + (1 if class_dependence is not None else 0)
    cols = min(panels, 6)
    rows = math.ceil(panels / cols)
    cell_h = max(2.2, 0.22 * n_layers + 0.8)
    fig = _figure(figsize=(1.0 + cols * max(1.6, 0.3 * n_experts + 0.9), rows * cell_h + 0.6), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    finite = means[np.isfinite(means)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    im = None
    short = [_short(n) for n in layer_names]
    for k, ci in enumerate(shown):
        ax = axes[k // cols][k % cols]
        im = ax.imshow(means[:, ci, :], aspect="auto", cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"class {class_names[ci]}", fontsize=8)
        ax.set_xticks(range(n_experts))
        ax.set_xticklabels([str(e) for e in range(n_experts)], fontsize=6)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels(short if k % cols == 0 else [], fontsize=6)
    if class_dependence is not None:
        k = len(shown)
        ax = axes[k // cols][k % cols]
        ax.barh(range(n_layers), list(class_dependence), color="tab:blue")
        ax.set_ylim(n_layers - 0.5, -0.5)
        ax.set_xlim(0, 1)
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels(short if k % cols == 0 else [], fontsize=6)
        ax.set_title("class dependence (eta^2)", fontsize=8)
        ax.set_xlabel("share of variance", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    for k in range(panels, rows * cols):
        axes[k // cols][k % cols].axis("off")
    if im is not None:
        fig.colorbar(im, ax=[a for row in axes for a in row], shrink=0.6, label="mean routing weight")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]
