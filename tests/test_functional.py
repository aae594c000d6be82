"""The engine: every strategy of ``dynamic_conv2d`` against the per-example reference, and its contracts."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
import torch
from torch import nn

import condconv
import condconv.nn.functional as functional
import condconv.nn.ops.cpu_tiled as cpu_tiled
from condconv import STRATEGIES, dynamic_conv2d, mix_kernels, select_strategy, set_default_strategy, use_strategy
from condconv.nn.functional import get_default_strategy
from condconv.nn.reference import reference_dynamic_conv2d, reference_odconv2d

pytestmark = [
    pytest.mark.usefixtures("one_thread", "clean_strategy"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

F64 = torch.float64
EXPLICIT = ("grouped", "experts", "bmm", "single", "scan")
ALL = EXPLICIT + ("auto",)
MULTI = ("grouped", "experts", "bmm", "scan", "auto")  # the strategies that take any batch size






# ----------------------------------------------------------------------------------------------------------------
# A pairwise ("all pairs") covering set of layer configurations: every value of every factor meets every value of
# every other factor in at least one configuration, in ~30 configurations instead of ~100k.

FACTORS: dict[str, list] = {
    "kernel": [1, 3, 5, (1, 3), (2, 3)],
    "stride": [1, 2, (2, 1)],
    "padding": [0, 1, (2, 1), "same", "valid"],
    "padding_mode": ["zeros", "reflect", "replicate", "circular"],
    "dilation": [1, 2],
    "channels": [(3, 4, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)],  # (in, out, groups): dense, grouped, dw, dw x2
    "bias": [True, False],
    "batch": [1, 3],  # and 0: see EMPTY_CONFIGS
    "channels_last": [False, True],
    "spatial": [False, True],
}
HEIGHT, WIDTH = 10, 9  # non-square; big enough for a dilated 5x5 'valid' kernel and for reflect padding of 4


def _valid(cfg: dict) -> bool:
    return not (cfg.get("padding") == "same" and cfg.get("stride", 1) != 1)


def _pairs(cfg: dict) -> set:
    return {(a, cfg[a], b, cfg[b]) for a, b in itertools.combinations(FACTORS, 2) if a in cfg and b in cfg}


def pairwise_configs(factors: dict[str, list], seed: int = 0, tries: int = 20) -> list[dict]:
    """Greedy (AETG-style) all-pairs covering array, deterministic for a seed."""
    rng = random.Random(seed)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(factors, 2)
        for va in factors[a]
        for vb in factors[b]
        if _valid({a: va, b: vb})
    }
    rows = []
    while uncovered:
        best, best_gain = None, -1
        a, va, b, vb = min(uncovered, key=repr)
        for _ in range(tries):
            row = {a: va, b: vb}
            for name in rng.sample(list(factors), len(factors)):
                if name in row:
                    continue
                options = [v for v in factors[name] if _valid({**row, name: v})]
                rng.shuffle(options)
                row[name] = max(options, key=lambda v, name=name: len(_pairs({**row, name: v}) & uncovered))
            gain = len(_pairs(row) & uncovered)
            if gain > best_gain:
                best, best_gain = row, gain
        uncovered -= _pairs(best)
        rows.append({name: best[name] for name in factors})
    return rows


PAIRWISE_CONFIGS = pairwise_configs(FACTORS)
# empty batches only need the output shape (and must not crash): a few configurations are enough
EMPTY_CONFIGS = [{**c, "batch": 0} for c in PAIRWISE_CONFIGS[:6]]
CONFIGS = PAIRWISE_CONFIGS + EMPTY_CONFIGS


def _config_id(c: dict) -> str:
    ci, co, g = c["channels"]
    return (f"k{c['kernel']}-s{c['stride']}-p{c['padding']}-{c['padding_mode']}-d{c['dilation']}-{ci}to{co}g{g}"
            f"{'-bias' if c['bias'] else ''}-n{c['batch']}{'-cl' if c['channels_last'] else ''}"
            f"{'-spatial' if c['spatial'] else ''}").replace(" ", "")


def test_pairwise_configs_cover_every_pair():
    covered = set().union(*(_pairs(c) for c in PAIRWISE_CONFIGS))
    for a, b in itertools.combinations(FACTORS, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            if _valid({a: va, b: vb}):
                assert (a, va, b, vb) in covered
    assert all(_valid(c) for c in CONFIGS)
    assert len(PAIRWISE_CONFIGS) < 40


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_case(cfg: dict, dtype=F64, experts: int = 3, batch: int | None = None):
    """Random inputs for a configuration: x, weight, routing, bias, spatial and the conv keyword arguments."""
    ci, co, groups = cfg["channels"]
    kh, kw = _pair(cfg["kernel"])
    n = cfg["batch"] if batch is None else batch
    x = torch.randn(n, ci, HEIGHT, WIDTH, dtype=dtype)
    if cfg["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(experts, co, ci // groups, kh, kw, dtype=dtype)
    routing = torch.rand(n, experts, dtype=dtype)
    bias = torch.randn(experts, co, dtype=dtype) if cfg["bias"] else None
    spatial = torch.rand(n, kh, kw, dtype=dtype) + 0.5 if cfg["spatial"] else None
    kwargs = {"stride": cfg["stride"], "padding": cfg["padding"], "dilation": cfg["dilation"], "groups": groups,
              "padding_mode": cfg["padding_mode"]}
    return x, weight, routing, bias, spatial, kwargs



# ----------------------------------------------------------------------------------------------------------------
# Every strategy equals the reference, forward and backward


def _leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out, leaves, cotangent):
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad((out * cotangent).sum(), present)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_config_id(c) for c in CONFIGS])
def test_strategy_matches_reference(cfg, strategy):
    batch = min(cfg["batch"], 1) if strategy == "single" else cfg["batch"]
    x, weight, routing, bias, spatial, kw = make_case(cfg, batch=batch)
    # inference (no autograd: the engine may reuse workspaces)
    out = dynamic_conv2d(x, weight, routing, bias, spatial=spatial, strategy=strategy, **kw)
    assert out.dtype == F64
    if batch == 0:
        x1, _, r1, _, s1, _ = make_case(cfg, batch=1)
        expected_shape = reference_dynamic_conv2d(x1, weight, r1, bias, spatial=s1, **kw).shape
        assert out.shape == (0, *expected_shape[1:])
        return
    ref_leaves = _leaves((x, weight, routing, bias, spatial))
    expected = reference_dynamic_conv2d(*ref_leaves[:4], spatial=ref_leaves[4], **kw)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-10)
    # training (every input requires grad): same output, same gradients as the reference
    leaves = _leaves((x, weight, routing, bias, spatial))
    out = dynamic_conv2d(*leaves[:4], spatial=leaves[4], strategy=strategy, **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    cotangent = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, cotangent), _grads(expected, ref_leaves, cotangent)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_empty_batch_backward(multi_strategy):
    x = torch.randn(0, 4, 6, 6, dtype=F64, requires_grad=True)
    weight = torch.randn(2, 6, 2, 3, 3, dtype=F64, requires_grad=True)
    routing = torch.rand(0, 2, dtype=F64, requires_grad=True)
    bias = torch.randn(2, 6, dtype=F64, requires_grad=True)
    out = dynamic_conv2d(x, weight, routing, bias, 2, 1, 1, 2, strategy=multi_strategy)
    assert out.shape == (0, 6, 3, 3)
    out.sum().backward()
    assert torch.count_nonzero(weight.grad) == 0 and torch.count_nonzero(bias.grad) == 0


CHUNK_CASE = {"kernel": 3, "stride": 2, "padding": 1, "padding_mode": "reflect", "dilation": 1, "channels": (4, 6, 2),
              "bias": True, "batch": 3, "channels_last": False, "spatial": True}


@pytest.mark.parametrize("spatial", [False, True])
def test_batch_chunking_matches_reference(monkeypatch, multi_strategy, spatial):
    """Per-example-kernel strategies split big batches into chunks: force chunks of one example."""
    monkeypatch.setattr(cpu_tiled, "CHUNK_BYTES", 1)
    x, weight, routing, bias, sp, kw = make_case({**CHUNK_CASE, "spatial": spatial})
    out = dynamic_conv2d(x, weight, routing, bias, spatial=sp, strategy=multi_strategy, **kw)
    ref_leaves = _leaves((x, weight, routing, bias, sp))
    expected = reference_dynamic_conv2d(*ref_leaves[:4], spatial=ref_leaves[4], **kw)
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-10)
    leaves = _leaves((x, weight, routing, bias, sp))
    out = dynamic_conv2d(*leaves[:4], spatial=leaves[4], strategy=multi_strategy, **kw)
    cotangent = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, cotangent), _grads(expected, ref_leaves, cotangent)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("needs_grad", ["x", "weight", "routing", "bias", "spatial", "weight+routing"])
def test_gradients_when_only_some_inputs_require_grad(multi_strategy, needs_grad):
    """E.g. the first layer of a network: the input needs no gradient, the experts and the routing do."""
    x, weight, routing, bias, sp, kw = make_case({**CHUNK_CASE, "kernel": (2, 3), "stride": 1, "padding": "same"})
    names = ("x", "weight", "routing", "bias", "spatial")
    wanted = needs_grad.split("+")
    values = (x, weight, routing, bias, sp)
    tensors = [t.detach().clone().requires_grad_(n in wanted) for n, t in zip(names, values)]
    ref_tensors = [t.detach().clone().requires_grad_(n in wanted) for n, t in zip(names, values)]
    out = dynamic_conv2d(*tensors[:4], spatial=tensors[4], strategy=multi_strategy, **kw)
    expected = reference_dynamic_conv2d(*ref_tensors[:4], spatial=ref_tensors[4], **kw)
    cotangent = torch.randn_like(expected)
    got = torch.autograd.grad((out * cotangent).sum(), [t for t in tensors if t.requires_grad])
    want = torch.autograd.grad((expected * cotangent).sum(), [t for t in ref_tensors if t.requires_grad])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_non_contiguous_inputs(strategy):
    """Transposed/permuted views of every input (as produced by user code) give the reference's output and grads."""
    batch = 1 if strategy == "single" else 3
    leaves = [
        torch.randn(batch, 4, 9, 8, dtype=F64).transpose(2, 3),  # x (B, 4, 8, 9)
        torch.randn(6, 3, 2, 3, 3, dtype=F64).permute(1, 0, 2, 4, 3),  # weight (3, 6, 2, 3, 3)
        torch.rand(3, batch, dtype=F64).t(),  # routing (B, 3)
        torch.randn(6, 3, dtype=F64).t(),  # bias (3, 6)
        torch.rand(batch, 3, 3, dtype=F64).transpose(1, 2),  # spatial
    ]
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    assert not leaves[0].is_contiguous() and not leaves[1].is_contiguous() and not leaves[4].is_contiguous()
    kw = {"stride": 1, "padding": 1, "groups": 2, "padding_mode": "zeros"}
    out = dynamic_conv2d(*leaves[:4], spatial=leaves[4], strategy=strategy, **kw)
    expected = reference_dynamic_conv2d(*leaves[:4], spatial=leaves[4], **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    cotangent = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, cotangent), _grads(expected, leaves, cotangent)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_outputs_do_not_alias_reused_buffers(multi_strategy):
    """Inference reuses per-thread workspaces: a result must survive later calls (same and bigger shapes)."""
    def run(batch, size=6):
        x = torch.randn(batch, 4, size, size, dtype=F64)
        w = torch.randn(2, 6, 2, 3, 3, dtype=F64)
        return dynamic_conv2d(x, w, torch.rand(batch, 2, dtype=F64), torch.randn(2, 6, dtype=F64), padding=1,
                              groups=2, spatial=torch.rand(batch, 3, 3, dtype=F64), strategy=multi_strategy)

    first = run(3)
    kept = first.clone()
    run(3)
    run(5, size=7)
    assert torch.equal(first, kept)


