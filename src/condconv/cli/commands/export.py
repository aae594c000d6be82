"""``condconv export``: a registered model or a checkpoint to ONNX / TorchScript / ExportedProgram, any batch size."""

from __future__ import annotations

import argparse
from pathlib import Path

from condconv.cli.commands.options import add_force_argument, new_output, positive_int
from condconv.deploy.export import EXPORT_FORMATS, ONNX_EXPORTERS, export_model, onnx_file_opset, verify_export
from condconv.models.checkpoint import default_input_size, load_model
from condconv.utils.checks import parse_kwargs

HELP = "export a model or checkpoint to ONNX / TorchScript / ExportedProgram"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="registered model name (fresh weights, or "
                        "--weights), or a checkpoint of condconv train / convert")
    parser.add_argument("--format", "-f", default="onnx", choices=tuple(EXPORT_FORMATS),
                        help="output format (default: onnx)")
    parser.add_argument("--out", "-o", metavar="PATH", default=None,
                        help="output file (default: <run folder>/<model><suffix> for a checkpoint, "
                             "runs/exports/<model><suffix> for a registered name)")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                        help="input size (default: the checkpoint's, else 3 32 32 for *_cifar models, 3 224 224)")
    parser.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=None,
                        help="create_model arguments for a registered name, e.g. conv=condconv num_experts=4")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="state_dict (.safetensors or .pt) to load into a registered model")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--exporter", default="auto", choices=ONNX_EXPORTERS,
                        help="ONNX exporter: dynamo (needs onnxscript), torchscript, or auto (default)")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                        help="a graph fixed to N images (N=1: a plain Conv with a runtime-computed weight per dynamic "
                             "layer, for runtimes that prefer static shapes); default: any batch size")
    parser.add_argument("--static-batch", action="store_true",
                        help="fix the batch size (to --batch-size, or 2 without it; kept for older scripts)")
    parser.add_argument("--verify", action="store_true",
                        help="run the exported model (onnxruntime for ONNX) at batch sizes 1, 3 and 8 against PyTorch")
    parser.add_argument("--verify-batch-sizes", type=positive_int, nargs="+", default=[1, 3, 8], metavar="B",
                        help="batch sizes of --verify (default: 1 3 8)")
    add_force_argument(parser)


def _default_out(source: str, model: str, suffix: str) -> Path:
    """Next to a checkpoint (in its run folder), else under ``runs/exports/``: never the current folder."""
    path = Path(source)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        if folder.name.startswith("step-") and folder.parent.name == "checkpoints":
            folder = folder.parent.parent
        return folder / f"{Path(model).name}{suffix}"
    return Path("runs") / "exports" / f"{Path(model).name}{suffix}"


def run(args: argparse.Namespace) -> int:
    model, config = load_model(args.model, parse_kwargs(args.model_kwargs), args.weights)
    size = tuple(args.input_size) if args.input_size else default_input_size(config["model"], config)
    out = Path(args.out) if args.out else _default_out(args.model, str(config["model"]), EXPORT_FORMATS[args.format])
    new_output(out, args.force)
    static = args.static_batch or args.batch_size is not None
    batch = (args.batch_size or 2) if static else None
    path = export_model(model, out, args.format, size, args.opset, batch_size=batch, dynamic_batch=not static,
                        exporter=args.exporter)
    opset = f", ONNX opset {onnx_file_opset(path)}" if args.format == "onnx" else ""  # what the file declares
    print(f"exported {config['model']} ({'x'.join(map(str, size))} inputs, "
          f"{'batch ' + str(batch) if static else 'any batch'}{opset}) to {path} "
          f"({path.stat().st_size / 2**20:.2f} MB)")
    if args.verify:
        sizes = [batch] if static else args.verify_batch_sizes
        errors = verify_export(path, model, size, sizes, format=args.format)
        print("verified against PyTorch: " + ", ".join(f"batch {b}: max |diff| {e:.2e}" for b, e in errors.items()))
    return 0
