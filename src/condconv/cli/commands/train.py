"""``condconv train``: train a registered model (the embedded digits by default, CIFAR, ImageFolder trees)."""

from __future__ import annotations

import argparse

from condconv.cli.commands.options import add_training_options, config_from_args
from condconv.training.loop import train_model
from condconv.training.recipes import list_recipes, load_recipe, recipe_about
from condconv.utils.runtime import is_main_process

HELP = "train a registered model (embedded digits by default, CIFAR, ImageFolder)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", "-r", metavar="NAME", default=None,
                        help="start from a paper's training recipe (--list-recipes) or a recipe YAML file; "
                             "--config and flags override it")
    parser.add_argument("--list-recipes", action="store_true", help="list the packaged recipes and exit")
    parser.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML file of options (flags given here override "
                        "it)")
    parser.add_argument("--accept-config-change", action="store_true",
                        help="resume although the run folder's config.yaml was edited, taking its new values of the "
                             "keys that may change on resume (epochs, eval_every...: a raised epochs trains the extra "
                             "epochs); without it an edited config.yaml is an error naming the changed keys")
    add_training_options(parser)


def _print_recipes() -> None:
    for name in list_recipes():
        about, options = recipe_about(name), load_recipe(name)
        unverified = about.get("unverified") or []
        note = f"; not verified against the paper: {', '.join(unverified)}" if unverified else ""
        top1 = about.get("reference_top1")
        reference = f", reference top-1 {top1}%" if top1 is not None else ""
        print(f"{name:<24} {options.get('model')}: {about.get('setup', '')}{reference}{note}")


def run(args: argparse.Namespace) -> int:
    if args.list_recipes:
        _print_recipes()
        return 0
    base = None
    if args.recipe:
        base = {**load_recipe(args.recipe), "recipe": args.recipe}
    config, explicit = config_from_args(args, base=base)
    result = train_model(config, explicit=explicit, accept_config_change=args.accept_config_change)
    c = result.config
    if is_main_process():
        print(f"{c['model']} ({c['conv']}, experts={c['experts']}, width={c['width']}) on {c['dataset']}: "
              f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  params {result.params:,}  "
              f"steps {result.steps}  {result.seconds:.1f}s\nweights: {result.checkpoint}")
    return 0
