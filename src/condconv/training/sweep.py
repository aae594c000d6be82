"""The CondConv paper's width x experts study as a resumable grid of training runs -> CSVs + MACs-vs-accuracy figure.

CondConv: Conditionally Parameterized Convolutions for Efficient Inference (Yang et al., NeurIPS 2019,
arXiv:1904.04971). Its MobileNetV1 study trains widths {0.25, 0.5, 0.75, 1.0} x experts {1, 2, 4, 8, 16, 32}
(1 = the static baseline) and plots multiply-adds against top-1: accuracy rises with the experts at every width
for a small increase in multiply-adds. :func:`sweep_grid` runs such a grid for any registered model and dataset,
several seeds per point, and is resumable: finished runs are read back from ``runs.csv`` and skipped, and an
interrupted run continues from its last checkpoint.

The paper's routing analysis (mean routing weights per class) is :func:`condconv.training.analysis.routing_statistics`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import operator
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import condconv.training.budget as budget
import condconv.utils.runtime as runtime
from condconv.data import build_dataset
from condconv.models.checkpoint import build_model
from condconv.models.macs import count_macs
from condconv.training.config import FLAG_MODEL_KWARGS, TrainConfig, check_model_kwargs, model_args
from condconv.training.loop import TrainProgress, train_model
from condconv.utils.checks import OptionError, is_integer, seed_value
from condconv.utils.fileio import atomic_write_text, folder_lock

__all__ = [
    "GRID_MODEL_KWARGS",
    "SWEEP_DEFAULTS",
    "SweepResult",
    "folder_summary",
    "summarize_runs",
    "sweep_config",
    "sweep_grid",
]

logger = logging.getLogger(__name__)

# Training settings of the default (no-argument) sweep: MobileNetV1-CIFAR on 300 embedded digits; see the README
# for the measured time on 2 CPU cores. Anything here can be overridden with the train flags. The 300-image subset
# applies to the embedded digits only (sweep_config): other datasets use their whole training split by default.
SWEEP_DEFAULTS: dict[str, Any] = {
    "model": "mobilenet_v1_cifar",
    "conv": "condconv",
    "dataset": "digits",
    "train_size": 300,
    "epochs": 15,
    "batch_size": 32,
    "lr": 0.05,
    "eval_every": 0,
    "checkpoint_epochs": 5,
    "progress": False,
}
DEFAULT_WIDTHS = (0.25, 0.5)
DEFAULT_EXPERTS = (1, 2, 4, 8)
DEFAULT_SEEDS = (0, 1)
#: ``create_model`` arguments the grid or an option sets: ``model_kwargs`` must not set them (the option to use).
GRID_MODEL_KWARGS = {**FLAG_MODEL_KWARGS, "width_mult": "widths", "num_experts": "experts"}

_RUN_FIELDS = [
    "model", "conv", "width", "experts", "seed", "params", "macs", "top1", "top5", "loss", "steps", "train_seconds",
    "run_dir",
]  # fmt: skip
_SUMMARY_FIELDS = [
    "model", "conv", "width", "experts", "params", "macs", "madds_m", "top1_mean", "top1_std", "top5_mean",
    "top5_std", "n", "top1_per_seed", "seeds",
]  # fmt: skip
# options that do not change a run's result (may differ when a sweep is resumed)
_NEUTRAL = {"out", "resume", "progress", "workers", "device", "log_every", "checkpoint_every", "checkpoint_epochs",
            "keep_checkpoints", "eval_every", "data_dir", "width", "experts", "seed", "conv"}  # fmt: skip


@dataclass
class SweepResult:
    """What :func:`sweep_grid` returns: raw rows (one per run), summary rows (one per grid point), files."""

    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    runs_csv: Path
    summary_csv: Path
    figure: Path | None
    seconds: float
    trained: int = 0
    skipped: int = 0


def _fmt_width(w: float) -> str:
    return f"{float(w):g}"


def _run_name(width: float, experts: int, seed: int) -> str:
    return f"w{_fmt_width(width)}_e{int(experts)}_s{int(seed)}"


def _settings_hash(base: TrainConfig) -> tuple[str, dict[str, Any]]:
    settings = {k: v for k, v in base.to_dict().items() if k not in _NEUTRAL}
    settings["conv"] = base.conv
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], settings


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read sweep results {path}: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return []
    missing = [f for f in ("model", "width", "experts", "seed", "top1") if f not in reader.fieldnames]
    if missing:
        raise ValueError(f"malformed sweep results {path}: missing columns {missing}")
    rows = []
    for row in reader:
        try:
            float(row["width"]), int(row["experts"]), int(row["seed"]), float(row["top1"])
        except (TypeError, ValueError):
            logger.warning("%s: skipping malformed row %s", path, row)
            continue
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k, "")) for k in fields})
    atomic_write_text(path, buf.getvalue())


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    return v


def summarize_runs(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group run rows by (model, conv, width, experts): mean and sample std over seeds, plus the raw values."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        key = (r["model"], r["conv"], float(r["width"]), int(r["experts"]))
        groups.setdefault(key, []).append(r)
    out = []
    for (model, conv, width, experts), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][3])):
        rs = sorted(rs, key=lambda r: int(r["seed"]))
        top1 = np.array([float(r["top1"]) for r in rs])
        top5 = np.array([float(r["top5"]) for r in rs])
        macs = int(float(rs[0]["macs"]))
        out.append({
            "model": model, "conv": conv, "width": width, "experts": experts, "params": int(float(rs[0]["params"])),
            "macs": macs, "madds_m": macs / 1e6, "top1_mean": float(top1.mean()),
            "top1_std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0, "top5_mean": float(top5.mean()),
            "top5_std": float(top5.std(ddof=1)) if len(top5) > 1 else 0.0, "n": len(rs),
            "top1_per_seed": ";".join(f"{v:.2f}" for v in top1), "seeds": ";".join(str(int(r["seed"])) for r in rs),
        })  # fmt: skip
    return out


def _macs_params(model_name: str, args: Mapping[str, Any], input_size: tuple[int, int, int]
                 ) -> tuple[int, int, int]:
    """Multiply-adds and parameters of the model ``args`` build, and its expert count (1: no dynamic layer)."""
    from condconv.nn.layers import DynamicConvBase

    with torch.device("meta"):  # shapes only: no weights are allocated
        model = build_model(model_name, args)
    report = count_macs(model, input_size=input_size)
    counts = {m.num_experts for m in model.modules() if isinstance(m, DynamicConvBase)}
    experts = max(counts) if counts else 1
    return int(report.macs), int(report.params), experts


def sweep_config(base: TrainConfig | Mapping[str, Any] | None = None) -> TrainConfig:
    """The per-run training settings of a sweep: :data:`SWEEP_DEFAULTS`, then ``base`` (a config or a dict of the
    options given). The 300-image training subset of the defaults applies to the embedded digits only: unless
    ``base`` sets ``train_size``, other datasets use their whole training split."""
    values = dict(SWEEP_DEFAULTS)
    given: Mapping[str, Any] = base.to_dict() if isinstance(base, TrainConfig) else dict(base or {})
    values.update(given)
    check_model_kwargs(values.get("model_kwargs") or {}, GRID_MODEL_KWARGS)
    if "train_size" not in given and str(values.get("dataset", "digits")).lower() != "digits":
        values["train_size"] = None
    return TrainConfig.from_dict({k: v for k, v in values.items() if k not in ("width", "experts", "seed")})


def sweep_grid(
    base: TrainConfig | Mapping[str, Any] | None = None,
    *,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    experts: Sequence[int] = DEFAULT_EXPERTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    out: str | os.PathLike | None = None,
    plot: bool = True,
    keep_weights: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Train every (width, experts, seed) of a grid and summarise MADDs/params/accuracy.

    ``experts == 1`` trains the static model (``conv='static'``), the baseline of the paper's figure; other counts
    use ``base.conv``. Finished runs found in ``out/runs.csv`` (made with the same settings) are skipped; a run
    interrupted mid-training resumes from its checkpoint. The sweep folder is locked for the whole sweep.

    Args:
        base: training settings (:class:`~condconv.training.config.TrainConfig` or dict); see :func:`sweep_config`.
        widths: width multipliers.
        experts: expert counts (1 = static).
        seeds: seeds per grid point.
        out: sweep folder (default ``runs/sweep-<model>-<dataset>``).
        plot: write the MACs-vs-accuracy PNG.
        keep_weights: keep each run's final ``model.safetensors`` (its checkpoint folder is always removed).
        progress: a progress bar over the training steps of the whole grid (with the time left), updated every step.

    Returns:
        :class:`SweepResult`.
    """
    t0 = time.perf_counter()
    base_cfg = sweep_config(base)
    widths, experts, seeds = _check_grid(widths, experts, seeds)
    out_dir = Path(out) if out else Path("runs") / f"sweep-{base_cfg.model}-{Path(str(base_cfg.dataset)).name}"
    # under torchrun every process runs the same plan in lockstep (each run is a DDP run); rank 0 writes
    with runtime.distributed(runtime.device_kind(base_cfg.device)) as dist_info:
        lock = folder_lock(out_dir, "sweep folder") if dist_info.main else contextlib.nullcontext()
        with lock:
            sweep = _Sweep(base_cfg, out_dir, dist_info, plot=plot, keep_weights=keep_weights, progress=progress)
            return sweep.run([(w, e, s) for s in seeds for w in widths for e in experts], t0)


