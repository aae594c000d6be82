"""MAC/parameter counter: hand-computed layers, FlopCounterMode cross-check, the papers' figures, the CLI."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import condconv
from condconv.cli import main
from condconv.models import create_model
from condconv.models.macs import CATEGORIES, PAPER_FIGURES, count_macs

_ROUTER_TYPES = {"SigmoidRouter", "SoftmaxRouter", "OmniRouter"}

# tiny models: one intra-op thread (the shared conftest fixture)
pytestmark = pytest.mark.usefixtures("one_thread")


def _categories(report) -> dict[str, tuple[int, int]]:
    return {cat: (cost.macs, cost.params) for cat, cost in report.categories.items()}


def test_static_layers_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10))
    model.train()
    report = count_macs(model, (3, 32, 32))
    conv = 8 * 16 * 16 * 3 * 9  # C_out * H_out * W_out * C_in * k * k
    assert _categories(report) == {"conv": (conv + 80, 8 * 27 + 8 + 80 + 10), "routing": (0, 0), "mixing": (0, 0),
                                   "other": (8 * 16 * 16, 16)}  # global pooling: one accumulate per element
    assert report.macs == conv + 80 + 2048 and report.params == sum(p.numel() for p in model.parameters())
    assert model.training  # restored
    assert [(m.name, m.type, m.macs) for m in report.modules if m.macs] == [
        ("0", "Conv2d", conv), ("3", "AdaptiveAvgPool2d", 2048), ("5", "Linear", 80)]


def test_shared_modules_and_parameters():
    conv = nn.Conv2d(4, 4, 1, bias=False)
    twin = nn.Conv2d(4, 4, 1, bias=False)
    twin.weight = conv.weight
    report = count_macs(nn.Sequential(conv, conv, twin), (4, 5, 5))
    assert report.macs == 3 * 4 * 25 * 4  # three calls
    assert report.params == 16  # one weight


def test_condconv_layer_by_hand():
    layer = condconv.CondConv2d(8, 16, 3, padding=1, num_experts=4)
    report = count_macs(layer, (8, 10, 10))
    expert = 16 * 8 * 9 + 16  # one expert's kernel and bias
    assert _categories(report) == {
        "conv": (16 * 100 * 8 * 9, 4 * expert),
        "routing": (8 * 100 + 8 * 4, 8 * 4 + 4),  # global pooling of the input + Linear(C_in, E)
        "mixing": (4 * expert, 0),
        "other": (0, 0),
    }


def test_odconv_layer_by_hand():
    layer = condconv.ODConv2d(8, 16, 3, padding=1, num_experts=4, bias=False)
    report = count_macs(layer, (8, 10, 10))
    kernel, hidden = 16 * 8 * 9, 16  # trunk width max(8 / 16, min_channels=16)
    heads = hidden * (9 + 8 + 16 + 4)  # spatial, input channel, output channel, expert
    assert report.categories["routing"].macs == 8 * 100 + 8 * hidden + heads
    # mix E kernels, scale by the spatial attention, the input by a_in, the output by a_out
    assert report.categories["mixing"].macs == 4 * kernel + kernel + 8 * 100 + 16 * 100
    assert report.categories["conv"].macs == 16 * 100 * 8 * 9


def _flop_counter_macs(model: nn.Module, size: tuple[int, int, int]) -> int:
    model.eval()
    with condconv.use_strategy("grouped"), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *size))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name, kwargs", [
    ("mobilenet_v2_cifar", {}),
    ("mnasnet_a1_cifar", {}),
    ("efficientnet_b0_cifar", {"conv": "condconv", "num_experts": 3}),  # block-shared routing, squeeze-excite
    ("mobilenet_v1_cifar", {"conv": "condconv", "num_experts": 4, "dynamic_blocks": "all",
                            "dynamic_classifier": True}),  # per-layer routing, a classifier with bias
    ("mobilenet_v2_cifar", {"conv": "condconv", "num_experts": 2, "dynamic_head": True}),
    ("resnet18_cifar", {"conv": "dynamic", "num_experts": 2, "dynamic_blocks": "all"}),  # softmax MLP routing
    ("mobilenet_v3_small_cifar", {"conv": "dynamic", "num_experts": 2, "dynamic_pre_logits": True}),  # pre-logits
    ("resnet50_cifar", {"conv": "condconv", "num_experts": 2, "shared_routing": True, "dynamic_shortcut": False}),
])
def test_agrees_with_flop_counter(name, kwargs):
    """FlopCounterMode sees convolutions, matmuls (mixing, routers, classifier); not pooling or gating."""
    torch.manual_seed(0)
    model = create_model(name, width_mult=0.5, num_classes=10, **kwargs)
    report = count_macs(model, (3, 32, 32))
    router_pooling = sum(m.macs for m in report.modules if m.type in _ROUTER_TYPES)
    assert (router_pooling > 0) == ("conv" in kwargs)
    assert _flop_counter_macs(model, (3, 32, 32)) == report.macs - report.categories["other"].macs - router_pooling
    if "conv" in kwargs:
        assert report.categories["mixing"].macs > 0 and report.categories["routing"].macs > router_pooling


def test_meta_device_counts_like_real_weights():
    kwargs = {"width_mult": 0.5, "num_classes": 10, "conv": "odconv", "num_experts": 2, "dynamic_blocks": "all"}
    real = count_macs(create_model("efficientnet_b0_cifar", **kwargs), (3, 32, 32))
    with torch.device("meta"):
        meta = count_macs(create_model("efficientnet_b0_cifar", **kwargs), (3, 32, 32))
    assert meta == real


def test_report_is_consistent():
    with torch.device("meta"):
        model = create_model("mnasnet_a1", conv="condconv", num_experts=4)
    report = count_macs(model)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.macs == sum(c.macs for c in report.categories.values()) == sum(m.macs for m in report.modules)
    assert report.params == sum(c.params for c in report.categories.values()) == sum(m.params for m in report.modules)
    assert tuple(report.categories) == CATEGORIES and report.input_size == (3, 224, 224)
    assert "total" in report.table(top=5) and len(report.table(top=5).splitlines()) == 1 + 5 + 1 + 4 + 1


def test_bad_input():
    with pytest.raises(ValueError, match="input_size must be three positive ints"):
        count_macs(nn.Conv2d(3, 3, 1), (3, 32))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        count_macs("resnet50")


def _read(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_paper_table_reproduced(tmp_path, capsys):
    """``condconv macs`` with no model: the papers' figures, static within 1%, CondConv within 2%."""
    assert main(["macs", "--csv", str(tmp_path / "paper.csv")]) == 0
    out = capsys.readouterr().out
    assert "paper MACs" in out and "note: mobilenet_v2" in out
    rows = _read(tmp_path / "paper.csv")
    assert [(r["model"], int(r["experts"])) for r in rows] == [(f.model, f.experts) for f in PAPER_FIGURES]
    for row, figure in zip(rows, PAPER_FIGURES):
        tolerance = 0.01 if figure.experts == 1 else 0.02
        assert int(row["macs"]) == pytest.approx(figure.macs * 1e6, rel=tolerance), row
        if figure.params is not None and not figure.note:
            assert int(row["params"]) == pytest.approx(figure.params * 1e6, rel=tolerance), row
    # MobileNetV2: 3.47M weights without BatchNorm (the paper's "3.4M", cut to one decimal), 3.50M with it
    v2 = rows[[f.model for f in PAPER_FIGURES].index("mobilenet_v2")]
    assert int(v2["params"]) == pytest.approx(3.50e6, rel=0.01)
    with torch.device("meta"):
        v2_conv = count_macs(create_model("mobilenet_v2")).categories["conv"].params
    assert 3.4e6 <= v2_conv < 3.5e6 and v2_conv == pytest.approx(3.47e6, rel=0.01)


