"""Int8 deployment on real data: train on the embedded digits, export, quantize, compare accuracy and latency.

    python benchmarks/quantize_digits.py --out benchmarks/results/quantize-digits

Trains a CondConv model and its static twin with `condconv.train_model` on the UCI digits (sklearn's, upsampled to
32x32), exports both with `condconv.export_model` (dynamic batch), quantizes both with
`condconv.deploy.quantize.quantize_onnx` (int8 weights of every MatMul/Gemm: the expert banks, routers,
classifier), then evaluates top-1 on the digits test split with onnxruntime and times batch-1 latency (one
thread, interleaved rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import condconv
from condconv.data import EpochLoader, build_dataset
from condconv.deploy.quantize import quantize_onnx


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _top1(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray) -> float:
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return 100.0 * float((logits.argmax(1) == labels).mean())


def _latency(sessions: dict[str, ort.InferenceSession], image: np.ndarray, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    feeds = {k: {s.get_inputs()[0].name: image} for k, s in sessions.items()}
    for _ in range(3):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    for _ in range(rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            samples[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2_cifar")
    p.add_argument("--conv", default="condconv")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.md with the table")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    test = build_dataset("digits", "test")
    images, labels = next(iter(EpochLoader(test, len(test))))
    images, labels = images.numpy(), labels.numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for conv in ("static", args.conv):
            experts = None if conv == "static" else args.experts
            result = condconv.train_model(model=args.model, conv=conv, experts=experts, width=args.width,
                                          epochs=args.epochs, seed=args.seed, device="cpu", out=str(Path(tmp) / conv),
                                          progress=False)
            model, config = condconv.load_checkpoint(result.checkpoint)
            size = (config["in_chans"], config["image_size"], config["image_size"])
            fp32 = condconv.export_model(model.eval(), Path(tmp) / f"{conv}.onnx", input_size=size, verify=True)
            int8 = quantize_onnx(fp32, Path(tmp) / f"{conv}-int8.onnx")
            for precision, path in (("fp32", fp32), ("int8", int8)):
                sessions[(conv, precision)] = _session(path)
                rows.append({"model": f"{args.model} {conv}" + ("" if conv == "static" else f"-{args.experts}"),
                             "precision": precision, "top1": _top1(sessions[(conv, precision)], images, labels),
                             "pytorch_top1": result.top1, "mb": path.stat().st_size / 2**20, "key": (conv, precision)})
        latency = _latency(sessions, images[:1], args.rounds)
    base = latency[("static", "fp32")]
    lines = [f"digits test split ({len(labels)} images), {args.model} width {args.width}, {args.epochs} epochs, seed "
             f"{args.seed}; onnxruntime {ort.__version__}, 1 thread, batch 1, {args.rounds} interleaved rounds",
             "", "| model | precision | top-1 % (onnxruntime) | top-1 % (PyTorch fp32) | file MB | batch-1 ms | "
             "ratio to static fp32 |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = latency[r["key"]]
        lines.append(f"| {r['model']} | {r['precision']} | {r['top1']:.2f} | {r['pytorch_top1']:.2f} | {r['mb']:.1f} | "
                     f"{ms:.2f} | {ms / base:.2f} |")
    text = "\n".join(lines)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out + ".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
