"""``condconv sweep`` (width x experts grid -> CSV + MACs-vs-accuracy figure) and ``condconv routing``.

CondConv: Conditionally Parameterized Convolutions for Efficient Inference (Yang et al., NeurIPS 2019,
arXiv:1904.04971). Its MobileNetV1 study trains widths {0.25, 0.5, 0.75, 1.0} x experts {1, 2, 4, 8, 16, 32}
(1 = the static baseline) and plots multiply-adds against top-1: accuracy rises with the experts at every width
for a small increase in multiply-adds. :func:`sweep_grid` runs such a grid for any registered model and dataset,
several seeds per point, and is resumable: finished runs are read back from ``runs.csv`` and skipped, and an
interrupted run continues from its last checkpoint.

The paper's routing analysis (mean routing weights per class) is :func:`routing_statistics`: early layers route
all classes alike, late layers route by class.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from condconv.train import (
    TrainConfig,
    _atomic_write_bytes,
    _config_classes,
    _Dist,
    _init_distributed,
    _model_args,
    add_checkpoint_data_arguments,
    add_training_options,
    build_model,
    config_from_args,
    load_checkpoint,
    load_config_file,
    train_model,
)

__all__ = [
    "SWEEP_DEFAULTS",
    "RoutingStats",
    "SweepResult",
    "add_routing_arguments",
    "add_sweep_arguments",
    "routing_statistics",
    "run_routing",
    "run_sweep",
    "summarize_runs",
    "sweep_grid",
]

logger = logging.getLogger(__name__)

# Training settings of the default (no-argument) sweep: MobileNetV1-CIFAR on 300 embedded digits; see the README
# for the measured time on 2 CPU cores. Anything here can be overridden with the train flags.
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
    _atomic_write_bytes(path, buf.getvalue().encode())


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


def _macs_params(model_name: str, model_args: Mapping[str, Any], input_size: tuple[int, int, int]) -> tuple[int, int]:
    from condconv.profile import count_macs

    model = build_model(model_name, model_args)
    report = count_macs(model, input_size=input_size)
    return int(report.macs), int(report.params)


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
    interrupted mid-training resumes from its checkpoint.

    Args:
        base: training settings (:class:`~condconv.train.TrainConfig` or dict); missing keys take
            :data:`SWEEP_DEFAULTS`, then the TrainConfig defaults.
        widths: width multipliers.
        experts: expert counts (1 = static).
        seeds: seeds per grid point.
        out: sweep folder (default ``runs/sweep-<model>-<dataset>``).
        plot: write the MACs-vs-accuracy PNG.
        keep_weights: keep each run's final ``model.safetensors`` (its checkpoint folder is always removed).
        progress: tqdm bar over runs.

    Returns:
        :class:`SweepResult`.
    """
    t0 = time.perf_counter()
    values = dict(SWEEP_DEFAULTS)
    if isinstance(base, TrainConfig):
        values.update(base.to_dict())
    elif base is not None:
        values.update(base)
        if "train_size" not in base and str(values.get("dataset", "digits")).lower() != "digits":
            values["train_size"] = None  # the 300-image subset is for the embedded digits only
    base_cfg = TrainConfig.from_dict({k: v for k, v in values.items() if k not in ("width", "experts", "seed")})
    widths = [float(w) for w in widths]
    experts = [int(e) for e in experts]
    seeds = [int(s) for s in seeds]
    for name, vals in (("widths", widths), ("experts", experts), ("seeds", seeds)):
        if not vals:
            raise ValueError(f"{name} must not be empty")
    if any(w <= 0 for w in widths):
        raise ValueError(f"widths must be positive, got {widths}")
    if any(e < 1 for e in experts):
        raise ValueError(f"experts must be >= 1, got {experts}")
    out_dir = Path(out) if out else Path("runs") / f"sweep-{base_cfg.model}-{Path(str(base_cfg.dataset)).name}"

    # under torchrun every process runs the same plan in lockstep (each run is a DDP run); rank 0 writes
    device_kind = "cuda" if (base_cfg.device == "auto" and torch.cuda.is_available()) else str(base_cfg.device)
    dist_info = _init_distributed("cuda" if device_kind.startswith("cuda") else "cpu")
    try:
        return _sweep(base_cfg, widths, experts, seeds, out_dir, plot, keep_weights, progress, dist_info, t0)
    finally:
        if dist_info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _sweep(
    base_cfg: TrainConfig,
    widths: list[float],
    experts: list[int],
    seeds: list[int],
    out_dir: Path,
    plot: bool,
    keep_weights: bool,
    progress: bool,
    dist_info: _Dist,
    t0: float,
) -> SweepResult:
    from tqdm import tqdm

    from condconv.data import build_dataset

    main = dist_info.main
    runs_csv, summary_csv, meta_path = out_dir / "runs.csv", out_dir / "summary.csv", out_dir / "sweep.json"
    digest, settings = _settings_hash(base_cfg)
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed sweep metadata {meta_path}: {exc}") from exc
        if old.get("settings_hash") != digest:
            before = old.get("settings", {})
            changed = sorted(k for k in set(settings) | set(before) if settings.get(k) != before.get(k))
            raise ValueError(
                f"{out_dir} holds a sweep made with other settings (differ: {', '.join(changed) or '?'}): "
                "use another --out or the same settings"
            )
    done = _read_csv(runs_csv)
    _barrier(dist_info)  # every process has read the folder before rank 0 writes to it
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"settings_hash": digest, "settings": settings}
        _atomic_write_bytes(meta_path, json.dumps(meta, indent=2, default=str).encode())
    done_keys = {(r["model"], r["conv"], float(r["width"]), int(r["experts"]), int(r["seed"])) for r in done}
    plan = [(w, e, s) for s in seeds for w in widths for e in experts]

    # multiply-adds and parameters of each grid point (per image, the paper's convention)
    info = build_dataset(base_cfg.dataset, "test", data_dir=base_cfg.data_dir, image_size=base_cfg.image_size)
    input_size = (info.in_chans, info.image_size, info.image_size)
    costs: dict[tuple[float, int], tuple[int, int]] = {}
    for w in widths:
        for e in experts:
            cfg = _grid_config(base_cfg, w, e, 0, out_dir)
            costs[(w, e)] = _macs_params(cfg.model, _model_args(cfg, info.num_classes, info.in_chans), input_size)

    rows = list(done)
    trained = skipped = 0
    bar = tqdm(total=len(plan), desc="sweep", disable=not (progress and main), dynamic_ncols=True)
    train_logger = logging.getLogger("condconv.train")
    old_level = train_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        train_logger.setLevel(logging.WARNING)
    try:
        for w, e, s in plan:
            cfg = _grid_config(base_cfg, w, e, s, out_dir)
            key = (cfg.model, cfg.conv, w, e, s)
            if key in done_keys:
                skipped += 1
                bar.update(1)
                continue
            bar.set_postfix_str(_run_name(w, e, s))
            result = train_model(cfg, explicit=["resume", "out", "width", "experts", "seed", "conv"])
            macs, params = costs[(w, e)]
            row = {
                "model": cfg.model, "conv": cfg.conv, "width": w, "experts": e, "seed": s, "params": params,
                "macs": macs, "top1": result.top1, "top5": result.top5, "loss": result.loss, "steps": result.steps,
                "train_seconds": result.seconds, "run_dir": str(result.run_dir),
            }  # fmt: skip
            rows.append(row)
            done_keys.add(key)
            if main:
                _write_csv(runs_csv, rows, _RUN_FIELDS)
                _write_csv(summary_csv, summarize_runs(rows), _SUMMARY_FIELDS)
                shutil.rmtree(Path(result.run_dir) / "checkpoints", ignore_errors=True)
                if not keep_weights:
                    Path(result.checkpoint).unlink(missing_ok=True)
            trained += 1
            bar.update(1)
            bar.set_postfix_str(f"{_run_name(w, e, s)}: top-1 {result.top1:.1f}%")
    finally:
        bar.close()
        train_logger.setLevel(old_level)

    wanted = {(base_cfg.model, _conv_for(base_cfg, e), w, e, s) for w, e, s in plan}
    selected = [
        r for r in rows if (r["model"], r["conv"], float(r["width"]), int(r["experts"]), int(r["seed"])) in wanted
    ]
    summary = summarize_runs(selected)
    figure = None
    if main:
        _write_csv(runs_csv, rows, _RUN_FIELDS)
        _write_csv(summary_csv, summarize_runs(rows), _SUMMARY_FIELDS)
        if plot and summary:
            from condconv.plots import plot_macs_vs_accuracy

            size = base_cfg.train_size if base_cfg.train_size is not None else "all"
            title = (
                f"{base_cfg.model} ({base_cfg.conv}) on {Path(str(base_cfg.dataset)).name}: {size} training images, "
                f"{base_cfg.epochs} epochs, mean ± std over {len(seeds)} seed(s)"
            )
            figure = plot_macs_vs_accuracy(summary, out_dir / "sweep.png", title=title)
    return SweepResult(
        runs=selected, summary=summary, runs_csv=runs_csv, summary_csv=summary_csv, figure=figure,
        seconds=time.perf_counter() - t0, trained=trained, skipped=skipped,
    )  # fmt: skip


