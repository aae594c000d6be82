"""``condconv bench``: latency of dynamic layers per execution strategy against a static convolution."""

from __future__ import annotations

import argparse

import torch

from condconv.bench import BENCH_SHAPES, STRATEGY_CANDIDATES, bench_layers, format_table, write_csv
from condconv.commands.options import add_force_argument, new_output, positive_int
from condconv.layers import DYNAMIC_KINDS

HELP = "latency of dynamic layers per execution strategy vs a static convolution"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default="layers", choices=["layers"],
                        help="what to benchmark (default: layers)")
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[4, 8], help="expert counts (default: 4 8)")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8, 32, 128], help="batch sizes")
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--shapes", nargs="+", default=None, metavar="INDEX",
                        help="subset of shapes by index: " + ", ".join(f"{i}={s.name}" for i, s in
                                                                        enumerate(BENCH_SHAPES)))
    parser.add_argument("--kinds", nargs="+", default=list(DYNAMIC_KINDS), choices=DYNAMIC_KINDS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_CANDIDATES), choices=STRATEGY_CANDIDATES,
                        help="CondConv2d strategies to time (other kinds run 'auto')")
    parser.add_argument("--reference-loop", action="store_true",
                        help="also time the per-example loop of the ODConv reference code")
    parser.add_argument("--seed-loop", dest="reference_loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="minimum timing rounds per configuration")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of rounds per configuration, at least")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    add_force_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.csv:
        new_output(args.csv, args.force)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = BENCH_SHAPES
    if args.shapes:
        try:
            shapes = tuple(BENCH_SHAPES[int(i)] for i in args.shapes)
        except (ValueError, IndexError) as exc:
            raise ValueError(f"--shapes takes indices 0..{len(BENCH_SHAPES) - 1}, got {args.shapes}") from exc
    rows = bench_layers(shapes, args.experts, args.batch, args.modes, args.kinds, args.strategies,
                        reference_loop=args.reference_loop, min_rounds=args.rounds, budget_s=args.budget,
                        device=args.device, dtype=getattr(torch, args.dtype))
    if args.csv:
        write_csv(rows, args.csv)
    print(f"threads={torch.get_num_threads()} device={args.device} dtype={args.dtype}; ratio = median time / "
          "median time of a static nn.Conv2d of the same shape in the same rounds" +
          (f"; CSV: {args.csv}" if args.csv else ""))
    for mode in args.modes:
        for e in args.experts:
            for b in args.batch:
                print()
                print(format_table(rows, e, b, mode))
    return 0
