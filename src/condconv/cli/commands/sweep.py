"""``condconv sweep``: the CondConv paper's width x experts grid -> CSVs + the MACs-vs-accuracy figure."""

from __future__ import annotations

import argparse
import dataclasses

from condconv.cli.commands.options import add_training_options, config_from_args
from condconv.training.config import TrainConfig, check_model_kwargs, load_config_file
from condconv.training.sweep import (
    DEFAULT_EXPERTS,
    DEFAULT_SEEDS,
    DEFAULT_WIDTHS,
    GRID_MODEL_KWARGS,
    SWEEP_DEFAULTS,
    folder_summary,
    sweep_grid,
)
from condconv.utils.checks import parse_kwargs
from condconv.utils.fileio import check_writable
from condconv.utils.runtime import is_main_process

HELP = "width x experts grid -> CSV + MACs-vs-accuracy figure"

_GRID_ONLY = ("out", "progress", "widths", "experts", "seeds", "plot", "keep_weights")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("grid")
    g.add_argument("--widths", type=float, nargs="+", default=list(DEFAULT_WIDTHS),
                   help="width multipliers (default: %(default)s)")
    g.add_argument("--experts", type=int, nargs="+", default=list(DEFAULT_EXPERTS),
                   help="expert counts, 1 = static (default: %(default)s)")
    g.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                   help="seeds per grid point (default: %(default)s)")
    g.add_argument("--out", "-o", default=None, help="sweep folder (default: runs/sweep-<model>-<dataset>)")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    g.add_argument("--no-keep-weights", dest="keep_weights", action="store_false", help="delete each run's weights")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar over the grid's training steps, with the time left")
    parser.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML file of per-run training options")
    per_run = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in ("width", "experts", "seed", "out", "resume", "progress")]
    add_training_options(parser, include=per_run, defaults={**SWEEP_DEFAULTS, "train_size": "300 on digits, else all"})


def run(args: argparse.Namespace) -> int:
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _GRID_ONLY})
    file_kwargs = (load_config_file(args.config) if args.config else {}).get("model_kwargs") or {}
    file_kwargs = file_kwargs if isinstance(file_kwargs, dict) else {}
    for kwargs in (parse_kwargs(getattr(ns, "model_kwargs", None)), file_kwargs):
        check_model_kwargs(kwargs, GRID_MODEL_KWARGS)  # before TrainConfig names --width for a grid option
    config, _ = config_from_args(ns, base=SWEEP_DEFAULTS)  # validates, naming bad values by their flags
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {str(k).replace("-", "_") for k in (load_config_file(args.config) if args.config else {})}
    given |= {k for k in vars(ns) if k in fields}
    if args.out:
        check_writable(args.out, folder=True)
    res = sweep_grid({k: getattr(config, k) for k in given}, widths=args.widths, experts=args.experts,
                     seeds=args.seeds, out=args.out, plot=args.plot, keep_weights=args.keep_weights,
                     progress=args.progress)
    if not is_main_process():
        return 0
    print(f"{'width':>6} {'experts':>7} {'params':>10} {'MADDs':>9} {'top-1 mean ± std':>18}  per seed")
    for r in res.summary:
        print(f"{r['width']:>6g} {r['experts']:>7d} {r['params']:>10,d} {r['madds_m']:>8.2f}M "
              f"{r['top1_mean']:>9.2f} ± {r['top1_std']:<5.2f}  {r['top1_per_seed']}")
    print(f"{res.trained} run(s) trained, {res.skipped} already done, {res.seconds:.0f}s")
    print(f"results: {res.runs_csv}  summary: {res.summary_csv}" + (f"  figure: {res.figure}" if res.figure else ""))
    size, files = folder_summary(res.runs_csv.parent)
    print(f"{res.runs_csv.parent}: {size / 2**20:.1f} MB in {files} files (runs/<run>/ holds each run's weights, "
          "logs and config; --no-keep-weights drops the weights)")
    return 0
