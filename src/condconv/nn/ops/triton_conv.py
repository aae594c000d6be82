"""Fused Triton kernels for the dynamic convolution, as a PyTorch custom operator with autograd.

For every example ``b`` of a batch::

    K_b  = sum_e routing[b, e] * weight[e]  (* spatial[b] over the kernel positions, if given)
    y[b] = out_scale[b] * conv2d(in_scale[b] * x[b], K_b, stride, zero padding, dilation, groups)
           + sum_e routing[b, e] * bias[e]

(the channel scales are ODConv's input- and output-channel attentions, broadcast over the spatial axes; the bias
is added after ``out_scale``). :func:`triton_dynamic_conv2d` validates its arguments and calls the custom operator
``condconv::dynamic_conv2d``, whose backward is a second operator, ``condconv::dynamic_conv2d_backward``. Both are
opaque to ``torch.compile`` (with fake implementations for tracing, dynamic shapes included). Neither materialises
per-example kernels of the whole batch or im2col columns: the kernels (:mod:`condconv.nn.ops.triton_gemm`,
``triton_wgrad``, ``triton_kernels``) mix tiles of ``K_b`` from the experts where they use them (small maps), or the
kernels of one chunk of examples into a workspace of at most 16 MiB (large maps), so training memory stays close to
a static convolution's.

Dtypes: the output has ``x``'s dtype (float16, bfloat16, float32 or float64) and memory format (channels_last in,
channels_last out; any other strides in, contiguous out). ``weight``, ``routing`` and the optional tensors may have
any floating dtype (under autocast the engine passes a bfloat16 ``x`` with float32 experts): the experts are copied
once per call into the kernels' layout in ``x``'s dtype, mixed by a product with the routing (in that dtype,
accumulated in float32), the mixed tile rounded to ``x``'s dtype for the tensor-core product, and every product
accumulates in float32 (float64 when ``x`` is float64). Gradients are accumulated in
float32 buffers and returned in each input's dtype. float32 products use TF32 only when
``torch.get_float32_matmul_precision()`` is not ``'highest'`` (the same switch as ``torch.matmul``).

Backward: the input gradient is a transposed implicit GEMM with the re-mixed kernel, per stride phase over the
valid kernel positions only; one kernel computes, per group of examples and tile, the gradient ``G_b`` of the mixed
kernel (small maps; large maps: read from a workspace that one implicit GEMM per example fills) and reduces it at
once into the gradients of the experts, routing, spatial attention and both channel scales.
The output-scale gradient ``sum_hw dy * conv(...)`` is obtained there as ``sum_{c, kpos} G_b / out_scale * K_b``
(the factor is simply not applied), and the input-scale gradient likewise, so the forward saves nothing beyond its
inputs and nothing is recomputed. No kernel uses atomics: each program writes partial sums to its own slots, added
in a fixed order, so the backward is deterministic (``torch.use_deterministic_algorithms(True)`` is honoured). The
bias gradient and the bias's share of the routing gradient are small reductions done with torch. Kernels launch on
the input's device (:mod:`condconv.nn.ops.triton_launch`). Double backward is not supported.

This module imports neither Triton nor the kernels until the operator first runs, so :func:`triton_status` answers
on machines without Triton.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from condconv.nn.ops.shapes import memory_format_of, output_hw
from condconv.utils.checks import positive_int

__all__ = ["triton_status", "triton_dynamic_conv2d"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OP = "condconv::dynamic_conv2d"
_BACKWARD_OP = "condconv::dynamic_conv2d_backward"
_TENSOR_ARGS = ("x", "weight", "routing", "bias", "spatial", "in_scale", "out_scale")


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton path can run here, and if not, why.

    Args:
        device: the device the tensors live on; ``None`` asks about the default one (CUDA if available, else CPU).

    Returns:
        ``(True, what runs)`` or ``(False, the reason and the remedy)``. Never imports Triton.
    """
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (pip install triton)"
    if not hasattr(torch.library, "custom_op"):
        return False, f"torch {torch.__version__} lacks torch.library.custom_op: the Triton path needs torch >= 2.4"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    loaded = _loaded_launch()
    interpreter = loaded.interpreted() if loaded is not None else _interpret_requested()
    if _interpret_requested() and not (interpreter and _triton_interpretable()):
        return False, ("TRITON_INTERPRET=1 was set after Triton was imported (importing torch._dynamo imports it): "
                       "set it in the environment before the process starts")
    if interpreter:
        return True, f"Triton interpreter (TRITON_INTERPRET=1) on {device_type} tensors: correct but slow"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, f"Triton kernels on {torch.cuda.get_device_name(torch.device(device))}"
    if device_type == "cpu":
        return False, ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before Triton is first "
                       "imported (slow; meant for testing)")
    return False, f"device type {device_type!r} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"


