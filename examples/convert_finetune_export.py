"""Adopt CondConv in a trained network: convert it, fine-tune it, export it to ONNX and run it with onnxruntime.

CondConv: Conditionally Parameterized Convolutions for Efficient Inference (Yang et al., NeurIPS 2019,
arXiv:1904.04971).

Steps (all on the embedded UCI digits, so nothing is downloaded; about a minute on an idle 2-core CPU):

1. train a small static ResNet-18 (the "pretrained" model) with ``condconv.train_model``;
2. ``condconv.nn.convert`` its last third of convolutions to 4-expert CondConv layers — the accuracy is unchanged,
   since conversion preserves the function — with a small expert perturbation so the experts can specialise;
3. fine-tune the converted model for a few epochs with a plain PyTorch loop;
4. ``condconv.export_model`` to ONNX with a dynamic batch axis and run it with onnxruntime at two batch sizes.

The same on the command line (step 3 with ``condconv train`` needs a way to start from given weights; see the
README's deploy section)::

    condconv train --model resnet18_cifar --conv static --width 0.25 --epochs 3 --out runs/base
    condconv convert runs/base --conv condconv --experts 4 --out runs/cc
    condconv export runs/cc --format onnx --out cc.onnx --verify

Run: ``python examples/convert_finetune_export.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import condconv
from condconv import TrainConfig, load_checkpoint, train_model
from condconv.data import EpochLoader, build_dataset
from condconv.training.evaluate import evaluate


def fine_tune(model: torch.nn.Module, loader: EpochLoader, epochs: int, lr: float) -> None:
    """A plain SGD loop (cosine learning rate); the converted layers train like any other."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the static baseline (default: 3)")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs (default: 2)")
    parser.add_argument("--train-size", type=int, default=400, help="training images (default: 400)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)

        # 1. a trained static network stands in for a pretrained one
        base = train_model(TrainConfig(model="resnet18_cifar", conv="static", width=0.25, epochs=args.epochs,
                                       train_size=args.train_size, batch_size=50, lr=0.1, warmup_epochs=0.2,
                                       out=str(out / "base"), progress=False, eval_every=0))
        model, config = load_checkpoint(base.checkpoint)
        train_ds = build_dataset("digits", "train", train_size=args.train_size)
        test_loader = EpochLoader(build_dataset("digits", "test"), 256)
        static_top1 = evaluate(model, test_loader)["top1"]

        # 2. convert the last third of the convolutions (the default); outputs are unchanged
        converted, names = condconv.convert(model, "condconv", num_experts=4, perturb=0.01, seed=0)
        converted_top1 = evaluate(converted, test_loader)["top1"]

        # 3. fine-tune: routing and experts specialise
        fine_tune(converted, EpochLoader(train_ds, 50, shuffle=True, drop_last=True), args.finetune_epochs, 0.02)
        tuned_top1 = evaluate(converted, test_loader)["top1"]

        # 4. export with a dynamic batch axis, run with onnxruntime at two batch sizes
        size = (config["in_chans"], config["image_size"], config["image_size"])
        path = condconv.export_model(converted.eval(), out / "condconv_resnet18.onnx", "onnx", size)
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        images, labels = next(iter(EpochLoader(build_dataset("digits", "test"), 10_000)))
        correct, max_diff = 0, 0.0
        for x, y in ((images[:1], labels[:1]), (images[1:], labels[1:])):  # any batch: one image, then the rest
            logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            correct += int((logits.argmax(1) == y.numpy()).sum())
            with torch.no_grad():
                max_diff = max(max_diff, float(np.abs(logits - converted(x).numpy()).max()))
        result = {
            "converted_layers": len(names), "static_top1": static_top1, "converted_top1": converted_top1,
            "finetuned_top1": tuned_top1, "onnx_top1": 100.0 * correct / len(labels), "onnx_max_abs_diff": max_diff,
            "onnx_batches": [1, len(labels) - 1], "seconds": time.perf_counter() - t0,
        }  # fmt: skip
    print(f"static ResNet-18 (width 0.25): top-1 {static_top1:.2f}%")
    print(f"converted {len(names)} convolutions to CondConv (4 experts): top-1 {converted_top1:.2f}% (unchanged)")
    print(f"fine-tuned {args.finetune_epochs} epochs: top-1 {tuned_top1:.2f}%")
    print(f"ONNX via onnxruntime (batches of 1 and {len(labels) - 1}): top-1 {result['onnx_top1']:.2f}%, "
          f"max |difference| to PyTorch {max_diff:.1e}")
    print(f"total {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
