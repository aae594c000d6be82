"""The ``'triton'`` strategy of the engine and of every layer (the kernels themselves: tests/test_triton.py).

Without a GPU the kernels run on CPU tensors under Triton's interpreter (switched on by conftest.py), so the shapes
stay tiny. Oracles: the per-example references and the other strategies.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import condconv
from condconv import dynamic_conv2d, use_strategy
from condconv.nn.ops import triton_conv
from condconv.nn.reference import reference_dynamic_conv2d, reference_odconv2d

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install triton)", allow_module_level=True)
_OK, _WHY = triton_conv.triton_status()
if not _OK:
    pytest.skip(f"the Triton path cannot run here: {_WHY}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out, leaves, cotangent):
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, present, cotangent)


CASES = [  # (C_in, C_out, groups, kernel, stride, padding, padding_mode, bias, spatial)
    (4, 6, 1, 3, 1, 1, "reflect", True, True),  # non-zero padding: padded by the engine first
    (6, 6, 6, 3, 2, 1, "zeros", False, True),  # depthwise, strided
    (4, 8, 2, 1, 1, 0, "zeros", True, False),  # grouped 1x1
    (3, 5, 1, (2, 3), 1, "same", "zeros", True, False),  # even kernel: asymmetric 'same' padding
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_engine_triton_matches_the_reference(case):
    ci, co, groups, kernel, stride, padding, mode, has_bias, has_spatial = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    torch.manual_seed(0)
    x = torch.randn(3, ci, 7, 6, device=DEVICE)
    weight = torch.randn(3, co, ci // groups, kh, kw, device=DEVICE)
    routing = torch.rand(3, 3, device=DEVICE)
    bias = torch.randn(3, co, device=DEVICE) if has_bias else None
    spatial = torch.rand(3, kh, kw, device=DEVICE) + 0.5 if has_spatial else None
    kwargs = {"stride": stride, "padding": padding, "groups": groups, "padding_mode": mode}
    leaves = _leaves(x, weight, routing, bias, spatial)
    out = dynamic_conv2d(*leaves[:4], spatial=leaves[4], strategy="triton", **kwargs)
    ref_leaves = _leaves(x, weight, routing, bias, spatial)
    expected = reference_dynamic_conv2d(*ref_leaves[:4], spatial=ref_leaves[4], **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    cotangent = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, cotangent), _grads(expected, ref_leaves, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_engine_triton_channel_scales_and_bias_in_one_call():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    weight = torch.randn(2, 6, 4, 3, 3, device=DEVICE)
    routing, bias = torch.rand(2, 2, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    spatial = torch.rand(2, 3, 3, device=DEVICE) + 0.5
    in_scale, out_scale = torch.rand(2, 4, device=DEVICE) + 0.5, torch.rand(2, 6, device=DEVICE) + 0.5
    args = (x, weight, routing, bias, spatial, in_scale, out_scale)
    leaves = _leaves(*args)
    out = dynamic_conv2d(*leaves[:4], padding=1, spatial=leaves[4], in_scale=leaves[5], out_scale=leaves[6],
                         strategy="triton")
    ref = _leaves(*args)
    expected = reference_odconv2d(ref[0], ref[1], ref[2], ref[4], ref[5], ref[6], ref[3], padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    cotangent = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, cotangent), _grads(expected, ref, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["condconv", "dynamic", "odconv"])
def test_every_layer_runs_on_the_triton_strategy(kind):
    torch.manual_seed(2)
    layer = condconv.make_conv2d(kind, 4, 6, 3, 1, 1, num_experts=3).to(DEVICE)
    x = torch.randn(3, 4, 6, 6, device=DEVICE)
    expected = layer(x)  # auto
    params = [p for p in layer.parameters()]
    want = torch.autograd.grad(expected.square().sum(), params)
    layer.strategy = "triton"
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(out.square().sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


def test_use_strategy_triton_on_a_zoo_model():
    torch.manual_seed(3)
    model = condconv.create_model("mobilenet_v1_cifar", num_classes=4, width_mult=0.25, conv="odconv",
                                  num_experts=2, dynamic_blocks=1).to(DEVICE).eval()
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
        with use_strategy("triton"):
            out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_export_falls_back_from_triton(tmp_path):
    pytest.importorskip("onnxruntime")
    layer = condconv.CondConv2d(4, 6, 3, padding=1, num_experts=2, strategy="triton").eval()
    path = condconv.export_model(layer, tmp_path / "layer.onnx", "onnx", input_size=(4, 6, 6), exporter="torchscript")
    errors = condconv.verify_export(path, layer, (4, 6, 6), batch_sizes=(1, 3))
    assert max(errors.values()) < 1e-4


def test_a_clear_error_where_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(triton_conv, "triton_status", lambda device=None: (False, "Triton is not installed (pip "
                                                                                  "install triton)"))
    layer = condconv.CondConv2d(4, 6, 3, padding=1, num_experts=2, strategy="triton")
    with pytest.raises(RuntimeError, match=r"strategy='triton' cannot run here: .*pip install triton"):
        layer(torch.randn(2, 4, 6, 6))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast under the interpreter")
def test_autocast_computes_in_the_autocast_dtype():
    torch.manual_seed(4)
    layer = condconv.CondConv2d(4, 6, 3, padding=1, num_experts=2, strategy="triton")
    x = torch.randn(2, 4, 6, 6)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
