"""The layers: CondConv2d, DynamicConv2d, ODConv2d (shared behaviour), their routers, conversion and validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from condconv import (
    CondConv2d,
    DynamicConv2d,
    ODConv2d,
    SigmoidRouter,
    SoftmaxRouter,
    TemperatureSchedule,
    make_conv2d,
    set_default_strategy,
    set_temperature,
    use_strategy,
)
from condconv.nn.reference import reference_dynamic_conv2d, reference_odconv2d

pytestmark = [
    pytest.mark.usefixtures("one_thread", "clean_strategy"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

F64 = torch.float64




# kind name -> (class, extra keyword arguments)
KINDS = {
    "condconv": (CondConv2d, {}),
    "condconv-softmax": (CondConv2d, {"routing": "softmax", "temperature": 2.0}),
    "dynamic": (DynamicConv2d, {}),
    "odconv": (ODConv2d, {"min_channels": 4}),
}
MIXTURE_KINDS = ("condconv", "condconv-softmax", "dynamic")  # layers whose output is reference_dynamic_conv2d

# Conv2d configurations: positional (in, out, kernel) + keyword arguments; input size 7x6
CONFIGS = {
    "3x3-s2-reflect-g2": (4, 6, 3, {"stride": 2, "padding": 1, "groups": 2, "padding_mode": "reflect"}),
    "1x1-nobias": (3, 5, 1, {"bias": False}),
    "1x3-dwx2-same-circular-d2": (4, 8, (1, 3), {"padding": "same", "dilation": 2, "groups": 4,
                                                 "padding_mode": "circular"}),
    "2x3-dw-same-replicate": (4, 4, (2, 3), {"padding": "same", "groups": 4, "padding_mode": "replicate"}),
    "5x5-s21-valid": (3, 4, 5, {"stride": (2, 1), "padding": "valid"}),
}


def make_layer(kind: str, config: str, num_experts: int = 3, strategy=None, **extra):
    cls, kwargs = KINDS[kind]
    ci, co, k, conv_kwargs = CONFIGS[config]
    return cls(ci, co, k, **conv_kwargs, dtype=F64, num_experts=num_experts, strategy=strategy, **kwargs, **extra)


def make_input(layer, batch: int, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(batch, layer.in_channels, 7, 6, dtype=F64)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def conv_kwargs(layer) -> dict:
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups,
            "padding_mode": layer.padding_mode}


def layer_reference(layer, x, routing=None):
    """What the layer must compute, from the per-example loop references and the layer's own router."""
    if isinstance(layer, ODConv2d):
        att = layer.router(x)
        return reference_odconv2d(x, layer.weight, *att, layer.bias, **conv_kwargs(layer))
    if routing is None:
        routing = layer.router(x)
    return reference_dynamic_conv2d(x, layer.weight, routing, layer.bias, **conv_kwargs(layer))