def test_width_study_grid(tmp_path, capsys):
    """The seed's MobileNetV1 width x experts study; arXiv v1: 0.5x with 32 experts costs +27%."""
    path = tmp_path / "grid.csv"
    assert main(["macs", "mobilenet_v1", "--width", "0.5", "1.0", "--experts", "1", "8", "32",
                 "--csv", str(path)]) == 0
    assert "mobilenet_v1" in capsys.readouterr().out
    rows = _read(path)
    assert [(float(r["width"]), int(r["experts"]), r["conv"]) for r in rows] == [
        (w, e, "static" if e == 1 else "condconv") for w in (0.5, 1.0) for e in (1, 8, 32)]
    macs = {(float(r["width"]), int(r["experts"])): int(r["macs"]) for r in rows}
    assert macs[0.5, 32] / macs[0.5, 1] - 1 == pytest.approx(0.27, abs=0.005)
    assert (macs[1.0, 8] - macs[1.0, 1]) / 1e6 == pytest.approx(33, abs=1)  # 567M -> 600M
    for width in (0.5, 1.0):
        assert macs[width, 1] < macs[width, 8] < macs[width, 32]


def test_cli_small_inputs_and_modules(capsys):
    assert main(["macs", "resnet18_cifar", "--experts", "2", "--input-size", "32", "--num-classes", "10",
                 "--conv", "odconv", "--modules", "3"]) == 0
    out = capsys.readouterr().out
    assert "resnet18_cifar" in out and "paper" not in out and "OD" in out  # ODConv2d rows in the module table


@pytest.mark.parametrize("argv, message", [
    (["macs", "resnet5"], "unknown model 'resnet5'"),
    (["macs", "--experts", "4"], "need MODEL names"),
    (["macs", "resnet18", "--experts", "0"], "--experts must be positive"),
    (["macs", "resnet18", "--input-size", "0"], "--input-size and --num-classes must be positive"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("paper", ["condconv", "dynamic", "odconv"])
def test_cli_paper_tables(paper, capsys):
    assert main(["macs", "--paper", paper]) == 0
    out = capsys.readouterr().out
    from condconv.models.presets import list_presets

    assert all(name in out for name in list_presets(paper))
    assert "NO" not in out.split()  # every figure reproduced or documented
    assert main(["macs", "--paper", paper, "resnet18"]) == 2


def test_cli_counts_a_preset_as_published(capsys):
    assert main(["macs", "condconv_efficientnet_b0_8e"]) == 0
    assert "412.0" in capsys.readouterr().out
    assert main(["macs", "condconv_efficientnet_b0_8e", "--experts", "4"]) == 2
