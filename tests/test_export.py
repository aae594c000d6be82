"""condconv.deploy.export: ONNX (both exporters), TorchScript and ExportedProgram with a dynamic batch axis."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import condconv
from condconv.cli import main as cli_main
from condconv.deploy.export import export_model, load_exported, verify_export
from condconv.models import create_model
from condconv.nn.ops.context import is_tracing as _is_tracing

KINDS = ["condconv", "dynamic", "odconv"]
SIZE = (3, 12, 12)
DW = 8  # depthwise channels of small_net


def small_net(kind: str) -> nn.Module:
    """Static stem, then dense 3x3, depthwise 3x3, strided 1x1 and grouped 1x1 layers of one dynamic kind."""
    make = condconv.make_conv2d
    return nn.Sequential(
        nn.Conv2d(3, DW, 3, padding=1), nn.BatchNorm2d(DW), nn.ReLU(),
        make(kind, DW, DW, 3, padding=1, num_experts=3), nn.BatchNorm2d(DW), nn.ReLU(),
        make(kind, DW, DW, 3, padding=1, groups=DW, num_experts=3), nn.ReLU(),
        make(kind, DW, 16, 1, stride=2, num_experts=3), nn.ReLU(),
        make(kind, 16, 16, 1, groups=2, num_experts=3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def mixed_net() -> nn.Module:
    """All three layer kinds in one network (ODConv's kxk path traces kh*kw convolutions: 2x2 keeps it quick)."""
    return nn.Sequential(
        condconv.CondConv2d(3, 8, 3, padding=1, num_experts=4), nn.ReLU(),
        condconv.DynamicConv2d(8, 8, 3, padding=1, groups=8, num_experts=4), nn.ReLU(),
        condconv.ODConv2d(8, 16, 2, stride=2, num_experts=2), nn.ReLU(),  # 2x2: spatial attention, quick to trace
        condconv.CondConv2d(16, 16, 1, num_experts=4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def _randomise_routers(model: nn.Module, size=SIZE) -> nn.Module:
    """Non-trivial routing, BatchNorm parameters and statistics, so a wrong strategy cannot pass by accident."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 2:  # routers, norms, biases, classifier: some start at zero
                p.add_(torch.randn_like(p) * 0.3)
        model.train()
        for _ in range(2):
            model(torch.randn(8, *size))
    return model.eval()


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    out = {kind: _randomise_routers(small_net(kind)) for kind in KINDS}
    out["mixed"] = _randomise_routers(mixed_net())
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_dynamic_batch_each_layer_kind(nets, kind, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = export_model(nets[kind], tmp_path / f"{kind}.onnx", "onnx", SIZE, exporter="torchscript")
    errors = verify_export(path, nets[kind], SIZE, batch_sizes=(1, 3, 8))
    assert set(errors) == {1, 3, 8} and max(errors.values()) < 1e-4
    # no batch folded into the convolution groups: only the layers' own group counts appear
    graph = onnx.load(str(path)).graph
    groups = {a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"}
    assert groups <= {1, 2, DW}
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis


def test_onnx_dynamo_exporter(nets, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    path = export_model(nets["mixed"], tmp_path / "mixed.onnx", "onnx", SIZE, exporter="dynamo", verify=True)
    assert path.is_file()


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_formats_dynamic_batch(nets, fmt, tmp_path):
    suffix = {"torchscript": ".pt", "exported-program": ".pt2"}[fmt]
    path = export_model(nets["mixed"], tmp_path / f"mixed{suffix}", fmt, SIZE)
    errors = verify_export(path, nets["mixed"], SIZE, batch_sizes=(1, 3, 8))
    assert max(errors.values()) < 1e-4
    run = load_exported(path)
    assert run(torch.randn(5, *SIZE)).shape == (5, 5)


def test_converted_zoo_model_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    base = _randomise_routers(create_model("resnet18_cifar", num_classes=10, width_mult=0.25), (3, 32, 32))
    model, names = condconv.convert(base, "condconv", num_experts=4, perturb=0.05, seed=0)
    assert len(names) == 7 and base(torch.randn(2, 3, 32, 32)).std() > 0.01
    path = export_model(model, tmp_path / "r18.onnx", "onnx", (3, 32, 32), exporter="torchscript", verify=True)
    run = load_exported(path)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(run(x), base(x), rtol=1e-4, atol=1e-4)  # still the pretrained function


def test_engine_detects_every_tracer(tmp_path):
    """The engine's 'auto' picks batch-independent strategies only if it knows it is traced: check each tracer."""

    class Probe(nn.Module):
        def forward(self, x):
            return x[:, :1, 0, 0] * 0 + float(_is_tracing())

    probe, x = Probe().eval(), torch.randn(2, 3, 4, 4)
    assert probe(x).sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.jit.trace(probe, (x,), check_trace=False)(x).sum() == 2
    assert torch.export.export(probe, (x,)).module()(x).sum() == 2
    assert torch.compile(probe, backend="eager", fullgraph=True)(x).sum() == 2
    if importlib.util.find_spec("onnxruntime"):
        exporters = ["torchscript"] + (["dynamo"] if importlib.util.find_spec("onnxscript") else [])
        for exporter in exporters:
            path = export_model(probe, tmp_path / f"probe_{exporter}.onnx", "onnx", (3, 4, 4), exporter=exporter)
            assert load_exported(path)(x).sum() == 2


def test_pinned_batch_dependent_strategy_is_overridden(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(condconv.CondConv2d(3, 8, 3, padding=1, num_experts=4, strategy="grouped")).eval()
    path = export_model(model, tmp_path / "g.pt2", "exported-program", SIZE, verify=True)
    assert path.is_file() and model[0].strategy == "grouped"
    with pytest.raises(ValueError, match="depends on the batch size"):
        export_model(model, tmp_path / "g2.pt2", "exported-program", SIZE, strategy="grouped")
    with condconv.use_strategy("single"):  # a global batch-dependent default is overridden as well
        export_model(model, tmp_path / "g3.pt", "torchscript", SIZE, verify=True)


def test_errors(nets, tmp_path):
    model = small_net("condconv")  # training mode
    with pytest.raises(ValueError, match="model.eval\\(\\)"):
        export_model(model, tmp_path / "a.onnx")
    model.eval()
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, tmp_path / "a.tflite", "tflite", SIZE)
    with pytest.raises(ValueError, match="exporter"):
        export_model(model, tmp_path / "a.onnx", "onnx", SIZE, exporter="tf")
    with pytest.raises(ValueError, match="input_size"):
        export_model(model, tmp_path / "a.onnx", "onnx", (3, 12))
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        export_model(model, tmp_path / "a.onnx", "onnx", SIZE, batch_size=1, dynamic_batch=True)
    with pytest.raises(ValueError, match="batch_size must be None or a positive int"):
        export_model(model, tmp_path / "a.onnx", "onnx", SIZE, batch_size=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_exported(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="cannot tell the format"):
        (tmp_path / "x.bin").write_bytes(b"")
        load_exported(tmp_path / "x.bin")


def test_verify_detects_a_wrong_model(nets, tmp_path):
    path = export_model(nets["condconv"], tmp_path / "c.pt2", "exported-program", SIZE)
    with pytest.raises(RuntimeError, match="disagrees"):
        verify_export(path, nets["dynamic"], SIZE, batch_sizes=(2,))


def test_cli_export(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    argv = ["export", "resnet18_cifar", "--model-kwargs", "num_classes=10", "width_mult=0.25", "--format", "onnx",
            "--exporter", "torchscript", "--out", str(out), "--verify"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "any batch" in text and "batch 8: max |diff|" in text and out.is_file()
    assert cli_main(["export", str(tmp_path / "nothing"), "--format", "onnx"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_export_converted_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert cli_main(["convert", "resnet18_cifar", "--model-kwargs", "num_classes=10", "width_mult=0.25",
                     "--conv", "dynamic", "--experts", "2", "--include", "blocks.8", "--out", str(ck)]) == 0
    out = tmp_path / "r18.pt"
    assert cli_main(["export", str(ck), "--format", "torchscript", "--out", str(out), "--verify",
                     "--verify-batch-sizes", "1", "4"]) == 0
    assert "3x32x32 inputs" in capsys.readouterr().out


@pytest.mark.slow
def test_onnx_dynamo_exporter_odconv_3x3(nets, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    export_model(nets["odconv"], tmp_path / "od.onnx", "onnx", SIZE, exporter="dynamo", verify=True)