def test_inference_mode_then_no_grad_then_training(multi_strategy):
    """Buffers reused across calls must not leak an inference tensor out of torch.inference_mode()."""
    x, weight, routing, bias, sp, kw = make_case(CHUNK_CASE)
    expected = reference_dynamic_conv2d(x, weight, routing, bias, spatial=sp, **kw)
    errors = []

    def sequence():  # in a fresh thread: no buffers left over from other tests
        try:
            for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad, torch.inference_mode):
                with mode():
                    args = _leaves((x, weight, routing, bias, sp)) if mode is torch.enable_grad else \
                        (x, weight, routing, bias, sp)
                    out = dynamic_conv2d(*args[:4], spatial=args[4], strategy=multi_strategy, **kw)
                    if mode is torch.enable_grad:
                        out.sum().backward()
                torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-10)
        except Exception as exc:  # reported to the main thread
            errors.append(exc)

    thread = threading.Thread(target=sequence)
    thread.start()
    thread.join()
    assert not errors, errors


def test_concurrent_threads(multi_strategy):
    """Per-thread workspaces: two threads running the engine at once each get their own correct results."""
    cases = [make_case({**CHUNK_CASE, "channels": ch}) for ch in [(4, 6, 2), (4, 6, 2), (3, 4, 1)]]
    expected = [reference_dynamic_conv2d(*c[:4], spatial=c[4], **c[5]) for c in cases]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                c = cases[i]
                out = dynamic_conv2d(*c[:4], spatial=c[4], strategy=multi_strategy, **c[5])
                torch.testing.assert_close(out, expected[i], rtol=0, atol=1e-10)
        except Exception as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_pointwise_channels_last():
    x = torch.randn(3, 5, 4, 6, dtype=F64).to(memory_format=torch.channels_last)
    weight = torch.randn(2, 7, 5, 1, 1, dtype=F64)
    routing = torch.rand(3, 2, dtype=F64)
    for strategy in MULTI:
        out = dynamic_conv2d(x, weight, routing, strategy=strategy)
        torch.testing.assert_close(out, reference_dynamic_conv2d(x, weight, routing), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# One expert with unit routing is a plain nn.Conv2d


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_single_expert_equals_conv2d(padding_mode, strategy):
    conv = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2, padding_mode=padding_mode,
                     dtype=F64)
    x = torch.randn(1 if strategy == "single" else 3, 4, 7, 8, dtype=F64)
    routing = torch.ones(x.shape[0], 1, dtype=F64)
    out = dynamic_conv2d(x, conv.weight[None], routing, conv.bias[None], conv.stride, conv.padding, conv.dilation,
                         conv.groups, padding_mode, strategy=strategy)
    torch.testing.assert_close(out, conv(x), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Batch independence


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("channels", [(4, 6, 1), (4, 8, 4)], ids=["dense", "depthwise"])
def test_batch_independence(multi_strategy, spatial, channels):
    cfg = {"kernel": 3, "stride": 1, "padding": 1, "padding_mode": "zeros", "dilation": 1, "channels": channels,
           "bias": True, "batch": 4, "channels_last": False, "spatial": spatial}
    x, weight, routing, bias, sp, kw = make_case(cfg)
    x.requires_grad_(True)
    out = dynamic_conv2d(x, weight, routing, bias, spatial=sp, strategy=multi_strategy, **kw)
    for b in range(4):
        alone = dynamic_conv2d(x[b:b + 1], weight, routing[b:b + 1], bias, spatial=None if sp is None else sp[b:b + 1],
                               strategy=multi_strategy, **kw)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=0, atol=1e-12)
    # the other examples' values do not matter
    x2 = x.detach().clone()
    x2[1:] = torch.randn_like(x2[1:])
    r2 = routing.clone()
    r2[1:] = torch.rand_like(r2[1:])
    out2 = dynamic_conv2d(x2, weight, r2, bias, spatial=sp, strategy=multi_strategy, **kw)
    torch.testing.assert_close(out2[0], out[0].detach(), rtol=0, atol=1e-12)
    # and no cross-talk in the gradient: example 0's output depends on example 0 only
    (grad,) = torch.autograd.grad(out[0].sum(), x)
    assert torch.count_nonzero(grad[1:]) == 0
    assert torch.count_nonzero(grad[0]) > 0


