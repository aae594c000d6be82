"""``condconv routing``: per-class mean routing of every dynamic layer -> routing.csv + routing.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from condconv.cli.commands.options import add_checkpoint_data_arguments, none_or, positive_int
from condconv.data import EpochLoader
from condconv.models.checkpoint import load_checkpoint
from condconv.training.analysis import routing_statistics, write_routing_csv
from condconv.training.evaluate import dataset_for_checkpoint
from condconv.utils.fileio import check_writable
from condconv.utils.runtime import resolve_device

HELP = "mean routing weights per class for each dynamic layer -> heatmap PNG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_data_arguments(parser)
    parser.add_argument("--max-images", type=none_or(positive_int), default=None, help="stop after N images (default: "
                        "all)")
    parser.add_argument("--max-classes", type=positive_int, default=10, help="classes drawn in the PNG (default: 10)")
    parser.add_argument("--out", "-o", default=None, help="output folder (default: <checkpoint folder>/routing)")


def run(args: argparse.Namespace) -> int:
    from condconv.training.plots import plot_routing

    ck = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ck.parent if ck.is_file() else ck) / "routing"
    model, config = load_checkpoint(args.checkpoint)
    check_writable(out, folder=True)
    ds = dataset_for_checkpoint(args.checkpoint, config, dataset=args.dataset, data_dir=args.data_dir,
                                split=args.split)
    loader = EpochLoader(ds, args.batch_size, num_workers=args.workers)
    stats = routing_statistics(model, loader, ds.num_classes, classes=ds.classes, device=resolve_device(args.device),
                               max_images=args.max_images, progress=args.progress)
    csv_path = write_routing_csv(stats, out / "routing.csv")
    title = (f"{config['model']} ({config.get('conv')}, {config.get('experts')} experts) on {ds.name}/{ds.split}: "
             "mean routing per class")
    png = plot_routing(stats.means, stats.layers, stats.classes, out / "routing.png",
                       class_dependence=stats.class_dependence, max_classes=args.max_classes, title=title)
    print(f"{'layer':<40} {'experts':>7} {'class dependence':>17}")
    for name, e, dep in zip(stats.layers, stats.num_experts, stats.class_dependence):
        print(f"{name:<40} {e:>7d} {dep:>17.3f}")
    print(f"{int(stats.counts.sum())} images; written: {csv_path}  {png}")
    return 0