def _barrier(dist_info: _Dist) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _conv_for(base: TrainConfig, experts: int) -> str:
    return "static" if experts == 1 else base.conv


def _grid_config(base: TrainConfig, width: float, experts: int, seed: int, out_dir: Path) -> TrainConfig:
    conv = _conv_for(base, experts)
    return dataclasses.replace(
        base, width=width, experts=None if conv == "static" else experts, conv=conv, seed=seed,
        out=str(out_dir / "runs" / _run_name(width, experts, seed)), resume="auto",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# routing analysis
# ----------------------------------------------------------------------------------------------------------------
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


def _dynamic_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from condconv.layers import DynamicConvBase

    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicConvBase)]


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

    The routing is read with forward hooks: on the layer's router (its output, or the ``expert`` field of ODConv's
    attentions) or, for layers fed external (block-shared) routing, on the ``routing_weights`` argument.

    Args:
        model: a model with CondConv2d / DynamicConv2d / ODConv2d layers.
        loader: (images, labels) batches.
        num_classes: number of classes.
        classes: class names.
        device: where to run.
        max_images: stop after this many images.
        progress: tqdm bar.

    Returns:
        :class:`RoutingStats`.

    Raises:
        ValueError: the model has no dynamic layer with expert routing.
    """
    from tqdm import tqdm

    layers = _dynamic_layers(model)
    if not layers:
        raise ValueError("the model has no dynamic layer (CondConv2d/DynamicConv2d/ODConv2d) to analyse")
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []

    def router_hook(idx: int):
        def hook(_module, _inputs, output):
            weights = getattr(output, "expert", output)
            if isinstance(weights, torch.Tensor):
                captured.setdefault(idx, []).append(weights.detach().float())

        return hook

    def pre_hook(idx: int):
        def hook(_module, args, kwargs):
            weights = kwargs.get("routing_weights", args[1] if len(args) > 1 else None)
            if isinstance(weights, torch.Tensor):
                captured.setdefault(idx, []).append(weights.detach().float())

        return hook

    for i, (_, layer) in enumerate(layers):
        router = getattr(layer, "router", None)
        if router is not None:
            handles.append(router.register_forward_hook(router_hook(i)))
        else:
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))

    device = torch.device(device)
    max_e = max((int(layer.num_experts) for _, layer in layers), default=0)
    sums = torch.zeros(len(layers), num_classes, max_e, dtype=torch.float64)
    sq = torch.zeros(len(layers), max_e, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    seen_layers: set[int] = set()
    model.eval().to(device)
    seen = 0
    try:
        for x, y in tqdm(loader, desc="routing", disable=not progress, leave=False, dynamic_ncols=True):
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None and seen + len(y) > max_images:
                x, y = x[: max_images - seen], y[: max_images - seen]
            captured.clear()
            model(x.to(device))
            y = y.to(torch.int64)
            for i, ws in captured.items():
                w = torch.stack(ws).mean(0).double().cpu()  # (B, E); mean over repeated calls of one layer
                e = w.shape[1]
                sums[i, :, :e].index_add_(0, y, w)
                sq[i, :e] += (w * w).sum(0)
                seen_layers.add(i)
            counts += torch.bincount(y, minlength=num_classes).double()
            seen += len(y)
    finally:
        for h in handles:
            h.remove()
    keep = sorted(seen_layers)
    if not keep:
        raise ValueError("the model has no dynamic layer with expert routing (CondConv2d/DynamicConv2d/ODConv2d)")
    names = [layers[i][0] for i in keep]
    n_exp = [int(layers[i][1].num_experts) for i in keep]
    sums, sq = sums[keep], sq[keep]
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
    return RoutingStats(
        layers=names, num_experts=n_exp, classes=list(classes) if classes else [str(c) for c in range(num_classes)],
        means=means, counts=counts.numpy().astype(np.int64), class_dependence=dependence,
    )  # fmt: skip


def _write_routing_csv(stats: RoutingStats, path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer_index", "layer", "class_index", "class", "images", "expert", "mean_weight", "class_dependence"])
    for li, name in enumerate(stats.layers):
        for ci, cname in enumerate(stats.classes):
            for e in range(stats.num_experts[li]):
                v = stats.means[li, ci, e]
                w.writerow([li, name, ci, cname, int(stats.counts[ci]), e, f"{v:.6g}" if np.isfinite(v) else "",
                            f"{stats.class_dependence[li]:.4f}"])  # fmt: skip
    _atomic_write_bytes(path, buf.getvalue().encode())


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``condconv sweep`` (the train options set the per-run settings)."""
    g = parser.add_argument_group("grid")
    g.add_argument(
        "--widths", type=float, nargs="+", default=list(DEFAULT_WIDTHS), help="width multipliers (default: %(default)s)"
    )
    g.add_argument(
        "--experts",
        type=int,
        nargs="+",
        default=list(DEFAULT_EXPERTS),
        help="expert counts, 1 = static (default: %(default)s)",
    )
    g.add_argument(
        "--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="seeds per grid point (default: %(default)s)"
    )
    g.add_argument("--out", "-o", default=None, help="sweep folder (default: runs/sweep-<model>-<dataset>)")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    g.add_argument("--no-keep-weights", dest="keep_weights", action="store_false", help="delete each run's weights")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar over runs")
    parser.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML file of per-run training options")
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    per_run = [n for n in names if n not in ("width", "experts", "seed", "out", "resume", "progress")]
    add_training_options(parser, include=per_run, defaults={**SWEEP_DEFAULTS, "train_size": "300 on digits, else all"})