# ----------------------------------------------------------------------------------------------------------------
# Gradients

GRAD_CASES = {
    # (in, out, groups, kernel, stride, padding, dilation, padding_mode)
    "3x3-grouped-reflect-s2": (4, 2, 2, 3, 2, 1, 1, "reflect"),
    "1x1-strided-padded": (3, 2, 1, 1, (2, 1), 1, 1, "zeros"),
    "2x3-dw-same-circular-d2": (2, 4, 2, (2, 3), 1, "same", 2, "circular"),
}


def _gradcheck_case(case, strategy, batch):
    ci, co, groups, kernel, stride, padding, dilation, mode = case
    kh, kw = _pair(kernel)
    inputs = (
        torch.randn(batch, ci, 4, 4, dtype=F64),
        torch.randn(2, co, ci // groups, kh, kw, dtype=F64),
        torch.rand(batch, 2, dtype=F64),
        torch.randn(2, co, dtype=F64),
        torch.rand(batch, kh, kw, dtype=F64),
    )
    inputs = tuple(t.requires_grad_(True) for t in inputs)

    def fn(x, weight, routing, bias, spatial):
        return dynamic_conv2d(x, weight, routing, bias, stride, padding, dilation, groups, mode, spatial=spatial,
                              strategy=strategy)

    return fn, inputs


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradcheck(strategy, case):
    fn, inputs = _gradcheck_case(case, strategy, 1 if strategy == "single" else 2)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("strategy_name", ["grouped", "bmm"])
def test_gradcheck_chunked(monkeypatch, strategy_name):
    monkeypatch.setattr(cpu_tiled, "CHUNK_BYTES", 1)
    fn, inputs = _gradcheck_case(GRAD_CASES["3x3-grouped-reflect-s2"], strategy_name, 3)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "name",
    ["grouped", "experts", "single", "bmm-unfused", "bmm"])
