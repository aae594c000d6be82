"""Deployment paths: the ``scan`` strategy traced by torch.export, static-batch export, the layers' cached validation
and their dtype and temperature checks."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import condconv
import condconv.nn.functional as functional
from condconv import dynamic_conv2d, select_strategy
from condconv.deploy.export import export_model, load_exported, verify_export
from condconv.nn.ops.decomposed import SCAN_TRACEABLE
from condconv.nn.reference import reference_dynamic_conv2d

pytestmark = pytest.mark.usefixtures("clean_strategy")

F64 = torch.float64
needs_scan = pytest.mark.skipif(not SCAN_TRACEABLE, reason="torch has no scan operation to trace")
needs_ort = pytest.mark.skipif(not (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript")),
                               reason="needs onnxruntime and onnxscript")

# (in, out, groups, kernel, stride, padding, dilation, padding_mode, bias, spatial): dense, depthwise, grouped, odd
SCAN_CASES = {
    "3x3-dense-bias": (4, 6, 1, 3, 1, 1, 1, "zeros", True, False),
    "3x3-dw-s2-spatial": (4, 4, 4, 3, 2, 1, 1, "zeros", False, True),
    "5x5-dw-x2-reflect": (4, 8, 4, 5, 1, 2, 1, "reflect", True, True),
    "2x3-grouped-same-d2": (4, 6, 2, (2, 3), 1, "same", 2, "circular", False, True),
    "1x1-grouped-strided": (6, 4, 2, 1, 2, 0, 1, "zeros", True, False),
}


class _Conv(nn.Module):
    """``dynamic_conv2d`` of fixed experts as a module taking ``(x, routing, spatial)``."""

    def __init__(self, case, strategy: str = "auto") -> None:
        super().__init__()
        ci, co, groups, kernel, stride, padding, dilation, mode, bias, _ = case
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.weight = nn.Parameter(torch.randn(3, co, ci // groups, kh, kw, dtype=F64))
        self.bias = nn.Parameter(torch.randn(3, co, dtype=F64)) if bias else None
        self.kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "padding_mode": mode}
        self.strategy = strategy

    def forward(self, x, routing, spatial=None):
        return dynamic_conv2d(x, self.weight, routing, self.bias, spatial=spatial, strategy=self.strategy, **self.kw)

    def inputs(self, batch: int, spatial: bool):
        ci, (kh, kw) = self.weight.shape[2] * self.kw["groups"], self.weight.shape[-2:]
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, ci, 9, 8, dtype=F64, generator=gen)
        routing = torch.rand(batch, 3, dtype=F64, generator=gen)
        return (x, routing, torch.rand(batch, kh, kw, dtype=F64, generator=gen) + 0.5 if spatial else None)

    def reference(self, x, routing, spatial=None):
        return reference_dynamic_conv2d(x, self.weight, routing, self.bias, spatial=spatial, **self.kw)


def _export(module: nn.Module, args) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch")
    dims = tuple({0: batch} if a is not None else None for a in args)
    return torch.export.export(module, args, dynamic_shapes=dims)


@needs_scan
@pytest.mark.parametrize("case", SCAN_CASES.values(), ids=SCAN_CASES.keys())
def test_scan_under_torch_export_matches_reference(case):
    """The traced ``scan`` (a loop over a symbolic batch) equals the reference at other batch sizes, in float64."""
    module = _Conv(case, "scan")
    spatial = case[-1]
    program = _export(module, module.inputs(2, spatial))
    assert any("scan" in str(n.target) for n in program.graph.nodes)
    run = program.module()
    for batch in (1, 3, 5):
        args = module.inputs(batch, spatial)
        torch.testing.assert_close(run(*args), module.reference(*args), rtol=0, atol=1e-10)


@needs_scan
def test_auto_exports_scan_for_kxk_and_bmm_for_dense_pointwise():
    for name, case in SCAN_CASES.items():
        module = _Conv(case)
        program = _export(module, module.inputs(2, case[-1]))
        targets = {str(n.target) for n in program.graph.nodes}
        dense_pointwise = case[2] == 1 and case[3] == 1
        assert any("scan" in t for t in targets) != dense_pointwise, name
        assert not any("convolution" in t and "scan" not in t for t in targets if dense_pointwise), name
    assert select_strategy(2, 8, 8, (3, 3), 8, 4, (7, 7), tracing="export") == "scan"
    assert select_strategy(2, 8, 8, (1, 1), 1, 4, (7, 7), tracing="export") == "bmm"
    assert select_strategy(2, 8, 8, (3, 3), 1, 4, (7, 7), spatial=True, tracing="jit") == "experts"
    assert select_strategy(2, 8, 8, (3, 3), 1, 4, (7, 7), spatial=True, tracing="compile") == "bmm"
    assert select_strategy(1, 8, 8, (3, 3), 8, 4, (7, 7), tracing="static") == "single"
    assert select_strategy(3, 8, 8, (3, 3), 8, 4, (7, 7), tracing="static") == "grouped"


@needs_scan
def test_scan_compiles_with_a_dynamic_batch_and_gradients_match():
    """torch.compile(dynamic=True) traces the scan (aot_eager: Inductor cannot lower it in torch 2.13)."""
    case = SCAN_CASES["3x3-dw-s2-spatial"]
    module = _Conv(case, "scan")
    compiled = torch.compile(module, backend="aot_eager", dynamic=True)
    for batch in (2, 3):
        args = [None if a is None else a.requires_grad_(True) for a in module.inputs(batch, True)]
        out = compiled(*args)
        ref_args = [None if a is None else a.detach().clone().requires_grad_(True) for a in args]
        ref = module.reference(*ref_args)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        cot = torch.randn_like(ref)
        got = torch.autograd.grad((out * cot).sum(), [a for a in args if a is not None])
        want = torch.autograd.grad((ref * cot).sum(), [a for a in ref_args if a is not None])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_scan_cannot_be_traced_by_jit():
    module = _Conv(SCAN_CASES["3x3-dense-bias"], "scan")
    with pytest.raises(ValueError, match="strategy='scan' cannot be traced by torch.jit"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(module, module.inputs(2, False)[:2], check_trace=False)


# ----------------------------------------------------------------------------------------------------------------
# ONNX: what the exported graph holds


def _odconv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        condconv.ODConv2d(3, 8, 3, padding=1, num_experts=3), nn.BatchNorm2d(8), nn.ReLU(),
        condconv.ODConv2d(8, 8, 3, padding=1, groups=8, num_experts=3), nn.ReLU(),
        condconv.CondConv2d(8, 16, 3, stride=2, padding=1, num_experts=4), nn.ReLU(),
        condconv.DynamicConv2d(16, 16, 5, padding=2, groups=16), nn.ReLU(),
        condconv.CondConv2d(16, 16, 1, num_experts=4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() <= 2:
                p.add_(torch.randn_like(p) * 0.3)
    return net.eval()


@needs_ort
@needs_scan
def test_onnx_dynamic_batch_runs_one_conv_per_example(tmp_path):
    onnx = pytest.importorskip("onnx")
    net = _odconv_net()
    path = export_model(net, tmp_path / "od.onnx", "onnx", (3, 12, 12), exporter="dynamo")
    errors = verify_export(path, net, (3, 12, 12), batch_sizes=(1, 3, 8))
    assert max(errors.values()) < 1e-4
    graph = onnx.load(str(path)).graph
    scans = [n for n in graph.node if n.op_type == "Scan"]
    assert len(scans) == 4  # the four kxk layers; the 1x1 layer is a MatMul
    body_convs = [m for n in scans for a in n.attribute if a.name == "body" for m in a.g.node if m.op_type == "Conv"]
    assert len(body_convs) == 4  # one convolution per example, not one per kernel position
    assert [n.op_type for n in graph.node].count("Conv") == 0  # no expert-stacked or shifted convolutions
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param


@needs_ort
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_static_batch_one_is_a_plain_conv_with_a_computed_weight(tmp_path, exporter):
    onnx = pytest.importorskip("onnx")
    net = _odconv_net()
    path = export_model(net, tmp_path / "b1.onnx", "onnx", (3, 12, 12), batch_size=1, exporter=exporter, verify=True)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    initializers = {i.name for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 5 and all(n.input[1] not in initializers for n in convs)  # every dynamic layer
    assert not [n for n in graph.node if n.op_type in ("Scan", "Loop")]
    x = torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(load_exported(path)(x), net(x), rtol=1e-4, atol=1e-4)


def test_static_batch_larger_than_one_and_option_errors(tmp_path):
    net = _odconv_net()
    path = export_model(net, tmp_path / "b3.pt2", "exported-program", (3, 12, 12), batch_size=3, verify=True)
    assert load_exported(path)(torch.randn(3, 3, 12, 12)).shape == (3, 5)
    legacy = export_model(net, tmp_path / "d.pt2", "exported-program", (3, 12, 12), batch_size=3, dynamic_batch=True)
    assert load_exported(legacy)(torch.randn(5, 3, 12, 12)).shape == (5, 5)
    with pytest.raises(TypeError, match="dynamic_batch must be None or a bool"):
        export_model(net, tmp_path / "e.pt2", "exported-program", (3, 12, 12), dynamic_batch="yes")
    with pytest.raises(ValueError, match="batch_size must be None or a positive int"):
        export_model(net, tmp_path / "e.pt2", "exported-program", (3, 12, 12), batch_size=True)
    with pytest.raises(ValueError, match="strategy='scan'.*torch.jit"):
        export_model(net, tmp_path / "e.pt", "torchscript", (3, 12, 12), strategy="scan")


def test_cli_static_batch_one(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from condconv.cli import main as cli_main

    out = tmp_path / "m.onnx"
    assert cli_main(["export", "resnet18_cifar", "--model-kwargs", "num_classes=10", "width_mult=0.25",
                     "conv=condconv", "--format", "onnx", "--batch-size", "1", "--out", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "batch 1, ONNX opset" in text and "batch 1: max |diff|" in text
    with pytest.raises(SystemExit):  # argparse rejects it
        cli_main(["export", "resnet18_cifar", "--batch-size", "0", "--out", str(out)])
    assert "--batch-size: expected a positive int, got 0" in capsys.readouterr().err


@needs_ort
@needs_scan
def test_odconv_model_with_every_block_dynamic_exports(tmp_path):
    """Every block dynamic, every layer an ODConv: exports (no kh*kw convolutions per layer) and runs exactly."""
    from condconv.models import create_model

    net = create_model("resnet18_cifar", num_classes=10, width_mult=0.25, conv="odconv", dynamic_blocks="all").eval()
    path = export_model(net, tmp_path / "r18od.onnx", "onnx", (3, 32, 32), exporter="dynamo", verify=True)
    assert path.is_file()


# ----------------------------------------------------------------------------------------------------------------
# The layers' eager path: validation once per input signature, clear dtype errors, finite temperatures


@pytest.mark.parametrize("kind", ["condconv", "dynamic", "odconv"])
def test_layers_validate_once_per_input_signature(monkeypatch, kind):
    layer = condconv.make_conv2d(kind, 4, 6, 3, padding=1, num_experts=3).eval()
    calls = []
    original = functional._validate

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "_validate", counting)
    monkeypatch.setattr(condconv.nn.layers, "_validate", counting)
    x = torch.randn(2, 4, 7, 7)
    first = layer(x)
    for _ in range(3):
        torch.testing.assert_close(layer(x), first)
    assert len(calls) == 1
    layer(torch.randn(3, 4, 5, 5))  # a new shape is validated again
    assert len(calls) == 2
    layer.double()  # so is a new dtype
    layer(x.double())
    assert len(calls) == 3
    with pytest.raises(ValueError, match="expects 4 input channels"):
        layer(torch.randn(2, 5, 7, 7).double())


@pytest.mark.parametrize("kind", ["condconv", "dynamic", "odconv"])
def test_cached_path_equals_the_engine(kind):
    torch.manual_seed(0)
    layer = condconv.make_conv2d(kind, 4, 6, 3, stride=2, padding=1, num_experts=3).double().eval()
    x = torch.randn(3, 4, 9, 8, dtype=F64)
    layer(x)  # the plan is cached now
    with condconv.use_strategy("grouped"):
        want = layer(x)
    for strategy in ("auto", "bmm", "experts", "scan"):
        layer.strategy = strategy
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["condconv", "dynamic", "odconv"])
def test_dtype_mismatch_names_the_layer(kind):
    layer = condconv.make_conv2d(kind, 4, 6, 3, padding=1)
    with pytest.raises(TypeError, match=rf"{type(layer).__name__} has torch.float32 weights but got a torch.float16 "
                                        r"input"):
        layer(torch.randn(2, 4, 6, 6, dtype=torch.float16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is the supported way to mix dtypes
        assert layer(torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)).shape == (2, 6, 6, 6)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0])
def test_temperature_must_be_finite_and_positive(value):
    pattern = r"temperature must be a (finite )?positive number"
    with pytest.raises(ValueError, match=pattern):
        condconv.DynamicConv2d(4, 4, 3, temperature=value)
    with pytest.raises(ValueError, match=pattern):
        condconv.ODConv2d(4, 4, 3, temperature=value)
    with pytest.raises(ValueError, match=pattern):
        condconv.CondConv2d(4, 4, 3, routing="softmax", temperature=value)
    with pytest.raises(ValueError, match=pattern):
        condconv.SoftmaxRouter(4, 3, temperature=value)
    with pytest.raises(ValueError, match=pattern):
        condconv.TemperatureSchedule(value, 1.0, iterations=10)
    if value != 0.0:  # a schedule may end at 0: KernelWarehouse's temperature (set_temperature refuses it below)
        with pytest.raises(ValueError, match=pattern):
            condconv.TemperatureSchedule(30.0, value, iterations=10)
    with pytest.raises(ValueError, match=pattern):
        condconv.set_temperature(condconv.DynamicConv2d(4, 4, 3), value)


def test_batch_one_reuses_its_kernel_buffer_safely():
    """Eager batch-1 inference mixes into a reused buffer: every call must still see its own kernel."""
    torch.manual_seed(0)
    layer = condconv.ODConv2d(8, 8, 3, padding=1, num_experts=3).double().eval()
    other = condconv.CondConv2d(8, 8, 3, padding=1, num_experts=3).double().eval()
    with torch.no_grad():
        for p in layer.router.parameters():
            p.add_(torch.randn_like(p))
    outs, inputs = [], [torch.randn(1, 8, 6, 6, dtype=F64) for _ in range(3)]
    with torch.inference_mode():
        for x in inputs:
            outs.append(layer(x))
            other(x)  # another layer overwrites the shared buffer in between
    for x, out in zip(inputs, outs):
        att = layer.router(x)
        expected = reference_dynamic_conv2d(x * att.in_channel[:, :, None, None], layer.weight, att.expert, None,
                                            padding=1, spatial=att.spatial) * att.out_channel[:, :, None, None]
        expected = expected + (att.expert @ layer.bias)[:, :, None, None]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


BIG_ZOO = [(name, conv) for name in ("resnet50", "efficientnet_b0", "mnasnet_a1", "mobilenet_v2")
           for conv in ("condconv", "dynamic", "odconv")]


@pytest.mark.slow
@needs_ort
@needs_scan
@pytest.mark.parametrize("name, conv", BIG_ZOO, ids=[f"{n}-{c}" for n, c in BIG_ZOO])
def test_big_zoo_models_export_with_any_batch(tmp_path, name, conv):
    """The biggest zoo graphs (default placement), 224x224, dynamic batch, dynamo exporter: the file runs at batch 1
    and 3 like the model. (How long each export takes is measured by benchmarks/export_times.py, not asserted.)"""
    from condconv.models import create_model

    model = create_model(name, conv=conv).eval()
    path = export_model(model, tmp_path / f"{name}.onnx", "onnx", (3, 224, 224), exporter="dynamo")
    errors = verify_export(path, model, (3, 224, 224), batch_sizes=(1, 3))
    assert max(errors.values()) < 1e-3