def run_sweep(args: argparse.Namespace) -> int:
    """``condconv sweep``: train the grid, print the summary table, write CSVs and the figure."""
    base = dict(SWEEP_DEFAULTS)
    file_values = {}
    if getattr(args, "config", None):
        file_values = {str(k).replace("-", "_"): v for k, v in load_config_file(args.config).items()}
        base.update(file_values)
    dataset = getattr(args, "dataset", base["dataset"])
    if str(dataset).lower() != "digits" and "train_size" not in file_values and not hasattr(args, "train_size"):
        base["train_size"] = None  # the 300-image subset is for the embedded digits only
    grid_only = ("config", "out", "progress", "widths", "experts", "seeds", "plot", "keep_weights")
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in grid_only})
    cfg, _ = config_from_args(ns, base=base)
    res = sweep_grid(
        cfg, widths=args.widths, experts=args.experts, seeds=args.seeds, out=args.out, plot=args.plot,
        keep_weights=args.keep_weights, progress=args.progress,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"{'width':>6} {'experts':>7} {'params':>10} {'MADDs':>9} {'top-1 mean ± std':>18}  per seed")
    for r in res.summary:
        print(
            f"{r['width']:>6g} {r['experts']:>7d} {r['params']:>10,d} {r['madds_m']:>8.2f}M "
            f"{r['top1_mean']:>9.2f} ± {r['top1_std']:<5.2f}  {r['top1_per_seed']}"
        )
    print(f"{res.trained} run(s) trained, {res.skipped} already done, {res.seconds:.0f}s")
    print(f"results: {res.runs_csv}  summary: {res.summary_csv}" + (f"  figure: {res.figure}" if res.figure else ""))
    return 0


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``condconv routing``."""
    add_checkpoint_data_arguments(parser)
    parser.add_argument("--max-images", type=int, default=None, help="stop after N images (default: all)")
    parser.add_argument("--max-classes", type=int, default=10, help="classes drawn in the PNG (default: 10)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (ImageFolder; default: 4)")
    parser.add_argument("--out", "-o", default=None, help="output folder (default: <checkpoint folder>/routing)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")


def run_routing(args: argparse.Namespace) -> int:
    """``condconv routing``: per-class mean routing of every dynamic layer -> routing.csv + routing.png."""
    from condconv.data import EpochLoader, build_dataset
    from condconv.plots import plot_routing
    from condconv.train import _resolve_device

    model, config = load_checkpoint(args.checkpoint)
    dataset = args.dataset or config.get("dataset", "digits")
    data_dir = args.data_dir if args.data_dir is not None else config.get("data_dir")
    ds = build_dataset(dataset, args.split, data_dir=data_dir, image_size=config.get("image_size"), augment=False)
    if ds.num_classes != _config_classes(config):
        raise ValueError(
            f"checkpoint {args.checkpoint} predicts {_config_classes(config)} classes "
            f"but {dataset} has {ds.num_classes}"
        )
    device = _resolve_device(args.device)
    loader = EpochLoader(ds, args.batch_size, num_workers=args.workers)
    stats = routing_statistics(
        model,
        loader,
        ds.num_classes,
        classes=ds.classes,
        device=device,
        max_images=args.max_images,
        progress=args.progress,
    )
    ck = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ck.parent if ck.is_file() else ck) / "routing"
    out.mkdir(parents=True, exist_ok=True)
    _write_routing_csv(stats, out / "routing.csv")
    title = (
        f"{config['model']} ({config.get('conv')}, {config.get('experts')} experts) on {ds.name}/{ds.split}: "
        "mean routing per class"
    )
    png = plot_routing(
        stats.means, stats.layers, stats.classes, out / "routing.png", class_dependence=stats.class_dependence,
        max_classes=args.max_classes, title=title,
    )  # fmt: skip
    print(f"{'layer':<40} {'experts':>7} {'class dependence':>17}")
    for name, e, dep in zip(stats.layers, stats.num_experts, stats.class_dependence):
        print(f"{name:<40} {e:>7d} {dep:>17.3f}")
    print(f"{int(stats.counts.sum())} images; written: {out / 'routing.csv'}  {png}")
    return 0
