"""``condconv eval``: top-1/top-5, loss, per-class accuracy and images/s of a checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from condconv.cli.commands.options import add_checkpoint_data_arguments
from condconv.models.checkpoint import resolve_weights_path
from condconv.training.evaluate import check_run_config, evaluate_checkpoint, evaluate_pretrained
from condconv.utils.checks import OptionError, parse_kwargs
from condconv.utils.fileio import atomic_write_text, check_writable
from condconv.utils.runtime import AMP_CHOICES

HELP = "evaluate a checkpoint or a published model file: top-1/top-5, loss, per-class accuracy, images/s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_data_arguments(parser, optional_checkpoint=True)
    parser.add_argument("--model", metavar="NAME", default=None, help="a registered model (or timm alias) to load "
                        "--pretrained into, instead of a checkpoint; evaluated with its source's preprocessing")
    parser.add_argument("--pretrained", metavar="FILE", default=None, help="with --model: a downloaded weights file "
                        "(official ODConv .pth.tar, timm .pth/.safetensors, condconv's)")
    parser.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=None,
                        help="with --model: create_model arguments (e.g. width_mult=0.75)")
    parser.add_argument("--amp", default="none", choices=AMP_CHOICES, help="mixed precision (default: none)")
    parser.add_argument("--image-size", type=int, default=None, help="ImageFolder crop size (default: the "
                        "checkpoint's)")
    parser.add_argument("--accept-config-change", action="store_true",
                        help="evaluate a run folder whose config.yaml was edited in keys that may change on resume "
                             "(epochs, eval_every, ...); the weights are evaluated as they were trained")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON ('-' = stdout "
                        "only)")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is not None or args.pretrained is not None:
        if args.checkpoint is not None or args.model is None or args.pretrained is None:
            raise OptionError("model", "model NAME and pretrained FILE go together, without a checkpoint",
                              mentions=("pretrained",))
        if args.data_dir is None:
            raise OptionError("data_dir", "data_dir is needed with pretrained: the validation ImageFolder",
                              mentions=("pretrained",))
        if args.image_size is not None:
            raise OptionError("image_size", "image_size does not apply with pretrained: the model's published "
                              "preprocessing sets it", mentions=("pretrained",))
        return evaluate_pretrained(
            args.model, args.pretrained, data_dir=args.data_dir, dataset=args.dataset or "imagefolder",
            split=args.split, model_kwargs=parse_kwargs(args.model_kwargs), batch_size=args.batch_size,
            device=args.device, amp=args.amp, workers=args.workers, progress=args.progress,
        )  # fmt: skip
    if args.checkpoint is None:
        raise OptionError("checkpoint", "checkpoint missing: give one, or model NAME and pretrained FILE",
                          mentions=("model", "pretrained"))
    resolve_weights_path(args.checkpoint)  # a missing checkpoint first: it needs no output
    check_run_config(args.checkpoint, args.accept_config_change)  # an edited config.yaml: before any work
    if args.json and args.json != "-":
        check_writable(args.json)  # before the work, not after it
    return evaluate_checkpoint(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, split=args.split, batch_size=args.batch_size,
        device=args.device, amp=args.amp, workers=args.workers, image_size=args.image_size, progress=args.progress,
        accept_config_change=args.accept_config_change,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.json and args.json != "-" and args.checkpoint is None:
        check_writable(args.json)
    res = _evaluate(args)
    if args.json == "-":
        json.dump(_json_safe(res), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{res['model']} on {res['dataset']}/{res['split']} ({res['images']} images)")
    print(f"  top-1 {res['top1']:.2f}%   top-{res['top_k']} {res['top5']:.2f}%   loss {res['loss']:.4f}   "
          f"{res['images_per_s']:.0f} images/s (model)")
    pcs = list(zip(res["classes"], res["per_class_accuracy"], res["per_class_count"]))
    if len(pcs) <= 20:
        print("  per-class accuracy: " + "  ".join(f"{c}: {a:.1f}% ({n})" for c, a, n in pcs))
    else:
        valid = sorted((a, c) for c, a, n in pcs if n > 0)
        print("  lowest per-class accuracy: " + ", ".join(f"{c} {a:.1f}%" for a, c in valid[:5]))
    if args.json:
        atomic_write_text(args.json, json.dumps(_json_safe(res), indent=2))
        print(f"  written: {args.json}")
    return 0
