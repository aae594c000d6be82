"""CUDA checks (skipped without a GPU): every strategy and layer against the CPU float64 reference, AMP, bf16."""

from __future__ import annotations

import pytest
import torch

import condconv
from condconv.nn.reference import reference_dynamic_conv2d

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CONFIGS = [  # (C_in, C_out, k, stride, padding, groups)
    (16, 32, 1, 1, 0, 1),
    (16, 32, 3, 2, 1, 1),
    (16, 16, 3, 1, 1, 16),
    (16, 32, 3, 1, "same", 2),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("strategy", ["grouped", "experts", "bmm", "scan", "auto", "triton"])
def test_strategies_match_reference_on_cuda(cfg, strategy):
    """Every strategy in float64 on the GPU (for 'triton': the fused kernels' broadcast-product path)."""
    if strategy == "triton":
        pytest.importorskip("triton")
    cin, cout, k, s, p, g = cfg
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, cin, 12, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(4, cout, cin // g, k, k, generator=gen, dtype=torch.float64)
    r = torch.rand(5, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(4, cout, generator=gen, dtype=torch.float64)
    ref = reference_dynamic_conv2d(x, w, r, b, s, p, 1, g)
    got = condconv.dynamic_conv2d(x.cuda(), w.cuda(), r.cuda(), b.cuda(), s, p, 1, g, strategy=strategy)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-10)
    got32 = condconv.dynamic_conv2d(x.float().cuda(), w.float().cuda(), r.float().cuda(), b.float().cuda(), s, p, 1,
                                    g, strategy="triton")
    torch.testing.assert_close(got32.cpu().double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", [None, "triton"])
@pytest.mark.parametrize("cls", [condconv.CondConv2d, condconv.DynamicConv2d, condconv.ODConv2d])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_layers_under_autocast(cls, amp_dtype, strategy):
    if strategy == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = cls(32, 64, 3, padding=1, num_experts=4, strategy=strategy).cuda()
    x = torch.randn(8, 32, 16, 16, device="cuda")
    ref = layer(x)
    with torch.autocast("cuda", dtype=amp_dtype):
        y = layer(x)
    assert y.dtype == amp_dtype
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("cls", [condconv.CondConv2d, condconv.DynamicConv2d, condconv.ODConv2d])
def test_layers_in_bfloat16(cls):
    torch.manual_seed(0)
    layer = cls(32, 32, 3, padding=1, num_experts=4).cuda()
    x = torch.randn(4, 32, 8, 8, device="cuda")
    ref = layer(x)
    y = layer.to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


def test_channels_last_on_cuda():
    torch.manual_seed(0)
    layer = condconv.CondConv2d(32, 64, 1, num_experts=8).cuda()
    x = torch.randn(8, 32, 14, 14, device="cuda")
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), layer(x), rtol=1e-5, atol=1e-5)
