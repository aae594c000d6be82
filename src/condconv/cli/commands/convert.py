"""``condconv convert``: turn the Conv2d layers of a registered model or a checkpoint into dynamic convolutions,
check that the outputs are unchanged, and write a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from condconv.cli.commands.options import add_force_argument, new_output, positive_int
from condconv.models.checkpoint import default_input_size, load_model, save_weights
from condconv.nn.convert import conversion_spec, convert, list_convs, select_convs
from condconv.nn.layers import DYNAMIC_KINDS
from condconv.utils.checks import parse_kwargs, seed_value
from condconv.utils.fileio import atomic_write_text

HELP = "convert the Conv2d layers of a registered model or checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="registered model name, or a checkpoint (run folder, "
                        "checkpoint folder or model.safetensors) of condconv train / convert")
    parser.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=None,
                        help="create_model arguments for a registered name, e.g. num_classes=10 width_mult=0.5")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="pretrained state_dict (.safetensors or .pt) to load into a registered model first")
    parser.add_argument("--conv", default="condconv", choices=DYNAMIC_KINDS,
                        help="layer to convert to (default: condconv)")
    parser.add_argument("--experts", "-e", type=positive_int, default=None,
                        help="experts per converted layer (default: the layer's, 8 condconv / 4 dynamic, odconv)")
    parser.add_argument("--include", action="append", metavar="PATTERN", default=None,
                        help="fnmatch pattern of module names to convert, repeatable (default: the last third of the "
                             "convolutions); a parent name ('layer4') selects the convolutions inside it")
    parser.add_argument("--exclude", action="append", metavar="PATTERN", default=None,
                        help="fnmatch pattern of module names to keep static, repeatable")
    parser.add_argument("--perturb", type=float, default=0.01,
                        help="relative zero-mean expert noise so experts diverge in fine-tuning; the output is "
                             "unchanged (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the expert noise (default: 0)")
    parser.add_argument("--layer-kwargs", nargs="*", metavar="KEY=VALUE", default=None,
                        help="more layer arguments, e.g. routing=softmax temperature=30 reduction=4")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                        help="input size of the output check (default: the checkpoint's, or 3 32 32 for *_cifar "
                             "models, else 3 224 224)")
    parser.add_argument("--list", action="store_true",
                        help="only list the model's Conv2d layers and which ones would be converted")
    parser.add_argument("--out", "-o", metavar="DIR", default=None,
                        help="output folder: model.safetensors (fine-tune or evaluate it like a condconv train "
                             "checkpoint) and convert.json")
    add_force_argument(parser)


def run(args: argparse.Namespace) -> int:
    seed_value(args.seed, "seed")  # before any work: the flag named, not the generator's message
    model, config = load_model(args.model, parse_kwargs(args.model_kwargs), args.weights)
    layer_kwargs = parse_kwargs(args.layer_kwargs, "--layer-kwargs")
    if args.list:
        selected = set(select_convs(model, args.include, args.exclude))
        for name in list_convs(model):
            conv = model.get_submodule(name)
            shape = (f"{conv.in_channels}->{conv.out_channels} k{'x'.join(map(str, conv.kernel_size))} "
                     f"s{conv.stride[0]} g{conv.groups}")
            print(f"{'*' if name in selected else ' '} {name:40s} {shape}")
        print(f"{len(selected)} of {len(list_convs(model))} Conv2d layers selected (*)")
        return 0
    if not args.out:
        raise ValueError("--out DIR is required (or --list)")
    new_output(args.out, args.force, folder=True)
    converted, names = convert(model, args.conv, args.experts, args.include, args.exclude, perturb=args.perturb,
                               seed=args.seed, **layer_kwargs)
    c, h, w = args.input_size or default_input_size(config["model"], config)
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(x), converted(x)
    diff = float((out - ref).abs().max())
    scale = float(ref.abs().max())
    if not diff <= 1e-4 * max(scale, 1.0):
        raise RuntimeError(f"converted model's output differs from the original by {diff:.3g} (scale {scale:.3g})")

    new_config = dict(config)
    specs = config.get("convert") or []
    new_config["convert"] = ([specs] if isinstance(specs, dict) else list(specs)) + [
        conversion_spec(args.conv, args.experts, names, **layer_kwargs)]
    out = Path(args.out)
    weights = save_weights(converted, out / "model.safetensors", new_config)
    params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in converted.parameters()))
    report = {"source": args.model, "conv": args.conv, "num_experts": args.experts, "layers": names,
              "perturb": args.perturb, "seed": args.seed, "input_size": [c, h, w], "max_abs_diff": diff,
              "params_before": params[0], "params_after": params[1]}
    atomic_write_text(out / "convert.json", json.dumps(report, indent=2) + "\n")
    print(f"converted {len(names)} Conv2d layers of {config['model']} to {args.conv} "
          f"(params {params[0]:,} -> {params[1]:,}); max |output difference| {diff:.2e} on {c}x{h}x{w} inputs\n"
          f"weights: {weights}")
    return 0
