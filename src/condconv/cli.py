"""The ``condconv`` command line: ``condconv train|eval|sweep|routing|macs|bench|export``.

Each subcommand lives in the tool module that implements it; that module provides two functions,
``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int``. This file only wires them together, so the
tools never import the CLI (data flows one way: engine <- layers <- models <- tools <- cli).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "build_parser"]

# (command, module, one-line help)
_COMMANDS: list[tuple[str, str, str]] = [
    ("train", "condconv.train", "train a registered model (embedded digits by default, CIFAR, ImageFolder)"),
    ("eval", "condconv.train", "evaluate a checkpoint: top-1/top-5, loss, per-class accuracy, images/s"),
    ("sweep", "condconv.sweep", "width x experts grid -> CSV + MACs-vs-accuracy figure"),
    ("routing", "condconv.sweep", "mean routing weights per class for each dynamic layer -> heatmap PNG"),
    ("macs", "condconv.profile", "per-image multiply-adds and parameters of registered models"),
    ("bench", "condconv.bench", "latency of dynamic layers per execution strategy vs a static convolution"),
    ("export", "condconv.export", "export a model or checkpoint to ONNX / TorchScript / ExportedProgram"),
    ("convert", "condconv.convert", "convert the Conv2d layers of a registered model or checkpoint"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="condconv",
        description="Conditionally parameterized convolutions: train, evaluate, sweep, count, benchmark, export.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a tool module not written yet must not break the others
            if exc.name != module_name:
                raise
            continue
        add = getattr(module, f"add_{name}_arguments", None)
        run = getattr(module, f"run_{name}", None)
        if add is None or run is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        code = args._run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"condconv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