def test_double_backward(monkeypatch, name):
    """Second derivatives (gradient penalties, Hessian-vector products) through the engine."""
    if name == "bmm-unfused":
        monkeypatch.setattr(functional, "FUSED_CPU", False)
    strategy = name.split("-")[0]
    ci, co, groups, kernel, stride, padding, dilation, mode = GRAD_CASES["3x3-grouped-reflect-s2"]
    batch = 1 if strategy == "single" else 2
    x = torch.randn(batch, ci, 4, 4, dtype=F64, requires_grad=True)
    weight = torch.randn(2, co, ci // groups, 3, 3, dtype=F64, requires_grad=True)
    routing = torch.rand(batch, 2, dtype=F64, requires_grad=True)

    def fn(x, weight, routing):
        return dynamic_conv2d(x, weight, routing, None, stride, padding, dilation, groups, mode, strategy=strategy)

    assert torch.autograd.gradgradcheck(fn, (x, weight, routing), fast_mode=True)


# ----------------------------------------------------------------------------------------------------------------
# Lower precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("spatial", [False, True])
def test_low_precision_forward(strategy, dtype, spatial):
    cfg = {"kernel": 3, "stride": 1, "padding": 1, "padding_mode": "reflect", "dilation": 1, "channels": (4, 6, 2),
           "bias": True, "batch": 1 if strategy == "single" else 3, "channels_last": False, "spatial": spatial}
    case = make_case(cfg)
    low = [None if t is None else t.to(dtype) for t in case[:5]]
    exact = [None if t is None else t.double() for t in low]  # the same (rounded) inputs, computed in float64
    out = dynamic_conv2d(*low[:4], spatial=low[4], strategy=strategy, **case[5])
    expected = reference_dynamic_conv2d(*exact[:4], spatial=exact[4], **case[5])
    assert out.dtype == dtype
    scale = expected.abs().max().item()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol * scale)


