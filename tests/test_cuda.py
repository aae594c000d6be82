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


def _triton_case(device, dtype=torch.float32, batch=6):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, 10, 10, generator=gen, dtype=torch.float64)
    w = torch.randn(9, 24, 16, 3, 3, generator=gen, dtype=torch.float64) / 12  # 9 experts: more than 8
    r = torch.rand(batch, 9, generator=gen, dtype=torch.float64)
    b = torch.randn(9, 24, generator=gen, dtype=torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, r, b)]
    ref = reference_dynamic_conv2d(*ref_leaves, 2, 1, 1, 1)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w, r, b)]
    return ref, ref_leaves, leaves


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_runs_on_the_inputs_device():
    """Inputs on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 (issue 21: illegal address before)."""
    pytest.importorskip("triton")
    torch.cuda.set_device(0)
    ref, ref_leaves, leaves = _triton_case("cuda:1")
    y = condconv.dynamic_conv2d(*leaves, 2, 1, 1, 1, strategy="triton")
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-4, atol=1e-4)
    up = torch.randn_like(ref)
    want = torch.autograd.grad(ref, ref_leaves, up)
    have = torch.autograd.grad(y, leaves, up.to("cuda:1", torch.float32))
    for a, b in zip(have, want):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-3, atol=1e-3)


def test_triton_backward_is_deterministic():
    """Under torch.use_deterministic_algorithms(True) two backward passes agree bit for bit (no atomics)."""
    pytest.importorskip("triton")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            _, _, leaves = _triton_case("cuda", torch.bfloat16, batch=37)
            y = condconv.dynamic_conv2d(*leaves, 2, 1, 1, 1, strategy="triton")
            runs.append(torch.autograd.grad(y.float().square().sum(), leaves))
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("size", [7, 14, 56])
def test_triton_regimes_bf16_against_float64(size):
    """Small maps (7x7, 14x14: example groups) and large maps (56x56: chunk workspace), bf16, channels_last."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(20, 64, size, size, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 64, 64, 3, 3, generator=gen, dtype=torch.float64) / 24
    r = torch.rand(20, 8, generator=gen, dtype=torch.float64)
    ref = reference_dynamic_conv2d(x, w, r, None, 1, 1, 1, 1)
    y = condconv.dynamic_conv2d(x.cuda().bfloat16().to(memory_format=torch.channels_last), w.cuda().bfloat16(),
                                r.cuda().bfloat16(), None, 1, 1, 1, 1, strategy="triton")
    torch.testing.assert_close(y.cpu().double(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
