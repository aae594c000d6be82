"""The three papers' cost tables next to this library's counts: every preset of :mod:`condconv.models.presets`.

- CondConv: Yang et al., NeurIPS 2019, arXiv:1904.04971. - DynamicConv: Chen et al., CVPR 2020, arXiv:1912.03458.
- ODConv: Li, Zhou, Yao, ICLR 2022, arXiv:2209.07947.

Models are built on the ``meta`` device (no weights allocated) and counted with :func:`condconv.count_macs` under
the paper's convention (:data:`condconv.models.macs.PAPER_CONVENTIONS`), at 224x224 with 1000 classes.

Example:
    >>> rows = paper_table("odconv")
    >>> rows[0]["preset"], round(rows[0]["params"] / 1e6, 2), rows[0]["paper_params"]
    ('odconv_resnet18_1x', 11.94, 11.94)
"""

from __future__ import annotations

import functools

import torch

from condconv.models import create_model, resnet
from condconv.models.macs import PAPER_CONVENTIONS, count_macs
from condconv.models.presets import PAPERS, PRESETS, Preset

__all__ = ["paper_table", "PARAMS_TOLERANCE", "MACS_TOLERANCE"]

#: The targets: parameters within 0.5% and multiply-adds within 2% of the paper's figures.
PARAMS_TOLERANCE, MACS_TOLERANCE = 0.005, 0.02
_V1 = {"resnet50": resnet.RESNET50, "resnet101": resnet.RESNET101}


def _count(build, convention: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = build()
    report = count_macs(model, (3, 224, 224), convention=convention)
    return report.params, report.macs


@functools.cache
def _baseline(model: str, width: float, v1: bool, convention: str) -> tuple[int, int]:
    """The static model's counts (v1 layout if ``v1``), shared by the presets of one architecture."""
    build = resnet.resnet_v1(_V1[model]).build if v1 else functools.partial(create_model, model, width_mult=width)
    return _count(build, convention)


def _diff(ours: float, paper: float | None) -> float | None:
    return None if paper is None else ours / paper - 1.0


def _row(preset: Preset, convention: str) -> dict:
    width = preset.kwargs.get("width_mult", 1.0)
    params, macs = _count(preset.build, convention)
    base_params, base_macs = _baseline(preset.model, width, False, convention)
    counted_macs, counted_base = macs, base_macs
    if preset.rule == "v1":  # the figure was counted on the v1 layout: so are the compared multiply-adds
        v1 = resnet.resnet_v1(_V1[preset.model])
        counted_macs = _count(functools.partial(v1.build, **preset.kwargs), convention)[1]
        counted_base = _baseline(preset.model, width, True, convention)[1]
    row = {"paper": preset.paper, "preset": preset.name, "model": preset.model, "width": width,
           "experts": preset.kwargs.get("num_experts"), "convention": convention, "rule": preset.rule,
           "params": params, "macs": macs, "compared_macs": counted_macs,
           "paper_params": preset.params, "paper_macs": preset.macs,
           "baseline_params": base_params, "baseline_macs": counted_base,
           "paper_baseline_params": preset.baseline_params, "paper_baseline_macs": preset.baseline_macs,
           "source": preset.source, "note": preset.note, "documented_deviation": dict(preset.deviation)}
    scale = 2**20 if preset.rule == "mebi" else 1e6
    if preset.rule == "increment":
        row["params_diff"] = _diff(params - base_params, (preset.params - preset.baseline_params) * 1e6)
        row["macs_diff"] = _diff(counted_macs - counted_base, (preset.macs - preset.baseline_macs) * 1e6)
    else:
        row["params_diff"] = _diff(params / scale, preset.params)
        row["macs_diff"] = _diff(counted_macs / 1e6, preset.macs)
    row["reproduced"] = (row["params_diff"] is None or abs(row["params_diff"]) <= PARAMS_TOLERANCE) and \
        (row["macs_diff"] is None or abs(row["macs_diff"]) <= MACS_TOLERANCE)
    return row


def paper_table(paper: str, *, convention: str | None = None) -> list[dict]:
    """Each preset of ``paper`` with the paper's figures and this library's counts.

    Args:
        paper: ``'condconv'``, ``'dynamic'`` or ``'odconv'``.
        convention: counting convention (``None``: the one the paper's table fits, :data:`PAPER_CONVENTIONS`).

    Returns:
        One dict per preset, in table order: ``preset``, ``model``, ``width``, ``experts``, ``convention``,
        ``rule`` (how the figures are compared, :attr:`condconv.models.presets.Preset.rule`), ``params`` and
        ``macs`` (this library's counts of the preset), ``compared_macs`` (the count compared with the paper's:
        on the v1 layout for rule ``'v1'``), ``paper_params``/``paper_macs`` (millions), the static baseline's
        counts and published figures (``baseline_*``, ``paper_baseline_*``), ``params_diff``/``macs_diff``
        (relative differences under the rule), ``reproduced`` (within 0.5% / 2%), ``documented_deviation``,
        ``note`` and ``source``.
    """
    if paper not in PAPERS:
        raise ValueError(f"paper must be one of {PAPERS}, got {paper!r}")
    convention = PAPER_CONVENTIONS[paper] if convention is None else convention
    return [_row(preset, convention) for preset in PRESETS if preset.paper == paper]
