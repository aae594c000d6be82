"""How long `condconv.export_model` takes: ONNX with a dynamic batch (dynamo exporter), 224x224, per zoo model.

    # every preset of the three papers (the default)
    python benchmarks/export_times.py --out benchmarks/results/export-times
    # base models with every conv kind, every block dynamic (the heaviest graphs)
    python benchmarks/export_times.py --models resnet50 mobilenet_v2 efficientnet_b0 --convs condconv dynamic odconv \
        --dynamic-blocks all --out benchmarks/results/export-times-all

Each export is timed once (wall clock, including the exporter's own optimisation and the file write) and its file
is run by onnxruntime at batch 1 and 3 and compared with the model in float64, beside float32 PyTorch's own
difference to float64 (both relative to the largest output). Writes OUT.md and prints it.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from condconv.deploy.export import export_model, load_exported
from condconv.models import create_model, list_models
from condconv.nn.layers import DYNAMIC_KINDS

PRESET_PATTERNS = ("condconv_*", "dy_*", "odconv_*")


def _differences(path: Path, model: torch.nn.Module) -> tuple[float, float]:
    """Largest difference to the model in float64 of the exported file and of the float32 model itself, each
    relative to the largest float64 output, at batch 1 and 3. (Untrained models with the papers' initialisation
    reach activations of 1e5-1e7 with BatchNorm at its initial statistics, so absolute differences mean little.)"""
    run = load_exported(path)
    exported = own = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref32 = model(x).double()
            ref64 = copy.deepcopy(model).double()(x.double())
        scale = float(ref64.abs().max())
        exported = max(exported, float((run(x).double() - ref64).abs().max()) / scale)
        own = max(own, float((ref32 - ref64).abs().max()) / scale)
    if exported > 10 * own + 1e-5:
        raise RuntimeError(f"{path}: the exported file is further from float64 ({exported:.1e}) than float32 "
                           f"PyTorch ({own:.1e})")
    return exported, own


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="zoo names (default: every preset of the papers)")
    p.add_argument("--convs", nargs="+", default=None, choices=DYNAMIC_KINDS,
                   help="conv kinds to build each model with (default: the preset's own)")
    p.add_argument("--dynamic-blocks", default=None, help="with --convs: 'all' or a number of final blocks")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/export-times")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models or [n for pattern in PRESET_PATTERNS for n in list_models(pattern)]
    blocks = args.dynamic_blocks
    if blocks is not None and blocks.isdigit():
        blocks = int(blocks)
    lines = ["| model | conv | export s | onnxruntime vs float64 | float32 PyTorch vs float64 |",
             "|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for conv in args.convs or [None]:
                kwargs = {} if conv is None else {"conv": conv, "dynamic_blocks": blocks}
                model = create_model(name, **kwargs).eval()
                path = Path(tmp) / f"{name}.onnx"
                start = time.perf_counter()
                export_model(model, path, "onnx", (3, 224, 224), exporter="dynamo")
                seconds = time.perf_counter() - start
                error, own = _differences(path, model)
                label = (conv or "preset") + ("" if blocks is None else f", blocks={blocks}")
                lines.append(f"| {name} | {label} | {seconds:.1f} | {error:.1e} | {own:.1e} |")
                print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    header = (f"torch {torch.__version__}, {args.threads} thread(s); command: python benchmarks/export_times.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}\n\n")
    Path(args.out + ".md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