# ----------------------------------------------------------------------------------------------------------------
# Layer outputs equal the references, for every strategy


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_reference(kind, config, strategy):
    layer = make_layer(kind, config, strategy=strategy)
    x = make_input(layer, 1 if strategy == "single" else 3, channels_last=config == "1x1-nobias")
    out = layer(x)
    expected = layer_reference(layer, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    with torch.no_grad():  # inference takes other code paths (reused buffers)
        torch.testing.assert_close(layer(x), expected.detach(), rtol=0, atol=1e-10)
    # and the gradients of the layer's parameters (routers included) agree with the reference's
    cotangent = torch.randn_like(expected)
    params = list(layer.parameters())
    got = torch.autograd.grad((out * cotangent).sum(), params)
    want = torch.autograd.grad((expected * cotangent).sum(), params)
    for name, g, w in zip([n for n, _ in layer.named_parameters()], got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_empty_batch(kind):
    layer = make_layer(kind, "3x3-s2-reflect-g2")
    out = layer(make_input(layer, 0))
    assert out.shape == (0, 6, 4, 3)
    out.sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_layer_batch_independence(kind):
    layer = make_layer(kind, "3x3-s2-reflect-g2").eval()
    x = make_input(layer, 4)
    out = layer(x)
    for b in range(4):
        torch.testing.assert_close(out[b:b + 1], layer(x[b:b + 1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_gradcheck(kind, strategy):
    """gradcheck through the whole layer, router included, w.r.t. the input and every parameter."""
    cls, kwargs = KINDS[kind]
    layer = cls(4, 2, 3, stride=1, padding=1, groups=2, padding_mode="reflect", dtype=F64, num_experts=2,
                strategy=strategy, **kwargs)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(1 if strategy == "single" else 2, 4, 3, 3, dtype=F64, requires_grad=True)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=strategy != "auto")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_layer_low_precision(kind, dtype, strategy):
    layer = make_layer(kind, "3x3-s2-reflect-g2", strategy=strategy)
    x = make_input(layer, 1 if strategy == "single" else 3)
    low = make_layer(kind, "3x3-s2-reflect-g2", strategy=strategy).to(dtype)
    low.load_state_dict(layer.state_dict())
    exact = make_layer(kind, "3x3-s2-reflect-g2", strategy=strategy)
    exact.load_state_dict(low.state_dict())  # the rounded parameters, in float64
    out = low(x.to(dtype))
    assert out.dtype == dtype
    expected = exact(x.to(dtype).double())
    scale = expected.abs().max().item()
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_autocast_bfloat16(kind, strategy):
    """float32 layers under CPU autocast to bfloat16: forward close to float64, backward reaches every parameter."""
    layer = make_layer(kind, "3x3-s2-reflect-g2", strategy=strategy).float()
    x = make_input(layer, 1 if strategy == "single" else 3).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    expected = make_layer(kind, "3x3-s2-reflect-g2", strategy=strategy)
    expected.load_state_dict(layer.state_dict())
    expected = expected(x.double())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=5e-2 * expected.abs().max().item())
    out.float().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------------------------------------------
# Routers


def test_sigmoid_router_formula():
    router = SigmoidRouter(5, 3).double()
    x = torch.randn(4, 5, 6, 7, dtype=F64)
    pooled = x.mean((2, 3))
    expected = torch.sigmoid(pooled @ router.fc.weight.T + router.fc.bias)
    torch.testing.assert_close(router(x), expected, rtol=0, atol=1e-12)
    assert tuple(router.fc.weight.shape) == (3, 5)


def test_sigmoid_router_dropout_only_in_training():
    router = SigmoidRouter(64, 3, dropout=0.5).double()
    x = torch.randn(4, 64, 2, 2, dtype=F64)
    expected = torch.sigmoid(x.mean((2, 3)) @ router.fc.weight.T + router.fc.bias)
    torch.testing.assert_close(router.eval()(x), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(router.train()(x), expected)


@pytest.mark.parametrize("reduction", [None, 2])
def test_softmax_router_formula(reduction):
    router = SoftmaxRouter(12, 4, reduction=reduction, temperature=3.0).double()
    x = torch.randn(2, 12, 3, 5, dtype=F64)
    h = x.mean((2, 3))
    if reduction is not None:
        lin = router.hidden[0]
        assert lin.out_features == max(12 // reduction, 4)
        h = torch.relu(h @ lin.weight.T + lin.bias)
    expected = torch.softmax((h @ router.fc.weight.T + router.fc.bias) / 3.0, dim=1)
    torch.testing.assert_close(router(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(router(x).sum(1), torch.ones(2, dtype=F64), rtol=0, atol=1e-12)


def test_condconv_default_router_is_sigmoid_of_gap():
    layer = CondConv2d(5, 6, 3, padding=1, dtype=F64)
    assert layer.num_experts == 8 and isinstance(layer.router, SigmoidRouter)
    x = torch.randn(2, 5, 4, 4, dtype=F64)
    expected = torch.sigmoid(x.mean((2, 3)) @ layer.router.fc.weight.T + layer.router.fc.bias)
    torch.testing.assert_close(layer.router(x), expected, rtol=0, atol=1e-12)
    n_router = sum(p.numel() for p in layer.router.parameters())
    assert n_router == 5 * 8 + 8  # C_in * E weights + E biases


def test_dynamic_conv_default_router():
    layer = DynamicConv2d(16, 8, 3, dtype=F64)
    assert layer.num_experts == 4 and isinstance(layer.router, SoftmaxRouter)
    assert layer.router.hidden[0].out_features == 16 // 4
    assert float(layer.router.temperature) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# External routing


@pytest.mark.parametrize("kind", MIXTURE_KINDS)
def test_routing_weights_argument_bypasses_router(kind, monkeypatch):
    layer = make_layer(kind, "3x3-s2-reflect-g2")
    x = make_input(layer, 3)
    routing = torch.rand(3, 3, dtype=F64)

    def fail(*args, **kwargs):
        raise AssertionError("the router must not run when routing_weights are given")

    monkeypatch.setattr(layer.router, "forward", fail)
    torch.testing.assert_close(layer(x, routing), layer_reference(layer, x, routing), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer(x, routing_weights=routing), layer_reference(layer, x, routing), rtol=0,
                               atol=1e-10)


def test_external_routing():
    layer = CondConv2d(4, 6, 3, padding=1, dtype=F64, num_experts=3, routing="external")
    assert layer.router is None
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = make_input(layer, 2)
    with pytest.raises(ValueError, match=r"routing='external'.*routing_weights of shape \(batch, 3\)"):
        layer(x)
    routing = torch.rand(2, 3, dtype=F64)
    torch.testing.assert_close(layer(x, routing), layer_reference(layer, x, routing), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", MIXTURE_KINDS)
def test_bad_routing_weights(kind):
    layer = make_layer(kind, "3x3-s2-reflect-g2")
    x = make_input(layer, 2)
    for bad in (torch.rand(2, 4), torch.rand(3, 3), torch.rand(6), torch.rand(2, 3, 1)):
        with pytest.raises(ValueError, match=r"routing_weights must have shape \(batch, num_experts\) = \(2, 3\)"):
            layer(x, bad.double())
    with pytest.raises(TypeError, match=r"routing_weights must be a torch\.Tensor, got list"):
        layer(x, [[0.5] * 3] * 2)


# ----------------------------------------------------------------------------------------------------------------
# Conversion from nn.Conv2d

FROM_KINDS = {
    "condconv": (CondConv2d, {}),
    "condconv-softmax": (CondConv2d, {"routing": "softmax"}),
    "condconv-external": (CondConv2d, {"routing": "external"}),
    "dynamic": (DynamicConv2d, {}),
    "odconv": (ODConv2d, {}),
}
CONVS = {
    "3x3-s2-bias": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=F64),
    "3x3-d2-g2-reflect-nobias": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False,
                                                  padding_mode="reflect", dtype=F64),
    "3x3-dw-circular": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="circular", dtype=F64),
    "1x3-dwx2-s21-replicate": lambda: nn.Conv2d(4, 8, (1, 3), stride=(2, 1), padding=(0, 1), groups=4,
                                                padding_mode="replicate", dtype=F64),
    "1x1-s2": lambda: nn.Conv2d(4, 6, 1, stride=2, dtype=F64),
    "2x2-same": lambda: nn.Conv2d(3, 5, 2, padding="same", dtype=F64),
}


@pytest.mark.parametrize("perturb", [0.0, 0.5])
@pytest.mark.parametrize("conv_name", CONVS)
@pytest.mark.parametrize("kind", FROM_KINDS)
def test_from_conv_preserves_function(kind, conv_name, perturb):
    cls, kwargs = FROM_KINDS[kind]
    conv = CONVS[conv_name]()
    if conv.bias is not None:
        nn.init.normal_(conv.bias)
    gen = torch.Generator().manual_seed(1)
    layer = cls.from_conv(conv, num_experts=3, perturb=perturb, generator=gen, **kwargs)
    assert type(layer) is cls
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert (layer.bias is None) == (conv.bias is None)
    assert layer.weight.dtype == F64
    x = torch.randn(3, conv.in_channels, 7, 6, dtype=F64)
    routing = torch.full((3, 3), 1 / 3, dtype=F64) if kind == "condconv-external" else None
    for strategy in ("grouped", "experts", "bmm", "auto"):
        with use_strategy(strategy):
            torch.testing.assert_close(layer(x, routing) if routing is not None else layer(x), conv(x), rtol=0,
                                       atol=1e-10)
    spread = (layer.weight - layer.weight.mean(0)).abs().max()
    if perturb:
        assert spread > 0.01 * conv.weight.std()  # the experts differ ...
    else:
        assert all(torch.equal(layer.weight[0], w) for w in layer.weight)


@pytest.mark.parametrize("kind", FROM_KINDS)
def test_from_conv_single_expert_and_reproducibility(kind):
    cls, kwargs = FROM_KINDS[kind]
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=F64)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    one = cls.from_conv(conv, num_experts=1, perturb=0.3, **kwargs)
    routing = torch.ones(2, 1, dtype=F64) if kind == "condconv-external" else None
    torch.testing.assert_close(one(x, routing) if routing is not None else one(x), conv(x), rtol=0, atol=1e-10)
    a = cls.from_conv(conv, num_experts=3, perturb=0.3, generator=torch.Generator().manual_seed(7), **kwargs)
    b = cls.from_conv(conv, num_experts=3, perturb=0.3, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(a.weight, b.weight)


def test_from_conv_errors():
    with pytest.raises(TypeError, match=r"conv must be a torch\.nn\.Conv2d, got Linear"):
        CondConv2d.from_conv(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"perturb must be a non-negative number, got -0\.1"):
        DynamicConv2d.from_conv(nn.Conv2d(3, 3, 3), perturb=-0.1)


def test_from_conv_is_trainable():
    """The zeroed router still receives gradients, so routing can become input-dependent in fine-tuning."""
    layer = CondConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), num_experts=3, perturb=0.1)
    layer(torch.randn(2, 4, 5, 5)).square().sum().backward()
    assert layer.router.fc.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Parameters, initialisation, repr, state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", ["3x3-s2-reflect-g2", "1x3-dwx2-same-circular-d2", "5x5-s21-valid"])
def test_weight_and_bias_shapes(kind, config):
    layer = make_layer(kind, config, num_experts=5)
    ci, co, k, conv_kw = CONFIGS[config]
    conv = nn.Conv2d(ci, co, k, **conv_kw)
    assert layer.weight.shape == (5, *conv.weight.shape)
    assert (layer.bias is None) == (conv.bias is None)
    if layer.bias is not None:
        assert layer.bias.shape == (5, co)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(16, 32, 3, 1), (32, 64, 3, 8), (24, 48, 1, 1)], ids=["dense", "grouped", "1x1"])
def test_per_expert_init_matches_conv2d(kind, shape):
    """Each expert is initialised like its own nn.Conv2d: kaiming_uniform(a=sqrt(5)), bound 1/sqrt(fan_in)."""
    ci, co, k, groups = shape
    cls, kwargs = KINDS[kind]
    layer = cls(ci, co, k, groups=groups, num_experts=4, **kwargs)
    fan_in = ci // groups * k * k
    bound = 1 / math.sqrt(fan_in)
    for e in range(4):
        w = layer.weight[e].detach()
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.95 * bound  # fan-in of one expert, not of the whole 5-D tensor
        assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)
        assert abs(w.mean()) < 0.15 * bound
        b = layer.bias[e].detach()
        assert b.abs().max() <= bound and b.abs().max() > 0.5 * bound
    assert not torch.equal(layer.weight[0], layer.weight[1])  # experts initialised independently