def _triton_interpretable() -> bool:
    """Whether Triton's own library functions (``tl.sum``...) were decorated for the interpreter: they are only if
    Triton was first imported under ``TRITON_INTERPRET=1``."""
    language = sys.modules.get("triton.language")
    return language is None or type(language.cdiv).__name__ == "InterpretedFunction"


def _loaded_launch():
    """The launch module if already imported (it imports Triton and the kernels), else None."""
    return sys.modules.get("condconv.nn.ops.triton_launch")


def _launch():
    from condconv.nn.ops import triton_launch

    return triton_launch


# ------------------------------------------------------------------------------------------------ validation


def _int_pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return (int(value[0]), int(value[1]))


def _padding4(value) -> tuple[int, int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * 4
    elif isinstance(value, Sequence) and len(value) == 2:
        value = (value[1], value[1], value[0], value[0])  # (h, w), like torch.nn.Conv2d
    if not (isinstance(value, Sequence) and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"padding must be an int, a pair (h, w) or four ints (left, right, top, bottom), "
                        f"got {value!r}")
    if min(value) < 0:
        raise ValueError(f"padding must be non-negative, got {tuple(value)}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _check_tensors(tensors: dict) -> None:
    x = tensors["x"]
    for name in _TENSOR_ARGS:
        value = tensors[name]
        if value is None and name in ("x", "weight", "routing"):
            raise TypeError(f"{name} must be a torch.Tensor, got None")
        if value is None:
            continue
        if not isinstance(value, Tensor):
            what = "a torch.Tensor" if name in ("x", "weight", "routing") else "a torch.Tensor or None"
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}: all tensors must share a device")
        if value.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")


def _check_shapes(tensors: dict, groups: int) -> None:
    x, weight = tensors["x"], tensors["weight"]
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (batch, channels, height, width), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be 5-D (num_experts, out_channels, in_channels // groups, kh, kw), "
                         f"got shape {tuple(weight.shape)}")
    if min(weight.shape) < 1:
        raise ValueError(f"weight must have no empty dimension, got shape {tuple(weight.shape)}")
    experts, out_channels, in_per_group, kh, kw = weight.shape
    batch, channels = x.shape[:2]
    positive_int(groups, "groups")
    if out_channels % groups:
        raise ValueError(f"weight's out_channels ({out_channels}) must be divisible by groups ({groups})")
    if channels != in_per_group * groups:
        raise ValueError(f"x has {channels} channels, expected {in_per_group * groups} "
                         f"(weight's in_channels // groups = {in_per_group}, groups = {groups})")
    expected = {"routing": (batch, experts), "bias": (experts, out_channels), "spatial": (batch, kh, kw),
                "in_scale": (batch, channels), "out_scale": (batch, out_channels)}
    names = {"routing": "(batch, num_experts)", "bias": "(num_experts, out_channels)", "spatial": "(batch, kh, kw)",
             "in_scale": "(batch, in_channels)", "out_scale": "(batch, out_channels)"}
    for name, shape in expected.items():
        value = tensors[name]
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {names[name]} = {shape}, got {tuple(value.shape)}")
    if x.shape[1] * x.shape[2] * x.shape[3] >= 2**31 or weight.numel() >= 2**31:
        raise ValueError("x (per example) and weight must each have fewer than 2**31 elements (32-bit offsets)")


def triton_dynamic_conv2d(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None = None,
                          stride: int | Sequence[int] = (1, 1), padding: int | Sequence[int] = (0, 0, 0, 0),
                          dilation: int | Sequence[int] = (1, 1), groups: int = 1, *,
                          spatial: Tensor | None = None, in_scale: Tensor | None = None,
                          out_scale: Tensor | None = None) -> Tensor:
    """Convolution of each example with its own mixture of expert kernels, in fused Triton kernels.

    Args:
        x: input ``(B, C_in, H, W)``, any strides; float16, bfloat16, float32 or float64.
        weight: expert kernels ``(E, C_out, C_in // groups, kh, kw)``.
        routing: mixing weights ``(B, E)``.
        bias: optional per-expert bias ``(E, C_out)``, mixed by ``routing`` and added after ``out_scale``.
        stride, dilation: an int or a pair ``(h, w)``.
        padding: zero padding ``(left, right, top, bottom)`` (the order of :func:`torch.nn.functional.pad`; may be
            asymmetric), or an int, or a pair ``(h, w)`` as in :class:`torch.nn.Conv2d`.
        groups: as in :class:`torch.nn.Conv2d` (dense, grouped, depthwise, depthwise with a channel multiplier).
        spatial: optional ``(B, kh, kw)`` multiplier of the kernel positions (ODConv's spatial attention).
        in_scale: optional ``(B, C_in)`` input-channel scale (ODConv's input-channel attention).
        out_scale: optional ``(B, C_out)`` output-channel scale (ODConv's output-channel attention).

    Returns:
        ``(B, C_out, H_out, W_out)`` in ``x``'s dtype, channels_last if ``x`` is.

    Raises:
        TypeError, ValueError: for a bad argument (the message names it). RuntimeError: if Triton cannot run here
        (see :func:`triton_status`).
    """
    tensors = {"x": x, "weight": weight, "routing": routing, "bias": bias, "spatial": spatial,
               "in_scale": in_scale, "out_scale": out_scale}
    _check_tensors(tensors)
    _check_shapes(tensors, groups)
    stride_ = _int_pair(stride, "stride")
    dilation_ = _int_pair(dilation, "dilation")
    pads = _padding4(padding)
    kh, kw = weight.shape[-2:]
    out_h, out_w = output_hw(x.shape[2], x.shape[3], kh, kw, stride_, pads, dilation_)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"x of size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel (dilation "
                         f"{dilation_}, padding {pads}): the output would be {out_h}x{out_w}")
    if not hasattr(torch.library, "custom_op"):
        raise RuntimeError(triton_status(x.device)[1])
    return torch.ops.condconv.dynamic_conv2d(x, weight, routing, bias, spatial, in_scale, out_scale,
                                             list(stride_), list(pads), list(dilation_), groups)