def _check_grid(widths: Sequence[float], experts: Sequence[int], seeds: Sequence[int]
                ) -> tuple[list[float], list[int], list[int]]:
    """The grid's values, checked: none empty, none repeated (a repeated value would train one run twice into one
    folder and count it twice in the summary), widths positive, experts >= 1, seeds what the generators take.

    Raises:
        OptionError: naming the grid option (``widths``, ``experts`` or ``seeds``) and the value.
    """
    for name, vals in (("widths", widths), ("experts", experts), ("seeds", seeds)):
        if isinstance(vals, (str, bytes)) or not isinstance(vals, Iterable):
            raise OptionError(name, f"{name} must be a list, got {vals!r}")
    widths, experts, seeds = list(widths), list(experts), list(seeds)
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not 0 < w < math.inf:
            raise OptionError("widths", f"widths must be positive numbers, got {widths}")
    for e in experts:
        if not is_integer(e) or operator.index(e) < 1:
            raise OptionError("experts", f"experts must be ints >= 1, got {experts}")
    checked = ([float(w) for w in widths], [operator.index(e) for e in experts],
               [seed_value(s, "seeds") for s in seeds])
    for name, vals in zip(("widths", "experts", "seeds"), checked):
        if not vals:
            raise OptionError(name, f"{name} must not be empty")
        repeated = sorted({v for v in vals if vals.count(v) > 1})
        if repeated:
            raise OptionError(name, f"{name} must not repeat a value: {', '.join(f'{v:g}' for v in repeated)} "
                              f"given more than once in {vals}")
    return checked