def test_autocast_bfloat16(strategy):
    """float32 tensors under CPU autocast to bfloat16: forward close to float64, backward runs."""
    cfg = {**CHUNK_CASE, "batch": 1 if strategy == "single" else 3}
    x, weight, routing, bias, sp, kw = make_case(cfg, dtype=torch.float32)
    leaves = _leaves((x, weight, routing, bias, sp))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dynamic_conv2d(*leaves[:4], spatial=leaves[4], strategy=strategy, **kw)
    expected = reference_dynamic_conv2d(*(t.double() for t in (x, weight, routing, bias)), spatial=sp.double(), **kw)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=3e-2 * scale)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


# ----------------------------------------------------------------------------------------------------------------
# mix_kernels


def test_mix_kernels_formula():
    routing = torch.rand(3, 4, dtype=F64)
    weight = torch.randn(4, 5, 2, 3, 2, dtype=F64)
    spatial = torch.rand(3, 3, 2, dtype=F64)
    expected = torch.einsum("be,eoihw->boihw", routing, weight)
    torch.testing.assert_close(mix_kernels(routing, weight), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(mix_kernels(routing, weight, spatial), expected * spatial[:, None, None],
                               rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Strategy selection and overrides


def _small(strategy="auto", batch=2, groups=1, channels=4, kernel=3, size=6, experts=2):
    x = torch.randn(batch, channels, size, size, dtype=F64)
    weight = torch.randn(experts, channels, channels // groups, kernel, kernel, dtype=F64)
    routing = torch.rand(batch, experts, dtype=F64)

    def run():
        return dynamic_conv2d(x, weight, routing, padding=kernel // 2, groups=groups, strategy=strategy)

    return run, {"batch": batch, "experts": experts, "out_channels": channels, "groups": groups}


@pytest.mark.parametrize("name", EXPLICIT)
def test_explicit_strategy_is_executed(spy, name):
    run, shape = _small(name, batch=1 if name == "single" else 3, groups=2)
    assert spy(run, **shape) == name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch": 1},
        {"batch": 3, "groups": 4},
        {"batch": 3, "kernel": 1},
        {"batch": 3, "kernel": 3, "size": 8},
        {"batch": 2, "kernel": 3, "size": 40, "channels": 1, "experts": 4},  # large map, many experts
        {"batch": 2, "kernel": 1, "size": 56, "channels": 1},
    ],
)
def test_auto_runs_what_select_strategy_says(spy, kwargs):
    run, shape = _small("auto", **kwargs)
    size, kernel = kwargs.get("size", 6), kwargs.get("kernel", 3)
    expected = select_strategy(shape["batch"], shape["out_channels"], shape["out_channels"], (kernel, kernel),
                               shape["groups"], shape["experts"], (size, size))
    assert spy(run, **shape) == expected


def test_auto_rules_for_dense_layers(spy):
    """Dense 1x1 -> 'bmm'; dense kxk -> 'grouped' on the CPU ('scan' for large kernels in inference), and 'bmm' on
    CUDA (by device, no GPU needed)."""
    assert select_strategy(8, 16, 16, (1, 1), 1, 8, (14, 14)) == "bmm"
    assert select_strategy(8, 16, 16, (3, 3), 1, 8, (14, 14)) == "grouped"
    assert select_strategy(8, 256, 256, (3, 3), 1, 8, (14, 14)) == "scan"
    assert select_strategy(8, 256, 256, (3, 3), 1, 8, (14, 14), training=True) == "grouped"
    assert select_strategy(8, 16, 16, (3, 3), 1, 8, (14, 14), device="cuda") == "bmm"
    assert select_strategy(8, 16, 16, (3, 3), 1, 8, (14, 14), device=torch.device("cuda", 0)) == "bmm"
    x = torch.randn(2, 1, 56, 56, dtype=F64)
    weight = torch.randn(2, 2, 1, 1, 3, dtype=F64)
    routing = torch.rand(2, 2, dtype=F64)
    assert spy(lambda: dynamic_conv2d(x, weight, routing, padding=(0, 1)), 2, 2, 2, 1) == "grouped"
    torch.testing.assert_close(dynamic_conv2d(x, weight, routing, padding=(0, 1)),
                               reference_dynamic_conv2d(x, weight, routing, padding=(0, 1)), rtol=0, atol=1e-10)


def test_select_strategy_rules():
    shapes = [(8, 8, 1, 1), (8, 16, 3, 1), (8, 8, 3, 8), (8, 16, 5, 8), (8, 8, 3, 2), (8, 8, 1, 8)]
    for (c, o, k, g), hw, experts, spatial in itertools.product(shapes, [(7, 7), (56, 56)], [1, 4, 8], [False, True]):
        assert select_strategy(1, c, o, (k, k), g, experts, hw, spatial=spatial) == "single"
        for batch in (2, 32):
            chosen = select_strategy(batch, c, o, (k, k), g, experts, hw, spatial=spatial)
            assert chosen in ("grouped", "experts", "bmm", "scan")
            if g == c == o:
                assert chosen == "grouped"
            assert select_strategy(batch, c, o, (k, k), g, experts, hw, spatial=spatial, training=True) != "scan"
        for batch in (1, 2, 32):
            traced = select_strategy(batch, c, o, (k, k), g, experts, hw, spatial=spatial, tracing=True)
            assert traced in ("experts", "bmm"), (batch, c, o, k, g, traced)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
def test_auto_is_export_friendly_under_tracing(spy):
    """While torch.jit traces, 'auto' must avoid 'grouped' (batch-dependent groups) and 'single'."""
    weight = torch.randn(2, 4, 1, 3, 3, dtype=F64)

    def fn(x, routing):
        return dynamic_conv2d(x, weight, routing, padding=1, groups=4)

    x, routing = torch.randn(1, 4, 5, 5, dtype=F64), torch.rand(1, 2, dtype=F64)
    assert spy(lambda: fn(x, routing), 1, 2, 4, 4) == "single"  # eager, batch 1
    assert spy(lambda: torch.jit.trace(fn, (x, routing), check_trace=False), 1, 2, 4, 4) == "experts"
    # traced at batch 1, the graph runs at batch 3 (traced without the spy, whose dispatch mode hides sizes)
    traced = torch.jit.trace(fn, (x, routing), check_trace=False)
    x3, r3 = torch.randn(3, 4, 5, 5, dtype=F64), torch.rand(3, 2, dtype=F64)
    torch.testing.assert_close(traced(x3, r3), reference_dynamic_conv2d(x3, weight, r3, padding=1, groups=4),
                               rtol=0, atol=1e-10)


def test_use_strategy_overrides_and_nests(spy):
    assert get_default_strategy() == "auto"
    with use_strategy("grouped"):
        assert get_default_strategy() == "grouped"
        # overrides an explicit per-call strategy, even one that would be invalid for the batch
        run, shape = _small("single", batch=2)
        assert spy(run, **shape) == "grouped"
        with use_strategy("experts"):
            assert get_default_strategy() == "experts"
            run, shape = _small("bmm")
            assert spy(run, **shape) == "experts"
        assert spy(run, **shape) == "grouped"
    assert get_default_strategy() == "auto"
    assert spy(run, **shape) == "bmm"


def test_use_strategy_restores_after_exception():
    with pytest.raises(RuntimeError, match="boom"), use_strategy("experts"):
        raise RuntimeError("boom")
    assert get_default_strategy() == "auto"


def test_use_strategy_is_thread_local():
    seen = []
    with use_strategy("bmm"):
        thread = threading.Thread(target=lambda: seen.append(get_default_strategy()))
        thread.start()
        thread.join()
    assert seen == ["auto"]


def test_set_default_strategy():
    set_default_strategy("experts")
    assert get_default_strategy() == "experts"
    with use_strategy("bmm"):
        assert get_default_strategy() == "bmm"
    assert get_default_strategy() == "experts"
    set_default_strategy("auto")
    assert get_default_strategy() == "auto"


# ----------------------------------------------------------------------------------------------------------------
# Errors


def _good_args():
    return {
        "x": torch.randn(2, 4, 6, 6), "weight": torch.randn(3, 6, 2, 3, 3), "routing": torch.rand(2, 3),
        "bias": torch.randn(3, 6), "stride": 1, "padding": 1, "dilation": 1, "groups": 2, "padding_mode": "zeros",
        "spatial": torch.rand(2, 3, 3), "strategy": "auto",
    }


BAD_CALLS = [
    ({"x": torch.randn(4, 6, 6)}, ValueError, r"input must be 4-D \(batch, channels, height, width\).*\(4, 6, 6\)"),
    ({"x": torch.randn(2, 3, 6, 6)}, ValueError, r"input has 3 channels, expected 4"),
    ({"x": [[1.0]]}, TypeError, r"x must be a torch\.Tensor, got list"),
    ({"routing": 0.5}, TypeError, r"routing must be a torch\.Tensor, got float"),
    ({"x": torch.randn(2, 4, 1, 1), "padding": 0}, ValueError, r"too small"),
    ({"weight": torch.randn(6, 2, 3, 3)}, ValueError, r"weight must be 5-D"),
    ({"routing": torch.rand(2, 4)}, ValueError, r"routing must have shape \(batch, num_experts\) = \(2, 3\)"),
    ({"routing": torch.rand(3, 3)}, ValueError, r"routing must have shape \(batch, num_experts\) = \(2, 3\)"),
    ({"routing": torch.rand(6)}, ValueError, r"routing must have shape"),
    ({"bias": torch.randn(6)}, ValueError, r"bias must have shape \(num_experts, out_channels\) = \(3, 6\)"),
    ({"spatial": torch.rand(2, 9)}, ValueError, r"spatial must have shape \(batch, kh, kw\) = \(2, 3, 3\)"),
    ({"groups": 0}, ValueError, r"groups must be a positive int"),
    ({"groups": 4, "x": torch.randn(2, 8, 6, 6)}, ValueError, r"out_channels \(6\) must be divisible by groups"),
    ({"padding_mode": "mirror"}, ValueError, r"padding_mode must be one of .*'reflect'.*got 'mirror'"),
    ({"strategy": "fastest"}, ValueError, r"strategy must be one of .*'grouped'.*got 'fastest'"),
    ({"strategy": "single"}, ValueError, r"strategy='single' needs batch size 1, got 2"),
    ({"padding": "same", "stride": 2}, ValueError, r"padding='same' requires stride 1"),
    ({"padding": -1}, ValueError, r"padding must be non-negative, got -1"),
    ({"padding": (1, -2)}, ValueError, r"padding must be non-negative"),
    ({"padding": "full"}, ValueError, r"padding must be an int, a pair of ints, 'same' or 'valid', got 'full'"),
    ({"stride": 0}, ValueError, r"stride and dilation must be positive"),
    ({"dilation": (1, 0)}, ValueError, r"stride and dilation must be positive"),
    ({"stride": 1.5}, TypeError, r"stride must be an int or a pair of ints, got 1.5"),
]


@pytest.mark.parametrize("changes, exc, match", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_bad_calls_raise_clear_errors(changes, exc, match):
    dynamic_conv2d(**_good_args())  # the baseline is fine
    with pytest.raises(exc, match=match):
        dynamic_conv2d(**{**_good_args(), **changes})


def test_bad_strategy_names_rejected_everywhere():
    with pytest.raises(ValueError, match=r"strategy must be one of .*got 'turbo'"), use_strategy("turbo"):
        pass
    with pytest.raises(ValueError, match=r"strategy must be one of .*got 'turbo'"):
        set_default_strategy("turbo")
    assert get_default_strategy() == "auto"
    assert set(STRATEGIES) == set(ALL) | {"triton"}  # the Triton kernels: tests/test_triton*.py
    assert condconv.use_strategy is use_strategy


@pytest.mark.parametrize("name", ["grouped", "experts", "bmm", "auto"])
def test_routing_in_another_dtype_is_cast_to_the_experts_dtype(name):
    """float32 routing with float64 experts: the kernels are mixed in the experts' dtype by every strategy."""
    x = torch.randn(3, 4, 6, 6, dtype=F64)
    weight = torch.randn(2, 6, 4, 3, 3, dtype=F64)
    routing = torch.rand(3, 2, dtype=torch.float32)
    got = dynamic_conv2d(x, weight, routing, None, 1, 1, strategy=name)
    ref = reference_dynamic_conv2d(x, weight, routing.to(F64), None, 1, 1)
    assert got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_bytes", [3000, 800])
@pytest.mark.parametrize("kernel,groups,spatial", [(1, 1, False), (1, 1, True), (3, 1, True), (3, 2, False)])
def test_fused_tiles_over_batch_and_output_channels(monkeypatch, chunk_bytes, kernel, groups, spatial):
    """Tiny workspaces force the fused CPU path to tile over batch chunks and output-channel tiles: forward and
    every gradient must still equal the reference."""
    monkeypatch.setattr(cpu_tiled, "CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 6, 5, dtype=F64, generator=gen, requires_grad=True)
    weight = torch.randn(3, 70, 6 // groups, kernel, kernel, dtype=F64, generator=gen, requires_grad=True)
    routing = torch.rand(5, 3, dtype=F64, generator=gen, requires_grad=True)
    spat = torch.rand(5, kernel, kernel, dtype=F64, generator=gen, requires_grad=True) if spatial else None
    inputs = [t for t in (x, weight, routing, spat) if t is not None]
    args = (None, 1, kernel // 2, 1, groups)
    got = dynamic_conv2d(x, weight, routing, *args, spatial=spat, strategy="bmm")
    ref = reference_dynamic_conv2d(x, weight, routing, *args, spatial=spat)
    grad_out = torch.randn_like(ref)
    got_grads = torch.autograd.grad(got, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# ODConv's channel attentions as engine arguments


@pytest.mark.parametrize("groups", [1, 2])
def test_channel_scales_match_the_odconv_reference(multi_strategy, groups):
    """``in_scale``/``out_scale`` scale the input and output channels, the bias added after: ODConv's formula."""
    x, weight, routing, bias, sp, kw = make_case({**CHUNK_CASE, "channels": (4, 6, groups), "padding_mode": "zeros"})
    batch = x.shape[0]
    in_scale = torch.rand(batch, 4, dtype=F64) + 0.5
    out_scale = torch.rand(batch, 6, dtype=F64) + 0.5
    leaves = _leaves((x, weight, routing, bias, sp, in_scale, out_scale))
    out = dynamic_conv2d(*leaves[:4], spatial=leaves[4], in_scale=leaves[5], out_scale=leaves[6],
                         strategy=multi_strategy, **kw)
    ref_leaves = _leaves((x, weight, routing, bias, sp, in_scale, out_scale))
    kw_ref = {k: v for k, v in kw.items() if k != "padding_mode"}
    expected = reference_odconv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[4], ref_leaves[5],
                                  ref_leaves[6], ref_leaves[3], **kw_ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    cotangent = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, cotangent), _grads(expected, ref_leaves, cotangent)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_channel_scales_are_validated():
    x, weight, routing, bias, sp, kw = make_case(CHUNK_CASE)
    with pytest.raises(ValueError, match=r"in_scale must have shape \(batch, channels\) = \(3, 4\)"):
        dynamic_conv2d(x, weight, routing, in_scale=torch.ones(3, 5, dtype=F64), **kw)
    with pytest.raises(TypeError, match="out_scale must be a torch.Tensor"):
        dynamic_conv2d(x, weight, routing, out_scale=[1.0], **kw)
