"""``condconv macs``: per-image multiply-adds and parameters of registered models (the papers' tables by default)."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from condconv.cli.commands.options import non_negative_int
from condconv.models import create_model
from condconv.models.kernelwarehouse import KW_PRESETS
from condconv.models.macs import CATEGORIES, CONVENTIONS, PAPER_CONVENTIONS, PAPER_FIGURES, PaperFigure, count_macs
from condconv.models.papers import paper_table
from condconv.models.presets import PAPERS, list_presets
from condconv.nn.layers import DYNAMIC_KINDS
from condconv.utils.checks import parse_kwargs
from condconv.utils.fileio import atomic_output, check_writable

HELP = "per-image multiply-adds and parameters of registered models"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="registered model names or paper presets (default: the CondConv paper's table, compared "
                             "with its figures)")
    parser.add_argument("--paper", choices=PAPERS, default=None,
                        help="print a paper's table: every preset of that paper, the paper's figures beside this "
                             "library's counts under the paper's counting convention")
    parser.add_argument("--convention", choices=CONVENTIONS, default=None,
                        help="counting convention (default: 'default'; with --paper, the paper's)")
    parser.add_argument("--experts", type=int, nargs="+", default=None, metavar="E",
                        help="expert counts; 1 is the static baseline (default with MODEL: 1 8)")
    parser.add_argument("--width", type=float, nargs="+", default=None, metavar="W",
                        help="width multipliers (default 1.0)")
    parser.add_argument("--input-size", type=int, default=224, metavar="S", help="square input size (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--conv", default="condconv", choices=DYNAMIC_KINDS,
                        help="kind of the dynamic layers when experts > 1 (default condconv)")
    parser.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=None,
                        help="more create_model arguments (YAML values), e.g. dynamic_blocks=6 shared_routing=false")
    parser.add_argument("--csv", type=Path, default=None, metavar="PATH", help="also write the rows to a CSV file")
    parser.add_argument("--modules", type=non_negative_int, default=0, metavar="N",
                        help="also print the N costliest modules of each configuration (default 0: none)")


KW_PRESET_NAMES = frozenset(p.name for p in KW_PRESETS)  # KernelWarehouse presets: fixed like the papers'


def _configs(args: argparse.Namespace) -> list[tuple[str, float, int, PaperFigure | None]]:
    presets = [m for m in args.models if m in list_presets() or m in KW_PRESET_NAMES]
    if presets and (args.experts is not None or args.width is not None or args.model_kwargs):
        raise ValueError(f"{presets[0]} is a paper preset (fixed architecture): --experts, --width and --model-kwargs "
                         "apply to plain model names")
    if not args.models:
        if args.experts is not None or args.width is not None:
            raise ValueError("--experts and --width need MODEL names (without them the paper's table is printed)")
        paper = args.input_size == 224 and args.num_classes == 1000
        return [(f.model, 1.0, f.experts, f if paper else None) for f in PAPER_FIGURES]
    experts = args.experts if args.experts is not None else [1, 8]
    if any(e < 1 for e in experts):
        raise ValueError(f"--experts must be positive ints, got {experts}")
    widths = args.width if args.width is not None else [1.0]
    grid = [(w, e) for w in widths for e in experts]
    return [(m, w, e, None) for m in args.models for w, e in ([(1.0, 0)] if m in presets else grid)]


def _millions(value: float) -> str:
    return f"{value / 1e6:.2f}M"


def _build(name: str, width: float, experts: int, args: argparse.Namespace, extra: dict):
    """The configuration on the meta device (shapes only: no weights are allocated)."""
    kwargs = {"num_classes": args.num_classes}
    if experts == 0:  # a paper preset, as published
        pass
    elif experts > 1:
        kwargs.update(extra, width_mult=width, conv=args.conv, num_experts=experts)
    else:  # the static baseline: placement options mean nothing, layer options do not apply
        kwargs.update({k: v for k, v in extra.items() if k != "conv_kwargs"}, width_mult=width)
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %s", path)


def run(args: argparse.Namespace) -> int:
    if args.input_size < 1 or args.num_classes < 1:
        raise ValueError(f"--input-size and --num-classes must be positive, got {args.input_size}, "
                         f"{args.num_classes}")
    if args.csv is not None:
        check_writable(args.csv)
    if args.paper is not None:
        return _run_paper(args)
    configs = _configs(args)
    extra = parse_kwargs(args.model_kwargs)
    clash = sorted(set(extra) & {"width_mult", "num_classes", "conv", "num_experts"})
    if clash:
        raise ValueError(f"--model-kwargs must not set {clash}: use --width, --num-classes, --conv, --experts")
    rows = []
    for name, width, experts, figure in tqdm(configs, desc="counting", leave=False, disable=None):
        model = _build(name, width, experts, args, extra)
        report = count_macs(model, (3, args.input_size, args.input_size), convention=args.convention or "default")
        conv = "preset" if experts == 0 else args.conv if experts > 1 else "static"
        row = {"model": name, "width": width, "experts": experts or "", "conv": conv, "params": report.params,
               "macs": report.macs}
        row.update({f"{cat}_macs": cost.macs for cat, cost in report.categories.items()})
        row.update({f"{cat}_params": cost.params for cat, cost in report.categories.items()})
        if figure is not None:
            row.update(paper_macs=figure.macs * 1e6,
                       paper_params=None if figure.params is None else figure.params * 1e6, note=figure.note)
        rows.append(row)
        if args.modules:
            print(f"\n{name} width {width} experts {experts}:\n{report.table(args.modules)}\n")
    _print_table(rows)
    if args.csv is not None:
        _write_csv(args.csv, rows)
    return 0


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def _run_paper(args: argparse.Namespace) -> int:
    """``--paper NAME``: every preset of the paper with its published figures beside this library's counts."""
    if args.models or args.experts is not None or args.width is not None or args.model_kwargs:
        raise ValueError("--paper prints a paper's whole table: it takes no MODEL, --experts, --width or "
                         "--model-kwargs")
    if args.input_size != 224 or args.num_classes != 1000:
        raise ValueError("--paper compares with figures for 224x224 inputs and 1000 classes: drop --input-size and "
                         "--num-classes")
    convention = args.convention or PAPER_CONVENTIONS[args.paper]
    rows = paper_table(args.paper, convention=convention)
    header = ["preset", "params", "paper", "diff", "MACs", "paper", "diff", "rule", "within 0.5% / 2%"]
    table = []
    for r in rows:
        macs = r["compared_macs"]
        paper_params = "-" if r["paper_params"] is None else f"{r['paper_params']:g}M"
        paper_macs = "-" if r["paper_macs"] is None else f"{r['paper_macs']:g}M"
        verdict = "yes" if r["reproduced"] else "no: documented" if r["documented_deviation"] else "NO"
        table.append([r["preset"], _millions(r["params"]), paper_params, _percent(r["params_diff"]), _millions(macs),
                      paper_macs, _percent(r["macs_diff"]), r["rule"], verdict])
    print(f"{args.paper} paper, counted under the '{convention}' convention (224x224, 1000 classes)")
    _print_aligned(header, table)
    for note in dict.fromkeys(r["note"] for r in rows if r["note"]):
        print(f"note: {note}")
    if args.csv is not None:
        _write_csv(args.csv, [{k: v for k, v in r.items() if k != "documented_deviation"} for r in rows])
    return 0


