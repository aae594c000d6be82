"""1-D and 3-D dynamic convolutions: the engine's strategies against the per-example reference (float64, 1e-10) and
gradcheck, the layers against their 2-D counterparts on size-1 axes, per-example independence, conversion of
``nn.Conv1d``/``nn.Conv3d`` models, the MAC counter and ONNX export with a dynamic batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import condconv
from condconv import dynamic_conv, dynamic_conv1d, dynamic_conv2d, dynamic_conv3d, use_strategy
from condconv.models.macs import count_macs
from condconv.nn.layers import LAYERS_BY_RANK
from condconv.nn.reference import reference_dynamic_conv, reference_odconv

pytestmark = [
    pytest.mark.usefixtures("one_thread", "clean_strategy"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

F64 = torch.float64
SIZES = {1: (11,), 3: (5, 6, 4)}  # non-cubic, big enough for a dilated 3-kernel 'valid' and reflect padding of 2
KINDS = ("condconv", "dynamic", "odconv")

# (kernel, stride, padding, dilation, (in, out, groups), padding_mode, bias, spatial): dense, grouped and depthwise
# layers, every padding form and mode, per-axis tuples, strides and dilations, with and without spatial attention
CONFIGS = [
    (3, 1, 1, 1, (3, 4, 1), "zeros", True, True),
    (1, 2, 0, 1, (4, 6, 2), "zeros", False, False),
    (2, 2, 1, 2, (4, 4, 4), "reflect", True, True),
    (3, 1, "same", 1, (4, 8, 4), "circular", False, True),
    (3, 2, "valid", 1, (4, 6, 2), "replicate", True, False),
    ("tuple", "tuple", "tuple", 1, (3, 4, 1), "zeros", True, True),
]


def _geometry(cfg, rank: int) -> dict:
    kernel, stride, padding, dilation, channels, mode, bias, spatial = cfg
    if kernel == "tuple":  # distinct values per axis
        kernel, stride, padding = (3, 1, 2)[:rank], (2, 1, 1)[:rank], (1, 0, 2)[:rank]
        if rank == 1:
            kernel, stride, padding = (2,), (2,), (1,)
    return {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "channels": channels,
            "padding_mode": mode, "bias": bias, "spatial": spatial}


def _kernel_tuple(kernel, rank: int) -> tuple[int, ...]:
    return tuple(kernel) if isinstance(kernel, tuple) else (kernel,) * rank


def _inputs(geo: dict, rank: int, batch: int, experts: int = 3, channels_last: bool = False):
    c_in, c_out, groups = geo["channels"]
    kernel = _kernel_tuple(geo["kernel"], rank)
    x = torch.randn(batch, c_in, *SIZES[rank], dtype=F64)
    if channels_last and rank == 3:
        x = x.to(memory_format=torch.channels_last_3d)
    weight = torch.randn(experts, c_out, c_in // groups, *kernel, dtype=F64)
    routing = torch.rand(batch, experts, dtype=F64)
    bias = torch.randn(experts, c_out, dtype=F64) if geo["bias"] else None
    spatial = torch.rand(batch, *kernel, dtype=F64) if geo["spatial"] else None
    return x, weight, routing, bias, spatial


def _call(geo: dict, x, weight, routing, bias, spatial, strategy: str, **scales):
    return dynamic_conv(x, weight, routing, bias, geo["stride"], geo["padding"], geo["dilation"], geo["channels"][2],
                        geo["padding_mode"], spatial=spatial, strategy=strategy, **scales)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_every_strategy_matches_the_reference(strategy, rank, index):
    """Forward and gradients of every strategy (and execution path) equal the per-example reference, float64."""
    geo = _geometry(CONFIGS[index], rank)
    batch = 1 if strategy == "single" else 3
    x, weight, routing, bias, spatial = _inputs(geo, rank, batch, channels_last=index % 2 == 1)
    leaves = [t.requires_grad_() for t in (x, weight, routing, bias, spatial) if t is not None]
    ref = reference_dynamic_conv(x, weight, routing, bias, geo["stride"], geo["padding"], geo["dilation"],
                                 geo["channels"][2], geo["padding_mode"], spatial=spatial)
    out = _call(geo, x, weight, routing, bias, spatial, strategy)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, leaves, grad)
    got = torch.autograd.grad(out, leaves, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    with torch.no_grad():  # the inference paths (reused buffers) too
        torch.testing.assert_close(_call(geo, x, weight, routing, bias, spatial, strategy), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 3])
def test_gradcheck(strategy, rank):
    """torch.autograd.gradcheck of every strategy through kernel, routing, bias, spatial and channel scales."""
    kernel = (2,) if rank == 1 else (2, 1, 2)
    batch = 1 if strategy == "single" else 2
    size = (5,) if rank == 1 else (3, 2, 3)
    x = torch.randn(batch, 4, *size, dtype=F64, requires_grad=True)
    weight = torch.randn(2, 4, 2, *kernel, dtype=F64, requires_grad=True)
    routing = torch.rand(batch, 2, dtype=F64, requires_grad=True)
    bias = torch.randn(2, 4, dtype=F64, requires_grad=True)
    spatial = torch.rand(batch, *kernel, dtype=F64, requires_grad=True)
    in_scale = torch.rand(batch, 4, dtype=F64, requires_grad=True)
    out_scale = torch.rand(batch, 4, dtype=F64, requires_grad=True)

    def f(x, weight, routing, bias, spatial, in_scale, out_scale):
        return dynamic_conv(x, weight, routing, bias, 2 if rank == 1 else (1, 1, 2), 1, 1, 2, spatial=spatial,
                            in_scale=in_scale, out_scale=out_scale, strategy=strategy)

    assert torch.autograd.gradcheck(f, (x, weight, routing, bias, spatial, in_scale, out_scale), fast_mode=True)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("name", ["grouped", "experts", "bmm", "scan"])
def test_the_requested_strategy_runs(spy, rank, name):
    """An explicit strategy is what executes in 1-D and 3-D as in 2-D (told apart by the convolutions it runs)."""
    geo = _geometry(CONFIGS[0], rank)
    x, weight, routing, bias, _ = _inputs(geo, rank, 3)
    assert spy(lambda: _call(geo, x, weight, routing, bias, None, name), 3, 3, 4, 1) == name


@pytest.mark.parametrize("rank", [1, 3])
def test_batch_one_single_and_empty_batch(spy, rank):
    geo = _geometry(CONFIGS[0], rank)
    x, weight, routing, bias, spatial = _inputs(geo, rank, 1)
    assert spy(lambda: _call(geo, x, weight, routing, bias, spatial, "auto"), 1, 3, 4, 1) == "single"
    empty = _call(geo, x[:0].requires_grad_(), weight.requires_grad_(), routing[:0], bias, spatial[:0], "auto")
    assert empty.shape == (0, 4, *_call(geo, x, weight, routing, bias, spatial, "auto").shape[2:])
    empty.sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize("rank", [1, 3])
def test_rank_checked_entry_points_and_triton(rank):
    geo = _geometry(CONFIGS[0], rank)
    x, weight, routing, bias, spatial = _inputs(geo, rank, 2)
    entry = {1: dynamic_conv1d, 3: dynamic_conv3d}[rank]
    torch.testing.assert_close(entry(x, weight, routing, bias, 1, 1, spatial=spatial),
                               dynamic_conv(x, weight, routing, bias, 1, 1, spatial=spatial), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"weight must be 5-D \(num_experts, out_channels, in_channels // groups, "
                                         r"kh, kw\)"):
        dynamic_conv2d(x, weight, routing)
    other = {1: dynamic_conv3d, 3: dynamic_conv1d}[rank]
    with pytest.raises(ValueError, match="weight must be"):
        other(x, weight, routing)
    axes = {1: "length", 3: "depth, height, width"}[rank]
    with pytest.raises(ValueError, match=rf"input must be {rank + 2}-D \(batch, channels, {axes}\)"):
        dynamic_conv(x[0], weight, routing)
    with pytest.raises(ValueError, match=r"spatial must have shape"):
        dynamic_conv(x, weight, routing, spatial=torch.rand(2, 9 ** rank, dtype=F64))
    with pytest.raises(TypeError, match="stride must be an int or"):
        dynamic_conv(x, weight, routing, stride=(1, 1) if rank != 2 else (1,))
    with pytest.raises(ValueError, match=rf"strategy='triton' supports 2-D convolutions only, got a {rank}-D one"):
        dynamic_conv(x, weight, routing, strategy="triton")
    layer = LAYERS_BY_RANK[rank]["odconv"](3, 4, 3, padding=1, dtype=F64)
    with pytest.raises(ValueError, match=rf"strategy='triton' supports 2-D convolutions only, got a {rank}-D"), \
            use_strategy("triton"):
        layer(x)


def _lift_kernel(state: dict, axis: int) -> dict:
    """A state_dict with a size-1 kernel axis inserted at ``axis`` of the expert bank (everything else as is)."""
    return {key: value.unsqueeze(axis) if key == "weight" else value for key, value in state.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [1, 3])
def test_layer_equals_its_2d_counterpart_on_size_one_axes(kind, rank, multi_strategy):
    """Conv1d over L == Conv2d over (1, L) with a (1, k) kernel; Conv3d over (1, H, W) == Conv2d over (H, W)."""
    torch.manual_seed(1)
    options = {"padding_mode": "reflect", "dtype": F64}
    if rank == 1:
        layer = LAYERS_BY_RANK[1][kind](4, 6, 3, stride=2, padding=1, dilation=2, **options)
        flat = LAYERS_BY_RANK[2][kind](4, 6, (1, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2), **options)
        flat.load_state_dict(_lift_kernel(layer.state_dict(), 3))
        x = torch.randn(3, 4, 13, dtype=F64)
        low, high = layer, flat
    else:
        flat = LAYERS_BY_RANK[2][kind](4, 6, (3, 2), stride=(1, 2), padding=(1, 1), **options)
        layer = LAYERS_BY_RANK[3][kind](4, 6, (1, 3, 2), stride=(1, 1, 2), padding=(0, 1, 1), **options)
        layer.load_state_dict(_lift_kernel(flat.state_dict(), 3))
        x = torch.randn(3, 4, 7, 6, dtype=F64)
        low, high = flat, layer
    assert set(layer.state_dict()) == set(flat.state_dict())
    for module in (low, high):
        module.strategy = multi_strategy
    torch.testing.assert_close(high(x.unsqueeze(2)), low(x).unsqueeze(2), rtol=0, atol=1e-12)  # the size-1 axis


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [1, 3])
def test_layers_match_the_reference_and_are_independent_per_example(kind, rank, multi_strategy):
    """Each layer against the reference fed its own router's output, over every strategy; and example ``b`` of a
    batch equals the layer on example ``b`` alone."""
    cls = LAYERS_BY_RANK[rank][kind]
    layer = cls(4, 6, 3, stride=2, padding=1, groups=2, dtype=F64, strategy=multi_strategy)
    x = torch.randn(3, 4, *SIZES[rank], dtype=F64)
    out = layer(x)
    geometry = (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
    if kind == "odconv":
        att = layer.router(x)
        assert att.spatial.shape == (3, 3, 3, 3)[:rank + 1] and layer.router.spatial.out_features == 3 ** rank
        ref = reference_odconv(x, layer.weight, att.expert, att.spatial, att.in_channel, att.out_channel,
                               layer.bias, *geometry)
    else:
        ref = reference_dynamic_conv(x, layer.weight, layer.router(x), layer.bias, *geometry)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for b in range(3):
        torch.testing.assert_close(layer(x[b:b + 1]), out[b:b + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [1, 3])
def test_layer_gradcheck(kind, rank):
    """gradcheck of each layer, router included, through its input, experts and bias."""
    cls = LAYERS_BY_RANK[rank][kind]
    layer = cls(4, 4, 2, padding=1, groups=2, num_experts=2, dtype=F64)
    x = torch.randn(2, 4, *((5,) if rank == 1 else (2, 3, 2)), dtype=F64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [1, 3])
def test_layer_contract(kind, rank):
    """Arguments, state_dict layout, initialisation, memory formats and input checks of the 1-D/3-D layers."""
    cls = LAYERS_BY_RANK[rank][kind]
    kernel = (3,) if rank == 1 else (3, 1, 2)
    layer = cls(4, 8, kernel, 1, "same", 1, 2, True, "zeros", num_experts=3)
    assert layer.spatial_dims == rank and type(layer).__name__.endswith(f"{rank}d")
    assert layer.weight.shape == (3, 8, 2, *kernel) and layer.bias.shape == (3, 8)
    two_d = LAYERS_BY_RANK[2][kind](4, 8, 3, padding="same", groups=2, num_experts=3)
    assert list(layer.state_dict()) == list(two_d.state_dict())
    bound = 1 / math.sqrt(2 * math.prod(kernel))  # nn.Conv's init per expert: fan-in of one expert
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound
    official = cls(4, 8, kernel, init="official", num_experts=2)
    assert official.official_std() == pytest.approx(math.sqrt(2.0 / (8 * math.prod(kernel))))
    assert official.weight.std().item() == pytest.approx(official.official_std(), rel=0.5)
    if rank == 3:
        layer.to(memory_format=torch.channels_last_3d)
    else:
        layer.to(memory_format=torch.channels_last)
    assert layer.weight.is_contiguous()
    x = torch.randn(2, 4, *SIZES[rank])
    assert layer(x).shape == (2, 8, *SIZES[rank])
    axes = {1: "length", 3: "depth, height, width"}[rank]
    with pytest.raises(ValueError, match=rf"{cls.__name__} expects a {rank + 2}-D input \(batch, 4, {axes}\)"):
        layer(torch.randn(2, 4, 5, 5) if rank == 1 else torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="kernel_size must be an int or"):
        cls(4, 8, (3, 3) if rank != 2 else (3,))
    with pytest.raises(TypeError, match=rf"conv must be a torch.nn.Conv{rank}d, got Conv2d"):
        cls.from_conv(nn.Conv2d(4, 8, 3))
    assert f"kernel_size={tuple(kernel)}" in repr(layer)


def _static_model(rank: int) -> nn.Module:
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[rank]
    pool = {1: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool3d}[rank]
    return nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, stride=2, padding=1, groups=8),
                         conv(8, 6, 1), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(6, 5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [1, 3])
def test_convert_is_function_preserving(kind, rank):
    model = _static_model(rank).double().eval()
    x = torch.randn(2, 3, *SIZES[rank], dtype=F64)
    converted, names = condconv.convert(model, kind, num_experts=3, include="*", perturb=0.1, seed=0)
    assert names == ["0", "2", "3"]
    expected = LAYERS_BY_RANK[rank][kind]
    assert all(type(converted.get_submodule(name)) is expected for name in names)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-12)
    assert condconv.select_convs(model) == ["3"]  # the default rule, the last third, holds for every rank
    mixed = nn.Sequential(nn.Conv1d(3, 3, 1), nn.Flatten(0, 0))
    with pytest.raises(TypeError, match="no convertible nn.Conv2d, only: 1 \\(Flatten\\)"):
        condconv.select_convs(mixed, "1")


@pytest.mark.parametrize("rank", [1, 3])
def test_count_macs(rank):
    """Static and dynamic 1-D/3-D layers: the conv formula over every axis, the mixing and routing conventions."""
    static = _static_model(rank)
    size = (3, *SIZES[rank])
    report = count_macs(static, size)
    out = [math.prod(SIZES[rank]), math.prod(math.ceil(s / 2) for s in SIZES[rank])]
    conv = out[0] * 8 * 3 * 3 ** rank + out[1] * 8 * 3 ** rank + out[1] * 6 * 8 + 6 * 5
    assert report.categories["conv"].macs == conv
    assert report.categories["other"].macs == out[1] * 6  # the global average pool
    dynamic, _ = condconv.convert(static, "condconv", num_experts=4, include="*")
    counted = count_macs(dynamic, size)
    assert counted.categories["conv"].macs == conv
    experts = (8 * 3 * 3 ** rank + 8) + (8 * 3 ** rank + 8) + (6 * 8 + 6)
    assert counted.categories["mixing"].macs == 4 * experts
    assert counted.categories["routing"].macs == 3 * out[0] + 8 * out[0] + 8 * out[1] + 4 * (3 + 8 + 8)
    assert counted.params == sum(p.numel() for p in dynamic.parameters())
    expected = {1: r"two positive ints \(channels, length\)", 3: r"four positive ints \(channels, depth, height"}
    with pytest.raises(ValueError, match=rf"input_size must be {expected[rank]}"):
        count_macs(static, (3, 8, 8))


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 3])
def test_onnx_export_with_a_dynamic_batch(rank, tmp_path):
    """Every kind in one model, exported by both ONNX exporters, runs in onnxruntime at two batch sizes."""
    pytest.importorskip("onnxruntime")
    from condconv.deploy.export import export_model, onnx_dynamo_available

    layers = LAYERS_BY_RANK[rank]
    model = nn.Sequential(layers["condconv"](3, 6, 3, padding=1), nn.ReLU(), layers["odconv"](6, 6, 3, bias=False),
                          layers["dynamic"](6, 4, 1, stride=2)).eval()
    size = (3, *SIZES[rank])
    exporters = ["torchscript"] + (["dynamo"] if onnx_dynamo_available() else [])
    for exporter in exporters:
        path = export_model(model, tmp_path / f"{exporter}.onnx", input_size=size, exporter=exporter, verify=True,
                            verify_batch_sizes=(1, 3))
        assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="input_size must be"):
        export_model(model, tmp_path / "bad.onnx", input_size=(3, 8, 8) if rank == 1 else (3, 8))
