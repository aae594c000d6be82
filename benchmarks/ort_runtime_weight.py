"""onnxruntime: one depthwise convolution with a constant weight against the same convolution whose weight is computed
at run time (the situation of every exported dynamic depthwise layer), batch 1, one thread.

    python benchmarks/ort_runtime_weight.py                  # the README's shapes
    python benchmarks/ort_runtime_weight.py --shape 1152 7 5  # channels, map size, kernel size

Variants: ``constant`` (weight an initializer: onnxruntime pre-packs it, NCHWc layout), ``run-time weight`` (the
weight is a graph input), ``mixed`` (``routing @ experts`` reshaped into the weight, as the exported layers do) and
``experts`` (one constant convolution with E kernels per channel, then the routing-weighted sum over E).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = ((1152, 7, 5), (672, 14, 5), (144, 56, 3), (32, 112, 3))


def _session(nodes, inits, inputs) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def variants(channels: int, size: int, k: int, experts: int = 8) -> dict[str, tuple]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels, 1, k, k), dtype=np.float32)
    bank = rng.standard_normal((experts * channels, 1, k, k), dtype=np.float32)
    x = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    routing = rng.random((1, experts), dtype=np.float32)

    def conv(inputs, out, group):
        return helper.make_node("Conv", inputs, [out], group=group, pads=[k // 2] * 4, kernel_shape=[k, k])

    def const(array, name):
        return numpy_helper.from_array(array, name)

    x_in = ("x", [1, channels, size, size])
    return {
        "constant": (_session([conv(["x", "W"], "y", channels)], [const(weight, "W")], [x_in]), {"x": x}),
        "run-time weight": (_session([conv(["x", "w"], "y", channels)], [], [x_in, ("w", [channels, 1, k, k])]),
                            {"x": x, "w": weight}),
        "mixed": (_session([helper.make_node("MatMul", ["r", "B"], ["flat"]),
                            helper.make_node("Reshape", ["flat", "shape"], ["w"]), conv(["x", "w"], "y", channels)],
                           [const(bank.reshape(experts, -1), "B"),
                            const(np.array([channels, 1, k, k], np.int64), "shape")],
                           [x_in, ("r", [1, experts])]), {"x": x, "r": routing}),
        "experts": (_session([conv(["x", "W"], "z", channels), helper.make_node("Reshape", ["z", "shape"], ["z5"]),
                              helper.make_node("Mul", ["z5", "r"], ["m"]),
                              helper.make_node("ReduceSum", ["m", "axis"], ["y"], keepdims=0)],
                             [const(bank, "W"), const(np.array([1, channels, experts, size, size], np.int64), "shape"),
                              const(np.array([2], np.int64), "axis")],
                             [x_in, ("r", [1, 1, experts, 1, 1])]),
                    {"x": x, "r": routing.reshape(1, 1, experts, 1, 1)}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, action="append", metavar=("CHANNELS", "SIZE", "KERNEL"))
    p.add_argument("--rounds", type=int, default=100)
    args = p.parse_args(argv)
    print("| depthwise layer | " + " | ".join(variants(8, 4, 3)) + " |")
    print("|---|" + "---:|" * 4)
    for channels, size, k in args.shape or SHAPES:
        runs = variants(channels, size, k)
        for session, feed in runs.values():  # warm-up
            session.run(None, feed)
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):  # round-robin
            for name, (session, feed) in runs.items():
                start = time.perf_counter()
                session.run(None, feed)
                samples[name].append(time.perf_counter() - start)
        cells = [f"{statistics.median(v) * 1e3:.3f} ms" for v in samples.values()]
        print(f"| {k}x{k} {channels} @{size} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
