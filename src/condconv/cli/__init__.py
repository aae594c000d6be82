"""The ``condconv`` command line: ``condconv train|eval|import|sweep|routing|macs|bench|export|convert``.

Each subcommand is a module of :mod:`condconv.cli.commands` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; this file is the entry point, the table that wires them, and the one place that turns errors
into one-line messages. It imports neither torch nor the library: :func:`main` imports only the module of the
subcommand it runs, so ``condconv --help`` and ``condconv --version`` answer at once (:data:`SUMMARIES` holds the
subcommands' one-line help for the list). This folder is the only one that uses argparse and the top of the import order
(utils <- nn <- models <- data <- deploy <- training <- bench <- cli).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
from collections.abc import Iterable

from condconv import __version__
from condconv.utils.checks import OptionError

__all__ = ["COMMANDS", "SUMMARIES", "build_parser", "main"]

#: (subcommand, module): every entry must import (a broken command is an error, not a missing subcommand).
COMMANDS: tuple[tuple[str, str], ...] = (
    ("train", "condconv.cli.commands.train"),
    ("eval", "condconv.cli.commands.eval"),
    ("import", "condconv.cli.commands.import_weights"),
    ("sweep", "condconv.cli.commands.sweep"),
    ("routing", "condconv.cli.commands.routing"),
    ("macs", "condconv.cli.commands.macs"),
    ("bench", "condconv.cli.commands.bench"),
    ("export", "condconv.cli.commands.export"),
    ("convert", "condconv.cli.commands.convert"),
)

#: Each subcommand's ``HELP``, for ``condconv --help`` without importing the command modules (a test keeps them equal).
SUMMARIES: dict[str, str] = {
    "train": "train a registered model (embedded digits by default, CIFAR, ImageFolder)",
    "eval": "evaluate a checkpoint or a published model file: top-1/top-5, loss, per-class accuracy, images/s",
    "import": "import a downloaded weights file (official ODConv, timm) into a condconv run folder",
    "sweep": "width x experts grid -> CSV + MACs-vs-accuracy figure",
    "routing": "mean routing weights per class for each dynamic layer -> heatmap PNG",
    "macs": "per-image multiply-adds and parameters of registered models",
    "bench": "latency of dynamic layers (per strategy) and models (per runtime) against static twins",
    "export": "export a model or checkpoint to ONNX / TorchScript / ExportedProgram",
    "convert": "convert the Conv2d layers of a registered model or checkpoint",
}

# third-party loggers that are noisy at DEBUG/INFO level: kept at WARNING even with --verbose
_QUIET_LOGGERS = ("matplotlib", "PIL", "fsspec", "filelock", "urllib3", "asyncio", "onnxscript", "onnx_ir")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    # SUPPRESS: the flag works before and after the subcommand without one overwriting the other
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging from condconv, and full tracebacks on errors")
    common.add_argument("--version", action="version", version=f"condconv {__version__}")
    return common


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand.

    Args:
        commands: the subcommands whose modules are imported and whose arguments are added (default: all); the
            others are listed with their :data:`SUMMARIES` only.

    Raises:
        ImportError: a command module cannot be imported (it names the module).
    """
    wanted = None if commands is None else set(commands)
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="condconv", parents=[common], allow_abbrev=False,
        description="Conditionally parameterized convolutions: train, evaluate, sweep, count, benchmark, export.",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(_commands={})
    for name, module_name in COMMANDS:
        if wanted is not None and name not in wanted:
            sub.add_parser(name, help=SUMMARIES[name], description=SUMMARIES[name], parents=[common],
                           allow_abbrev=False)
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common],
                                 allow_abbrev=False)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
        parser.get_default("_commands")[name] = command
    return parser


def _subcommand(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (the first word that is not an option; the common options take no value)."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in SUMMARIES else None
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported by its subcommand, with the closest flags it has."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = args._commands[args.command]
        known = [s for action in command._actions for s in action.option_strings if s.startswith("--")]
        unknown = [e.split("=", 1)[0] for e in extra if e.startswith("-")]
        close = [m for u in unknown for m in difflib.get_close_matches(u, known, n=2, cutoff=0.75)]
        hint = f" (did you mean {' or '.join(dict.fromkeys(close))}?)" if close else ""
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("condconv").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _one_line(exc: BaseException) -> str:
    text = exc.with_flags() if isinstance(exc, OptionError) else str(exc)  # the CLI speaks of flags
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} (run with -v for the full message)"


def _quiet_stdout() -> None:
    """After a closed pipe (``condconv ... | head``): point stdout at the null device so that the flush at exit does
    not fail again (what Python's documentation of SIGPIPE advises)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run ``condconv`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code (2 on an error, 0 when the
    reader of the output went away, as ``condconv ... | head`` does)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _main(argv: list[str]) -> int:
    command = _subcommand(argv)
    args = _parse(build_parser(() if command is None else (command,)), argv)
    verbose = bool(getattr(args, "verbose", False))
    _setup_logging(verbose)
    try:
        code = args._run(args)
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        print(f"condconv {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, MemoryError) as exc:
        if verbose:
            raise
        print(f"condconv {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: still one line, the traceback with -v
        if verbose:
            raise
        print(f"condconv {args.command}: error: {type(exc).__name__}: {_one_line(exc)} (unexpected: run with -v for "
              "the traceback)", file=sys.stderr)
        return 2
    return int(code or 0)
