"""Int8 deployment of exported models through onnxruntime's quantization tools.

At batch size 1 a dynamic convolution (CondConv, Yang et al., NeurIPS 2019, arXiv:1904.04971; DynamicConv, Chen et
al., CVPR 2020, arXiv:1912.03458; ODConv, Li et al., ICLR 2022, arXiv:2209.07947) costs little more arithmetic than
a static one, but it reads every expert of every dynamic layer for every image: ``E`` times the static layer's
weights, a memory-bound ``(1, E) @ (E, params)`` matrix product per layer. In an exported graph (see
:func:`condconv.export_model`) that mixing is a ``MatMul`` whose second input is the expert bank, an initializer;
onnxruntime's dynamic quantization stores such weights in int8 (a quarter of the bytes) and runs the product as an
integer matrix multiply (``DynamicQuantizeMatMul``), quantizing the routing weights on the fly. Convolutions stay in
float32 here; the batch axis stays dynamic.

Example:
    >>> path = condconv.export_model(model.eval(), "cc.onnx", input_size=(3, 32, 32))
    >>> from condconv.deploy.quantize import quantize_onnx
    >>> quantize_onnx(path, "cc-int8.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from condconv.utils.fileio import atomic_output, check_writable

__all__ = ["QUANTIZE_OPS", "quantize_onnx"]

logger = logging.getLogger(__name__)

#: Operator types :func:`quantize_onnx` quantizes by default: the expert mixing, the routers' and classifiers'
#: linear layers (every ``MatMul``/``Gemm`` whose weight is an initializer).
QUANTIZE_OPS = ("MatMul", "Gemm")


def quantize_onnx(path: str | Path, out: str | Path, *, op_types: Sequence[str] = QUANTIZE_OPS,
                  per_channel: bool = False, reduce_range: bool = False) -> Path:
    """Write an int8 version of an exported ONNX model (onnxruntime dynamic quantization of weights).

    Only products with a constant weight are quantized (``MatMulConstBOnly``): the expert banks and linear layers;
    the per-example matrix products of two activations (a 1x1 dynamic layer's ``MatMul``) stay in float32.

    Args:
        path: an ONNX file from :func:`condconv.export_model`.
        out: the int8 file to write.
        op_types: ONNX operator types to quantize. Default :data:`QUANTIZE_OPS`.
        per_channel: one scale per output channel of each weight (default: one per tensor).
        reduce_range: 7-bit weights, for CPUs without VNNI instructions (see onnxruntime's documentation).

    Returns:
        The written path.

    Raises:
        ImportError: onnxruntime (with its ``quantization`` tools) is not installed.
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``op_types`` is empty or not a sequence of operator names.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ImportError("quantize_onnx needs onnxruntime (pip install 'condconv[onnx]')") from None
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    if isinstance(op_types, str) or not op_types or not all(isinstance(t, str) and t for t in op_types):
        raise ValueError(f"op_types must be a non-empty sequence of ONNX operator names, got {op_types!r}")
    check_writable(out)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the tools log every tensor they skip to the root logger
    try:
        with atomic_output(out) as tmp:
            quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types),
                             per_channel=per_channel, reduce_range=reduce_range,
                             extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    logger.debug("quantized %s to %s (%.1f -> %.1f MB)", path, out, path.stat().st_size / 2**20,
                 out.stat().st_size / 2**20)
    return out
