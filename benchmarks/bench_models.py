"""Model benchmark: the README's deployment table. Same as `condconv bench models`, plus CSV + Markdown files.

    # the deployment table: batch 1, one thread, eager PyTorch and onnxruntime (fp32 and int8)
    python benchmarks/bench_models.py --threads 1 --batch 1 --onnx --int8 --out benchmarks/results/models-cpu-b1
    # the GPU-kernel table (on a CUDA machine): inference B=256, a training step B=128, bf16 autocast, channels_last
    python benchmarks/bench_models.py --device cuda --models gpu --batch 256 --train-batch 128 --out ...-gpu
    # a batch-1 latency row with and without torch.compile(mode='reduce-overhead') on CUDA
    python benchmarks/bench_models.py --device cuda --models gpu --batch 1 --compile --out ...-gpu-b1

Writes OUT.csv (every measurement) and OUT.md (the tables: median time / the static twin's median, same rounds).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from condconv.bench.layers import write_csv
from condconv.bench.models import MODES, bench_models, format_model_table
from condconv.cli.commands.options import positive_int
from condconv.nn.functional import STRATEGIES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cpu"], help="sets (cpu, gpu) or MODEL:CONV:EXPERTS[:BLOCKS]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1])
    p.add_argument("--train-batch", type=positive_int, nargs="*", default=[])
    p.add_argument("--strategies", nargs="+", default=["auto"], choices=STRATEGIES)
    p.add_argument("--onnx", action="store_true")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=positive_int, default=7)
    p.add_argument("--budget", type=float, default=5.0)
    p.add_argument("--out", default="benchmarks/results/models")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench_models(args.models, device=args.device, batch_sizes=args.batch, train_batch_sizes=args.train_batch,
                        strategies=args.strategies, onnx=args.onnx, int8=args.int8, compile=args.compile,
                        min_rounds=args.rounds, budget_s=args.budget)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_csv(rows, args.out + ".csv")
    preload = os.environ.get("LD_PRELOAD", "") or "glibc malloc"
    with open(args.out + ".md", "w") as fh:
        fh.write(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}, allocator: {preload}; "
                 f"command: python benchmarks/bench_models.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
        for mode, batches in zip(MODES, (args.batch, args.train_batch)):
            for b in batches:
                fh.write("\n" + format_model_table(rows, mode, b) + "\n")
    print(open(args.out + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
