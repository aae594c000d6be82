"""``condconv train``: train a registered model (the embedded digits by default, CIFAR, ImageFolder trees)."""

from __future__ import annotations

import argparse

from condconv.commands.options import add_training_options, config_from_args
from condconv.runtime import is_main_process
from condconv.train import train_model

HELP = "train a registered model (embedded digits by default, CIFAR, ImageFolder)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML file of options (flags given here override "
                        "it)")
    add_training_options(parser)


def run(args: argparse.Namespace) -> int:
    config, explicit = config_from_args(args)
    result = train_model(config, explicit=explicit)
    c = result.config
    if is_main_process():
        print(f"{c['model']} ({c['conv']}, experts={c['experts']}, width={c['width']}) on {c['dataset']}: "
              f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  params {result.params:,}  "
              f"steps {result.steps}  {result.seconds:.1f}s\nweights: {result.checkpoint}")
    return 0