def _key(row: Mapping[str, Any]) -> tuple:
    return (row["model"], row["conv"], float(row["width"]), int(row["experts"]), int(row["seed"]))


class _Sweep:
    """One sweep folder: settings check, grid costs, the runs, the CSVs and the figure."""

    def __init__(self, base: TrainConfig, out_dir: Path, dist_info: runtime.DistInfo, *, plot: bool,
                 keep_weights: bool, progress: bool) -> None:
        self.base, self.out_dir, self.dist = base, out_dir, dist_info
        self.plot, self.keep_weights, self.progress = plot, keep_weights, progress
        self.runs_csv, self.summary_csv = out_dir / "runs.csv", out_dir / "summary.csv"

    def _check_settings(self) -> None:
        """Refuse a folder made with other settings; record this sweep's settings in ``sweep.json``."""
        meta_path = self.out_dir / "sweep.json"
        digest, settings = _settings_hash(self.base)
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"malformed sweep metadata {meta_path}: {exc}") from exc
            if old.get("settings_hash") != digest:
                before = old.get("settings", {})
                changed = sorted(k for k in set(settings) | set(before) if settings.get(k) != before.get(k))
                raise ValueError(f"{self.out_dir} holds a sweep made with other settings (differ: "
                                 f"{', '.join(changed) or '?'}): use another output folder or the same settings")
        runtime.barrier(self.dist)  # every process has read the folder before rank 0 writes to it
        if self.dist.main:
            atomic_write_text(meta_path, json.dumps({"settings_hash": digest, "settings": settings}, indent=2,
                                                    default=str))

    def _costs(self, plan: list[tuple[float, int, int]]) -> tuple[dict[tuple[float, int], tuple[int, int]], int]:
        """Multiply-adds and parameters per grid point (per image, the paper's convention) and steps per run."""
        base = self.base
        train = build_dataset(base.dataset, "train", data_dir=base.data_dir, train_size=base.train_size,
                              image_size=base.image_size)
        size = (train.in_chans, train.image_size, train.image_size)
        costs = {}
        for w, e, _ in plan:
            if (w, e) not in costs:
                cfg = _grid_config(base, w, e, 0, self.out_dir)
                args = model_args(cfg, train.num_classes, train.in_chans)
                macs, params, built = _macs_params(cfg.model, args, size)
                if built != e:  # e.g. --conv static, or model_kwargs that leave no dynamic layer
                    raise OptionError("experts", f"experts {e} cannot be trained with these settings: the model built "
                                      f"for it (conv={cfg.conv}) has {built if built > 1 else 'no'} experts")
                costs[(w, e)] = (macs, params)
                estimate = budget.estimate_training_memory(cfg.model, args, size, base.batch_size,
                                                           optimizer=base.optimizer, momentum=base.momentum,
                                                           ema=base.ema_decay > 0)
                budget.check_training_memory(estimate, runtime.resolve_device(base.device, self.dist.local_rank),
                                             budget.local_processes() if self.dist.enabled else 1,
                                             what=f"grid point width={w:g}, experts={e}")
        steps = math.ceil(len(train) / self.dist.world_size) // base.batch_size * base.epochs
        return costs, steps

    def run(self, plan: list[tuple[float, int, int]], t0: float) -> SweepResult:
        from tqdm import tqdm

        costs, steps_per_run = self._costs(plan)  # refuses a grid point that cannot be trained, before any file
        self._check_settings()
        rows = _read_csv(self.runs_csv)
        done = {_key(r) for r in rows}
        todo = [(w, e, s) for w, e, s in plan if _key(_point(self.base, w, e, s)) not in done]
        bar = tqdm(total=len(todo) * steps_per_run, desc="sweep", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.dist.main))
        train_logger = logging.getLogger("condconv.training.loop")
        old_level = train_logger.level
        if not logger.isEnabledFor(logging.DEBUG):
            train_logger.setLevel(logging.WARNING)
        try:
            for index, (w, e, s) in enumerate(todo):
                rows.append(self._train_point(w, e, s, costs[(w, e)], bar, f"run {index + 1}/{len(todo)}"))
                self._write(rows)
        finally:
            bar.close()
            train_logger.setLevel(old_level)
        wanted = {_key(_point(self.base, w, e, s)) for w, e, s in plan}
        selected = [r for r in rows if _key(r) in wanted]
        summary = summarize_runs(selected)
        figure = self._figure(summary, len({s for _, _, s in plan})) if self.dist.main else None
        return SweepResult(runs=selected, summary=summary, runs_csv=self.runs_csv, summary_csv=self.summary_csv,
                           figure=figure, seconds=time.perf_counter() - t0, trained=len(todo),
                           skipped=len(plan) - len(todo))

    def _train_point(self, width: float, experts: int, seed: int, cost: tuple[int, int], bar, label: str) -> dict:
        cfg = _grid_config(self.base, width, experts, seed, self.out_dir)
        name = _run_name(width, experts, seed)
        start = bar.n

        def on_step(p: TrainProgress) -> None:
            bar.update(start + p.global_step - bar.n)
            bar.set_postfix_str(f"{label} {name} epoch {p.epoch + 1}/{p.epochs}", refresh=False)

        result = train_model(cfg, explicit=["resume", "out", "width", "experts", "seed", "conv"], on_step=on_step)
        bar.update(start + result.steps - bar.n)
        bar.set_postfix_str(f"{label} {name}: top-1 {result.top1:.1f}%")
        if self.dist.main:
            shutil.rmtree(Path(result.run_dir) / "checkpoints", ignore_errors=True)
            if not self.keep_weights:
                Path(result.checkpoint).unlink(missing_ok=True)
        macs, params = cost
        built = result.config  # the labels are those of the model that was trained
        built_experts = built.get("experts") or 1  # no dynamic layer: the static baseline, 1 in the grid
        if (float(built.get("width") or 0), int(built_experts), int(built["seed"]), result.params) != \
                (width, experts, seed, params):
            raise RuntimeError(f"{name} trained width={built.get('width')}, experts={built.get('experts')}, seed="
                               f"{built['seed']}, {result.params:,} parameters, not the grid point's width={width}, "
                               f"experts={experts}, seed={seed}, {params:,} parameters")
        return {
            "model": built["model"], "conv": built["conv"], "width": float(built["width"]), "experts": built_experts,
            "seed": int(built["seed"]), "params": result.params, "macs": macs, "top1": result.top1,
            "top5": result.top5, "loss": result.loss, "steps": result.steps, "train_seconds": result.seconds,
            "run_dir": str(result.run_dir),
        }  # fmt: skip

    def _write(self, rows: list[dict]) -> None:
        if self.dist.main:
            _write_csv(self.runs_csv, rows, _RUN_FIELDS)
            _write_csv(self.summary_csv, summarize_runs(rows), _SUMMARY_FIELDS)

    def _figure(self, summary: list[dict], seeds: int) -> Path | None:
        if not (self.plot and summary):
            return None
        from condconv.training.plots import plot_macs_vs_accuracy

        base = self.base
        size = base.train_size if base.train_size is not None else "all"
        title = (f"{base.model} ({base.conv}) on {Path(str(base.dataset)).name}: {size} training images, "
                 f"{base.epochs} epochs, mean ± std over {seeds} seed(s)")
        return plot_macs_vs_accuracy(summary, self.out_dir / "sweep.png", title=title)


def _conv_for(base: TrainConfig, experts: int) -> str:
    return "static" if experts == 1 else base.conv


def _point(base: TrainConfig, width: float, experts: int, seed: int) -> dict[str, Any]:
    return {"model": base.model, "conv": _conv_for(base, experts), "width": width, "experts": experts, "seed": seed}


def _grid_config(base: TrainConfig, width: float, experts: int, seed: int, out_dir: Path) -> TrainConfig:
    conv = _conv_for(base, experts)
    return dataclasses.replace(
        base, width=width, experts=None if conv == "static" else experts, conv=conv, seed=seed,
        out=str(out_dir / "runs" / _run_name(width, experts, seed)), resume="auto",
    )  # fmt: skip


def folder_summary(folder: str | os.PathLike) -> tuple[int, int]:
    """``(bytes, files)`` under ``folder``: what a sweep leaves on disk."""
    total = count = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
                count += 1
    return total, count
