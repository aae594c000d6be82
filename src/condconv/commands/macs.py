"""``condconv macs``: per-image multiply-adds and parameters of registered models (the papers' tables by default)."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from condconv._checks import parse_kwargs
from condconv.fileio import atomic_output, check_writable
from condconv.layers import DYNAMIC_KINDS
from condconv.models import create_model
from condconv.profile import CATEGORIES, PAPER_FIGURES, PaperFigure, count_macs

HELP = "per-image multiply-adds and parameters of registered models"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="registered model names (default: the paper's table, compared with its figures)")
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
    parser.add_argument("--modules", type=int, default=0, metavar="N",
                        help="also print the N costliest modules of each configuration")


def _configs(args: argparse.Namespace) -> list[tuple[str, float, int, PaperFigure | None]]:
    if not args.models:
        if args.experts is not None or args.width is not None:
            raise ValueError("--experts and --width need MODEL names (without them the paper's table is printed)")
        paper = args.input_size == 224 and args.num_classes == 1000
        return [(f.model, 1.0, f.experts, f if paper else None) for f in PAPER_FIGURES]
    experts = args.experts if args.experts is not None else [1, 8]
    if any(e < 1 for e in experts):
        raise ValueError(f"--experts must be positive ints, got {experts}")
    widths = args.width if args.width is not None else [1.0]
    return [(m, w, e, None) for m in args.models for w in widths for e in experts]


def _millions(value: float) -> str:
    return f"{value / 1e6:.2f}M"


def run(args: argparse.Namespace) -> int:
    if args.input_size < 1 or args.num_classes < 1:
        raise ValueError(f"--input-size and --num-classes must be positive, got {args.input_size}, "
                         f"{args.num_classes}")
    configs = _configs(args)
    if args.csv is not None:
        check_writable(args.csv)
    extra = parse_kwargs(args.model_kwargs)
    clash = sorted(set(extra) & {"width_mult", "num_classes", "conv", "num_experts"})
    if clash:
        raise ValueError(f"--model-kwargs must not set {clash}: use --width, --num-classes, --conv, --experts")
    rows = []
    for name, width, experts, figure in tqdm(configs, desc="counting", leave=False, disable=None):
        kwargs = {"width_mult": width, "num_classes": args.num_classes}
        if experts > 1:
            kwargs.update(extra, conv=args.conv, num_experts=experts)
        else:  # the static baseline: placement options mean nothing, layer options do not apply
            kwargs.update({k: v for k, v in extra.items() if k != "conv_kwargs"})
        with torch.device("meta"):  # shapes only: no weights are allocated
            model = create_model(name, **kwargs)
        report = count_macs(model, (3, args.input_size, args.input_size))
        row = {"model": name, "width": width, "experts": experts, "conv": args.conv if experts > 1 else "static",
               "params": report.params, "macs": report.macs}
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
        with atomic_output(args.csv) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        logger.info("wrote %s", args.csv)
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