@pytest.mark.parametrize("kind", KINDS)
def test_module_conversions_keep_the_expert_bank(kind):
    """.to(memory_format=channels_last) (4-D and 5-D tensors), .float() etc. keep weights, parameters and outputs."""
    layer = make_layer(kind, "3x3-s2-reflect-g2")
    weight = layer.weight
    x = make_input(layer, 2)
    before = layer(x)
    model = nn.Sequential(layer).to(memory_format=torch.channels_last)
    assert layer.weight is weight and layer.weight.shape == (3, 6, 2, 3, 3)  # same Parameter: optimizers still see it
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), before, rtol=0, atol=1e-12)
    model.float()
    assert layer.weight is weight and layer.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    torch.testing.assert_close(model(x.float()), before.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_parameters_reinitialises(kind):
    layer = make_layer(kind, "3x3-s2-reflect-g2")
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)


def test_extra_repr():
    layer = CondConv2d(4, 6, 3, stride=2, padding=1, num_experts=4)
    assert layer.extra_repr() == "4, 6, kernel_size=(3, 3), stride=(2, 2), num_experts=4, padding=(1, 1)"
    assert "(router): SigmoidRouter" in repr(layer)
    for absent in ("dilation", "groups", "bias=", "padding_mode", "strategy", "routing="):
        assert absent not in layer.extra_repr()
    full = CondConv2d(4, 8, (1, 3), padding="same", dilation=2, groups=4, bias=False, padding_mode="reflect",
                      num_experts=2, routing="softmax", strategy="bmm").extra_repr()
    for present in ("kernel_size=(1, 3)", "num_experts=2", "padding=same", "dilation=(2, 2)", "groups=4",
                    "bias=False", "padding_mode='reflect'", "strategy='bmm'", "routing='softmax'"):
        assert present in full, present
    assert "num_experts=3" in DynamicConv2d(4, 4, 3, num_experts=3).extra_repr()
    assert "num_experts=2" in ODConv2d(4, 4, 3, num_experts=2).extra_repr()


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_keeps_temperature(kind):
    layer = make_layer(kind, "3x3-s2-reflect-g2")
    has_temperature = kind != "condconv"
    assert ("router.temperature" in layer.state_dict()) == has_temperature
    if has_temperature:
        assert "router.temperature" in dict(layer.named_buffers())
        assert set_temperature(layer, 7.5) == 1
    state = layer.state_dict()
    fresh = make_layer(kind, "3x3-s2-reflect-g2")
    fresh.load_state_dict(state)
    if has_temperature:
        assert float(fresh.router.temperature) == 7.5
    x = make_input(layer, 2)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_set_temperature_and_schedule():
    model = nn.Sequential(DynamicConv2d(4, 4, 3, padding=1), CondConv2d(4, 4, 3, padding=1),
                          CondConv2d(4, 4, 1, routing="softmax"), ODConv2d(4, 4, 3, padding=1))
    assert set_temperature(model, 30.0) == 3  # the sigmoid CondConv has no temperature
    temps = [float(m.temperature) for m in model.modules() if "temperature" in getattr(m, "_buffers", {})]
    assert temps == [30.0, 30.0, 30.0]
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got 0"):
        set_temperature(model, 0)

    sched = TemperatureSchedule(30.0, 1.0, iterations=100)
    assert [sched.value(s) for s in (0, 50, 99, 100, 1000)] == [30.0, 15.5, pytest.approx(1.29), 1.0, 1.0]
    assert sched.value(-5) == 30.0
    assert sched.step(model, 50) == 15.5
    assert [float(m.temperature) for m in model.modules() if "temperature" in m._buffers] == [15.5] * 3
    assert TemperatureSchedule(5.0, 2.0, iterations=0).value(0) == 2.0
    assert "iterations=100" in repr(sched)
    with pytest.raises(ValueError, match=r"iterations must be a non-negative int"):
        TemperatureSchedule(30.0, 1.0, iterations=-1)
    with pytest.raises(ValueError, match=r"temperature must be a positive number"):
        TemperatureSchedule(0.0, 1.0, iterations=5)