# ------------------------------------------------------------------------------------------------ custom ops


def _require_runnable(device: torch.device) -> None:
    ok, why = triton_status(device)
    if not ok:
        raise RuntimeError(f"condconv's Triton kernels cannot run on {device}: {why}")


def _forward_impl(x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation, groups):
    _require_runnable(x.device)
    return _launch().forward(x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation,
                             groups)


def _forward_fake(x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation, groups):
    out_h, out_w = output_hw(x.shape[2], x.shape[3], weight.shape[3], weight.shape[4], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[1], out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def _backward_impl(grad, x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation, groups,
                   output_mask):
    _require_runnable(x.device)
    return tuple(_launch().backward(grad, x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding,
                                    dilation, groups, output_mask))


def _backward_fake(grad, x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation, groups,
                   output_mask):
    inputs = (x, weight, routing, bias, spatial, in_scale, out_scale)
    out = []
    for i, (t, need) in enumerate(zip(inputs, output_mask)):
        if not need:
            out.append(x.new_empty(0))
        elif i == 0:
            out.append(torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x)))
        else:
            out.append(t.new_empty(t.shape))
    return tuple(out)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, routing, bias, spatial, in_scale, out_scale)
    ctx.geometry = (stride, padding, dilation, groups)


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    mask = [bool(need) and t is not None for need, t in zip(ctx.needs_input_grad[:7], saved)]
    if grad is None or not any(mask):
        return (None,) * 11
    grads = torch.ops.condconv.dynamic_conv2d_backward(grad, *saved, *ctx.geometry, mask)
    return tuple(g if need else None for g, need in zip(grads, mask)) + (None,) * 4


def _no_double_backward(ctx, *grads):
    raise RuntimeError("condconv's Triton dynamic convolution does not support double backward (create_graph=True "
                       "then differentiating the gradients); use the engine's 'bmm' or 'grouped' strategy for that")


def _register() -> None:
    forward = torch.library.custom_op(
        _OP, _forward_impl, mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor routing, Tensor? bias, Tensor? spatial, Tensor? in_scale, "
               "Tensor? out_scale, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor")
    forward.register_fake(_forward_fake)
    backward = torch.library.custom_op(
        _BACKWARD_OP, _backward_impl, mutates_args=(),
        schema="(Tensor grad, Tensor x, Tensor weight, Tensor routing, Tensor? bias, Tensor? spatial, "
               "Tensor? in_scale, Tensor? out_scale, int[] stride, int[] padding, int[] dilation, int groups, "
               "bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
    backward.register_fake(_backward_fake)
    forward.register_autograd(_backward, setup_context=_setup_context)
    backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


if hasattr(torch.library, "custom_op"):
    _register()