def _print_table(rows: list[dict]) -> None:
    paper = "paper_macs" in rows[0]
    header = ["model", "width", "experts", "params", "MACs", "conv", "routing", "mixing", "other"]
    if paper:
        header += ["paper MACs", "diff", "paper params", "diff"]
    table = []
    for r in rows:
        line = [r["model"], str(r["width"]), str(r["experts"]), _millions(r["params"]), _millions(r["macs"])]
        line += [_millions(r[f"{cat}_macs"]) for cat in CATEGORIES]
        if paper:
            line += [f"{r['paper_macs'] / 1e6:g}M", f"{100 * (r['macs'] / r['paper_macs'] - 1):+.2f}%"]
            if r["paper_params"] is None:
                line += ["-", "-"]
            else:
                line += [f"{r['paper_params'] / 1e6:g}M", f"{100 * (r['params'] / r['paper_params'] - 1):+.2f}%"]
        table.append(line)
    _print_aligned(header, table)
    for r in rows:
        if r.get("note"):
            config = "static" if r["experts"] == 1 else f"{r['experts']} experts"
            print(f"note: {r['model']} {config}: {r['note']}")
    for model in dict.fromkeys(r["model"] for r in rows):
        _print_grid(model, [r for r in rows if r["model"] == model])


def _print_aligned(header: list[str], table: list[list[str]]) -> None:
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    for line in [header, *table]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


def _print_grid(model: str, rows: list[dict]) -> None:
    """Width x experts grid of one model: MACs, and the increase over the static model of the same width."""
    widths = list(dict.fromkeys(r["width"] for r in rows))
    experts = list(dict.fromkeys(r["experts"] for r in rows))
    if len(widths) < 2 or len(experts) < 2:
        return
    cost = {(r["width"], r["experts"]): r for r in rows}
    table = []
    for width in widths:
        base = cost.get((width, 1))
        line = [f"{model} {width}x"]
        for e in experts:
            macs = cost[width, e]["macs"]
            line.append(_millions(macs) + (f" ({100 * (macs / base['macs'] - 1):+.1f}%)" if base and e > 1 else ""))
        table.append(line)
    print("\nMACs by width (rows) and experts (columns); in brackets: the increase over the static model")
    _print_aligned(["model", *(f"E={e}" for e in experts)], table)