@pytest.mark.parametrize("kind", ["condconv-softmax", "dynamic", "odconv"])
def test_temperature_changes_outputs(kind):
    layer = make_layer(kind, "3x3-s2-reflect-g2").eval()
    x = make_input(layer, 2)
    before = layer(x)
    set_temperature(layer, 0.05)
    assert not torch.allclose(layer(x), before)


def test_high_temperature_makes_softmax_routing_uniform():
    layer = DynamicConv2d(8, 8, 3, num_experts=4, dtype=F64)
    set_temperature(layer, 1e9)
    routing = layer.router(torch.randn(3, 8, 5, 5, dtype=F64))
    torch.testing.assert_close(routing, torch.full((3, 4), 0.25, dtype=F64), rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# Strategy selection through layers


def _expected_shape(layer, batch):
    return {"batch": batch, "experts": layer.num_experts, "out_channels": layer.out_channels, "groups": layer.groups}


@pytest.mark.parametrize("kind", KINDS)
def test_layer_strategy_attribute_and_overrides(spy, kind):
    layer = make_layer(kind, "3x3-s2-reflect-g2", strategy="single")
    x = make_input(layer, 2)
    with pytest.raises(ValueError, match=r"strategy='single' needs batch size 1, got 2"):
        layer(x)
    layer.strategy = "experts"
    assert spy(lambda: layer(x), **_expected_shape(layer, 2)) == "experts"
    with use_strategy("bmm"):  # overrides the layer's explicit strategy
        assert spy(lambda: layer(x), **_expected_shape(layer, 2)) == "bmm"
        with use_strategy("grouped"):
            assert spy(lambda: layer(x), **_expected_shape(layer, 2)) == "grouped"
        assert spy(lambda: layer(x), **_expected_shape(layer, 2)) == "bmm"
    assert spy(lambda: layer(x), **_expected_shape(layer, 2)) == "experts"


def test_set_default_strategy_applies_to_layers_without_one(spy):
    free = make_layer("condconv", "3x3-s2-reflect-g2")
    pinned = make_layer("condconv", "3x3-s2-reflect-g2", strategy="bmm")
    x = make_input(free, 2)
    set_default_strategy("experts")
    assert spy(lambda: free(x), **_expected_shape(free, 2)) == "experts"
    assert spy(lambda: pinned(x), **_expected_shape(pinned, 2)) == "bmm"
    set_default_strategy("grouped")
    assert spy(lambda: free(x), **_expected_shape(free, 2)) == "grouped"


# ----------------------------------------------------------------------------------------------------------------
# make_conv2d


def test_make_conv2d():
    static = make_conv2d("static", 4, 6, 3, 2, 1, num_experts=8, padding_mode="reflect", routing="softmax")
    assert type(static) is nn.Conv2d and static.stride == (2, 2) and static.padding_mode == "reflect"
    for kind, cls, default in (("condconv", CondConv2d, 8), ("dynamic", DynamicConv2d, 4), ("odconv", ODConv2d, 4)):
        layer = make_conv2d(kind, 4, 8, 3, 1, 1, 1, 4, False)
        assert type(layer) is cls and layer.num_experts == default and layer.groups == 4 and layer.bias is None
        assert make_conv2d(kind, 4, 8, 3, num_experts=2, padding_mode="circular").num_experts == 2
    assert make_conv2d("condconv", 4, 4, 1, routing="external").router is None
    with pytest.raises(ValueError, match=r"conv must be one of .*'odconv'.*got 'cond'"):
        make_conv2d("cond", 4, 4, 3)


# ----------------------------------------------------------------------------------------------------------------
# Validation

ALL_KIND_ERRORS = [
    ({"num_experts": 0}, r"num_experts must be a positive int, got 0"),
    ({"num_experts": 2.0}, r"num_experts must be a positive int, got 2\.0"),
    ({"num_experts": True}, r"num_experts must be a positive int, got True"),
    ({"in_channels": 0}, r"in_channels must be a positive int"),
    ({"in_channels": 3, "groups": 2}, r"in_channels \(3\) must be divisible by groups \(2\)"),
    ({"out_channels": 5, "groups": 2}, r"out_channels \(5\) must be divisible by groups \(2\)"),
    ({"groups": 0}, r"groups must be a positive int"),
    ({"kernel_size": 0}, r"kernel_size must be positive"),
    ({"kernel_size": (3, 3, 3)}, r"kernel_size must be an int or a pair of ints"),
    ({"stride": 0}, r"stride must be positive"),
    ({"padding_mode": "mirror"}, r"padding_mode must be one of .*'reflect'.*got 'mirror'"),
    ({"strategy": "fast"}, r"strategy must be None or one of .*'grouped'.*got 'fast'"),
    ({"padding": "same", "stride": 2}, r"padding='same' requires stride 1"),
    ({"padding": -1}, r"padding must be non-negative, got -1"),
    ({"padding": (0, -1)}, r"padding must be non-negative"),
    ({"padding": "full"}, r"padding must be an int, a pair of ints, 'same' or 'valid', got 'full'"),
    ({"temperature": 0}, r"temperature must be a positive number, got 0"),
    ({"temperature": -1.0}, r"temperature must be a positive number, got -1\.0"),
    ({"temperature": "hot"}, r"temperature must be a positive number, got 'hot'"),
]
KIND_ERRORS = [
    ("condconv", {"routing": "relu"}, r"routing must be 'sigmoid', 'softmax' or 'external', got 'relu'"),
    ("condconv", {"routing_dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1\.0"),
    ("condconv", {"routing": "external", "routing_dropout": -0.5}, r"dropout must be a number in \[0, 1\)"),
    ("condconv", {"routing": "external", "temperature": 0.0}, r"temperature must be a positive number, got 0\.0"),
    ("dynamic", {"reduction": 0}, r"reduction must be a positive int, got 0"),
    ("odconv", {"norm": "group"}, r"norm must be one of \('layer', 'batch', 'none'\), got 'group'"),
    ("odconv", {"reduction": 0}, r"reduction must be a positive number, got 0"),
    ("odconv", {"min_channels": 0}, r"min_channels must be a positive int, got 0"),
]
_CONSTRUCT = [(kind, changes, match) for kind in KINDS for changes, match in ALL_KIND_ERRORS] + KIND_ERRORS


@pytest.mark.parametrize("kind, changes, match", _CONSTRUCT, ids=[f"{k}-{list(c)[-1]}={list(c.values())[-1]!r}"
                                                                  for k, c, _ in _CONSTRUCT])
def test_bad_configuration_raises_value_error(kind, changes, match):
    cls, kwargs = KINDS[kind]
    args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kwargs, **changes}
    exc = TypeError if "kernel_size" in changes and isinstance(changes["kernel_size"], tuple) else ValueError
    with pytest.raises(exc, match=match):
        cls(**args)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs(kind):
    layer = make_layer(kind, "3x3-s2-reflect-g2")
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name} expects a 4-D input \(batch, 4, height, width\), got shape "
                                         r"\(4, 7, 6\)"):
        layer(torch.randn(4, 7, 6, dtype=F64))
    with pytest.raises(ValueError, match=rf"{name} expects 4 input channels, got 3"):
        layer(torch.randn(2, 3, 7, 6, dtype=F64))
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor, got list"):
        layer([[1.0, 2.0]])
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor, got ndarray"):
        layer(torch.randn(2, 4, 7, 6).numpy())
    small = make_layer(kind, "5x5-s21-valid")
    with pytest.raises(ValueError, match=r"input of size 4x4 is too small for a 5x5 kernel"):
        small(torch.randn(2, 3, 4, 4, dtype=F64))
    layer.strategy = "single"
    with pytest.raises(ValueError, match=r"strategy='single' needs batch size 1, got 2"):
        layer(torch.randn(2, 4, 7, 6, dtype=F64))
