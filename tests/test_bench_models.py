"""The model benchmark runs end to end on small models, validates its options, and int8 quantization stays close."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

import condconv
from condconv.bench.models import MODEL_SETS, ModelSpec, bench_models, format_model_table, resolve_models
from condconv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
needs_ort = pytest.mark.skipif(not (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript")),
                               reason="needs onnxruntime and onnxscript")
TINY = "resnet18_cifar:odconv:2"


def test_model_specs_and_sets():
    assert ModelSpec.parse("resnet50:odconv:4:all") == ModelSpec("resnet50", "odconv", 4, "all")
    assert ModelSpec.parse("mobilenet_v2:dynamic:4:3").dynamic_blocks == 3
    assert ModelSpec("resnet50", "condconv", 8).label == "resnet50 condconv-8"
    assert [s.label for s in resolve_models(["cpu"])] == [s.label for s in MODEL_SETS["cpu"]]
    assert len(resolve_models(["gpu", TINY])) == len(MODEL_SETS["gpu"]) + 1
    for bad in ("resnet50", "resnet50:static:4", "resnet50:odconv:0", "resnet50:odconv:x"):
        with pytest.raises(ValueError, match="MODEL:CONV:EXPERTS"):
            ModelSpec.parse(bad)
    static, dynamic = ModelSpec.parse("resnet18_cifar:condconv:2:all").build(num_classes=10)
    assert not any(isinstance(m, condconv.nn.layers.DynamicConvBase) for m in static.modules())
    assert sum(isinstance(m, condconv.nn.layers.DynamicConvBase) for m in dynamic.modules()) > 10


def test_bench_models_rows_and_ratios():
    torch.manual_seed(0)
    rows = bench_models([TINY], batch_sizes=[2], train_batch_sizes=[2], strategies=["auto", "grouped"],
                        input_size=(3, 16, 16), num_classes=10, model_kwargs={"width_mult": 0.25}, min_rounds=1,
                        budget_s=0, progress=False)
    got = {(r.mode, r.runtime, r.candidate) for r in rows}
    assert got == {("inference", "eager", c) for c in ("static", "auto", "grouped", "mixing floor")} | \
        {("train", "eager", c) for c in ("static", "auto", "grouped")}
    for r in rows:
        assert r.median_ms > 0 and r.rounds >= 1 and r.mac_ratio > 1
        assert (r.ratio == 1.0) == (r.candidate == "static")
    floor = next(r for r in rows if r.candidate == "mixing floor")
    assert floor.ratio > 1  # (static + mixing) / static
    table = format_model_table(rows, "inference", 2)
    assert table.splitlines()[0].startswith("| inference, B=2 | MAC ratio | eager static ms | auto | grouped |")
    assert format_model_table(rows, "inference", 64) == ""


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_sizes": [0]}, "batch_sizes must be positive ints"),
    ({"batch_sizes": [], "train_batch_sizes": []}, "at least one"),
    ({"strategies": ["fastest"]}, "strategies must be"),
    ({"input_size": (3, 16)}, "input_size must be three positive ints"),
    ({"min_rounds": 0}, "min_rounds must be a positive int"),
    ({"int8": True}, "int8=True needs onnx=True"),
    ({"models": []}, "no models given"),
])
def test_bench_models_rejects_bad_options(kwargs, match):
    args = {"models": [TINY], "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        bench_models(**args)


@needs_ort
def test_cli_bench_models_with_onnx_and_int8(tmp_path, capsys):
    out, md = tmp_path / "m.csv", tmp_path / "m.md"
    assert main(["bench", "models", "--models", TINY, "--model-kwargs", "width_mult=0.25", "num_classes=10",
                 "--batch", "1", "--input-size", "3", "16", "16", "--onnx",
                 "--int8", "--rounds", "1", "--budget", "0", "--threads", "1", "--csv", str(out),
                 "--markdown", str(md)]) == 0
    rows = list(csv.DictReader(out.open()))
    runtimes = {(r["runtime"], r["candidate"]) for r in rows}
    assert {("onnxruntime", "static"), ("onnxruntime", "auto"), ("onnxruntime", "auto, batch-1 graph"),
            ("onnxruntime", "mixing floor"), ("onnxruntime-int8", "static"), ("onnxruntime-int8", "auto")} <= runtimes
    printed = capsys.readouterr().out
    assert "| inference, B=1 |" in printed and "onnxruntime static ms" in printed
    assert md.read_text().strip().endswith(printed.strip().splitlines()[-1])


@pytest.mark.parametrize("argv, message", [
    (["bench", "models", "--experts", "4"], "--experts is an option of 'condconv bench layers'"),
    (["bench", "layers", "--onnx"], "--onnx is an option of 'condconv bench models'"),
    (["bench", "models", "--models", "resnet50:conv:4"], "MODEL:CONV:EXPERTS"),
    (["bench", "models", "--onnx", "--device", "cuda"], "--onnx times onnxruntime on the CPU"),
])
def test_cli_bench_option_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "models", "--batch", "0"], ["bench", "models", "--budget", "-1"],
                                  ["bench", "models", "--train-batch", "x"]])
def test_cli_bench_flags_validate(argv):
    with pytest.raises(SystemExit):
        main(argv)


@needs_ort
def test_quantize_onnx_keeps_outputs_close_and_shrinks_the_experts(tmp_path):
    onnx = pytest.importorskip("onnx")
    from condconv.deploy.quantize import quantize_onnx

    torch.manual_seed(0)
    net = condconv.create_model("mobilenet_v2_cifar", num_classes=10, width_mult=0.5, conv="condconv",
                                num_experts=8).eval()
    fp32 = condconv.export_model(net, tmp_path / "cc.onnx", input_size=(3, 32, 32))
    int8 = quantize_onnx(fp32, tmp_path / "cc-int8.onnx")
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size  # the expert banks are most of the weights
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    run32, run8 = condconv.load_exported(fp32), condconv.load_exported(int8)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        ref = run32(x)
        assert (run8(x) - ref).abs().max() <= 0.1 * ref.abs().max()
    with pytest.raises(FileNotFoundError, match="not found"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="op_types must be"):
        quantize_onnx(fp32, tmp_path / "x.onnx", op_types="MatMul")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_models_on_cuda_with_peak_memory_and_compile():
    rows = bench_models([TINY], device="cuda", batch_sizes=[1], train_batch_sizes=[2], compile=True,
                        input_size=(3, 16, 16), num_classes=10, model_kwargs={"width_mult": 0.25}, min_rounds=1,
                        budget_s=0, progress=False)
    eager = [r for r in rows if r.runtime == "eager"]
    assert all(r.precision.startswith("bf16") and r.peak_mib >= 0 for r in eager)
    assert {r.candidate for r in rows if r.runtime.startswith("compile")} == {"static", "auto"}
