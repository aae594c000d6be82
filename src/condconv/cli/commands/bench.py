"""``condconv bench layers|models``: latency of dynamic layers per execution strategy against a static convolution,
and of whole dynamic models against their static twins (eager, compiled, onnxruntime)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from condconv.bench.layers import BENCH_SHAPES, STRATEGY_CANDIDATES, bench_layers, format_table, write_csv
from condconv.cli.commands.options import add_force_argument, new_output, non_negative_float, positive_int
from condconv.nn.functional import STRATEGIES
from condconv.nn.layers import DYNAMIC_KINDS
from condconv.utils.checks import parse_kwargs
from condconv.utils.fileio import atomic_output

HELP = "latency of dynamic layers (per strategy) and models (per runtime) against static twins"

# options of one target only: (dest, flag, target)
_TARGET_ONLY = (
    ("experts", "--experts", "layers"), ("shapes", "--shapes", "layers"), ("kinds", "--kinds", "layers"),
    ("reference_loop", "--reference-loop", "layers"), ("modes", "--modes", "layers"),
    ("models", "--models", "models"), ("train_batch", "--train-batch", "models"), ("onnx", "--onnx", "models"),
    ("int8", "--int8", "models"), ("compile", "--compile", "models"), ("no_floor", "--no-floor", "models"),
    ("input_size", "--input-size", "models"), ("markdown", "--markdown", "models"),
    ("model_kwargs", "--model-kwargs", "models"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default="layers", choices=["layers", "models"],
                        help="what to benchmark (default: layers)")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=None,
                        help="inference batch sizes (default: 1 8 32 128 for layers, 1 for models)")
    parser.add_argument("--strategies", nargs="+", default=None, choices=STRATEGIES, metavar="STRATEGY",
                        help=f"strategies to time, of {STRATEGIES} (default: all for layers (CondConv2d; other kinds "
                             "run 'auto'), auto for models)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="minimum timing rounds per configuration")
    parser.add_argument("--budget", type=non_negative_float, default=None,
                        help="seconds of rounds per configuration, at least (default: 2 for layers, 3 for models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    add_force_argument(parser)
    layers = parser.add_argument_group("layers")
    layers.add_argument("--experts", type=positive_int, nargs="+", default=None, help="expert counts (default: 4 8)")
    layers.add_argument("--modes", nargs="+", default=None, choices=["forward", "train"])
    layers.add_argument("--shapes", nargs="+", default=None, metavar="INDEX",
                        help="subset of shapes by index: " + ", ".join(f"{i}={s.name}" for i, s in
                                                                        enumerate(BENCH_SHAPES)))
    layers.add_argument("--kinds", nargs="+", default=None, choices=DYNAMIC_KINDS)
    layers.add_argument("--reference-loop", action="store_true",
                        help="also time the per-example loop of the ODConv reference code")
    layers.add_argument("--seed-loop", dest="reference_loop", action="store_true", help=argparse.SUPPRESS)
    layers.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    models = parser.add_argument_group("models")
    models.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="model sets (cpu: the deployment table, gpu: the GPU-kernel table) or "
                             "MODEL:CONV:EXPERTS[:BLOCKS] (e.g. resnet50:odconv:4:all); default: cpu")
    models.add_argument("--train-batch", type=positive_int, nargs="+", default=None, metavar="B",
                        help="also time an SGD training step at these batch sizes")
    models.add_argument("--onnx", action="store_true",
                        help="also onnxruntime (one thread) on the exported files (CPU inference)")
    models.add_argument("--int8", action="store_true", help="with --onnx: also the int8 (quantized) files")
    models.add_argument("--compile", action="store_true",
                        help="also torch.compile (mode='reduce-overhead' on CUDA) of the static and auto models")
    models.add_argument("--no-floor", action="store_true", help="skip the 'mixing floor' rows")
    models.add_argument("--input-size", type=positive_int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="input size (default: 3 224 224)")
    models.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE",
                        help="more create_model arguments for every model, e.g. width_mult=0.5")
    models.add_argument("--markdown", default=None, metavar="PATH", help="also write the tables to this file")


def _check_target_options(args: argparse.Namespace) -> None:
    for dest, option, target in _TARGET_ONLY:
        value = getattr(args, dest)
        if target != args.target and value not in (None, False):
            raise ValueError(f"{option} is an option of 'condconv bench {target}', not of 'bench {args.target}'")


def run(args: argparse.Namespace) -> int:
    _check_target_options(args)
    for path in (args.csv, getattr(args, "markdown", None)):
        if path:
            new_output(path, args.force)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_models(args) if args.target == "models" else _run_layers(args)
    finally:  # a caller in the same process (tests, notebooks) keeps its own thread count
        torch.set_num_threads(threads)


def _run_layers(args: argparse.Namespace) -> int:
    shapes = BENCH_SHAPES
    if args.shapes:
        try:
            shapes = tuple(BENCH_SHAPES[int(i)] for i in args.shapes)
        except (ValueError, IndexError) as exc:
            raise ValueError(f"--shapes takes indices 0..{len(BENCH_SHAPES) - 1}, got {args.shapes}") from exc
    experts, batches = args.experts or [4, 8], args.batch or [1, 8, 32, 128]
    modes, strategies = args.modes or ["forward", "train"], args.strategies or list(STRATEGY_CANDIDATES)
    rows = bench_layers(shapes, experts, batches, modes, args.kinds or list(DYNAMIC_KINDS), strategies,
                        reference_loop=args.reference_loop, min_rounds=args.rounds,
                        budget_s=2.0 if args.budget is None else args.budget, device=args.device,
                        dtype=getattr(torch, args.dtype))
    if args.csv:
        write_csv(rows, args.csv)
    print(f"threads={torch.get_num_threads()} device={args.device} dtype={args.dtype}; ratio = median time / "
          "median time of a static nn.Conv2d of the same shape in the same rounds" +
          (f"; CSV: {args.csv}" if args.csv else ""))
    for mode in modes:
        for e in experts:
            for b in batches:
                print()
                print(format_table(rows, e, b, mode))
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from condconv.bench.models import bench_models, format_model_table

    if args.onnx and not args.device.startswith("cpu"):
        raise ValueError(f"--onnx times onnxruntime on the CPU: use --device cpu (got {args.device!r})")
    batches, train_batches = args.batch or [1], args.train_batch or []
    rows = bench_models(args.models or ["cpu"], device=args.device, batch_sizes=batches,
                        train_batch_sizes=train_batches, strategies=args.strategies or ["auto"], onnx=args.onnx,
                        int8=args.int8, compile=args.compile, floor=not args.no_floor,
                        input_size=tuple(args.input_size or (3, 224, 224)),
                        model_kwargs=parse_kwargs(args.model_kwargs), min_rounds=args.rounds,
                        budget_s=3.0 if args.budget is None else args.budget)
    if args.csv:
        write_csv(rows, args.csv)
    tables = [format_model_table(rows, "inference", b) for b in batches]
    tables += [format_model_table(rows, "train", b) for b in train_batches]
    text = (f"threads={torch.get_num_threads()} device={args.device}; ratio = median time / the static twin's median "
            "in the same rounds and runtime ('mixing floor': (static + mixing) / static)\n\n" + "\n\n".join(tables))
    if args.markdown:
        with atomic_output(args.markdown) as tmp:
            Path(tmp).write_text(text + "\n")
    print(text)
    return 0
