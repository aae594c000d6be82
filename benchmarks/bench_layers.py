"""Layer benchmark: the README's table. Same as `condconv bench layers`, plus a Markdown summary.

    python benchmarks/bench_layers.py --threads 2 --out benchmarks/results/cpu
    LD_PRELOAD=$(ls /usr/lib/*/libjemalloc.so.2) python benchmarks/bench_layers.py --threads 2 --out ...-jemalloc

Writes OUT.csv (every measurement) and OUT.md (tables of median time / static median, same rounds).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from condconv.bench.layers import BENCH_SHAPES, bench_layers, format_table, write_csv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--modes", nargs="+", default=["forward", "train"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=1.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference-loop", action="store_true",
                   help="also time the per-example loop of the ODConv reference code")
    p.add_argument("--out", default="benchmarks/results/cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench_layers(BENCH_SHAPES, args.experts, args.batch, args.modes, reference_loop=args.reference_loop,
                        min_rounds=args.rounds, budget_s=args.budget, device=args.device)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_csv(rows, args.out + ".csv")
    preload = os.environ.get("LD_PRELOAD", "") or "glibc malloc"
    with open(args.out + ".md", "w") as fh:
        fh.write(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, allocator: {preload}\n")
        for mode in args.modes:
            for e in args.experts:
                for b in args.batch:
                    fh.write("\n" + format_table(rows, e, b, mode) + "\n")
    print(open(args.out + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
