"""``condconv import``: a downloaded weights file (official ODConv checkpoint, timm state_dict, ...) to a condconv run
folder: checked against the named model, written as ``model.safetensors`` with its config (and the source's
evaluation preprocessing), so that ``eval``, ``routing``, ``export``, ``train --init`` and ``bench`` take it."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from condconv.cli.commands.options import add_force_argument, new_output
from condconv.models import create_model
from condconv.models.checkpoint import load_checkpoint, save_weights
from condconv.models.pretrained import eval_config, load_pretrained, published, read_pretrained
from condconv.models.registry import resolve_name
from condconv.utils.checks import parse_kwargs
from condconv.utils.fileio import atomic_write_text

HELP = "import a downloaded weights file (official ODConv, timm) into a condconv run folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="NAME", help="registered model (or timm alias) the file belongs to, e.g. "
                        "odconv_resnet18_4x or tf_efficientnet_cc_b0_8e")
    parser.add_argument("file", metavar="FILE", help="the downloaded file (.pth.tar, .pth, .bin, .safetensors)")
    parser.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=None,
                        help="create_model arguments (e.g. width_mult=0.75 for a MobileNetV2 baseline)")
    parser.add_argument("--out", "-o", metavar="DIR", required=True, help="output run folder")
    add_force_argument(parser)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(args: argparse.Namespace) -> int:
    model_kwargs = parse_kwargs(args.model_kwargs)
    file = read_pretrained(args.file)
    model = load_pretrained(create_model(args.model, **model_kwargs), file, name=args.model).eval()
    new_output(args.out, args.force, folder=True)
    out = Path(args.out)
    cfg = eval_config(args.model)
    source = {"file": str(file.path), "sha256": _sha256(file.path), "format": file.format.name,
              "layout": file.layout.name if file.layout else None, "looks_like": file.describe(),
              "published": [asdict(row) | {"eval": asdict(row.eval)} for row in published(args.model)]}
    config = {"model": resolve_name(args.model), "model_args": model_kwargs, "num_classes": model.num_classes,
              "in_chans": 3, "image_size": cfg.image_size, "dataset": "imagefolder", "mean": list(cfg.mean),
              "std": list(cfg.std), "preprocess": asdict(cfg), "imported_from": source}
    weights = save_weights(model, out / "model.safetensors", config)
    again, _ = load_checkpoint(out)  # the folder rebuilds the same model
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((again(x) - model(x)).abs().max())
    if diff != 0.0:
        raise RuntimeError(f"the imported run folder {out} does not rebuild the model (output difference {diff:.3g})")
    atomic_write_text(out / "import.json", json.dumps(source, indent=2) + "\n")
    print(f"imported {file.describe()}\n  as {args.model} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters; outputs of the rebuilt model identical)\nweights: {weights}")
    return 0
