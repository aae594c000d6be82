"""condconv.nn.convert: function-preserving conversion of nn.Conv2d layers, layer selection, errors, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import condconv
from condconv.cli import main as cli_main
from condconv.models import create_model
from condconv.models.checkpoint import load_checkpoint
from condconv.nn.convert import apply_conversion, list_convs, select_convs

KINDS = ["condconv", "dynamic", "odconv"]
LAYER = {"condconv": condconv.CondConv2d, "dynamic": condconv.DynamicConv2d, "odconv": condconv.ODConv2d}


def zoo_net() -> nn.Module:
    """Grouped, dilated, strided, depthwise, 1x1, non-square, 'same'-padded and reflect-padded convolutions."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.ReLU(),  # depthwise
        nn.Conv2d(16, 24, 1), nn.ReLU(),
        nn.Conv2d(24, 24, (3, 5), stride=(2, 1), padding=(1, 2), padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding="same", dilation=2, groups=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )  # fmt: skip


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and statistics: fresh zoo models zero-init some of them (MobileNetV2's
    output is ~1e-7 at initialisation), which would make output comparisons vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return zoo_net().eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_conversion_preserves_outputs(net, kind, mode):
    x = torch.randn(4, 3, 17, 15)
    net.train(mode == "train")
    ref = net(x)
    converted, names = condconv.convert(net, kind, num_experts=3, include="*", perturb=0.1, seed=0)
    assert names == list_convs(net) and len(names) == 7
    for name in names:
        layer = converted.get_submodule(name)
        assert type(layer) is LAYER[kind] and layer.num_experts == 3 and layer.training == (mode == "train")
    torch.testing.assert_close(converted(x), ref, rtol=1e-5, atol=1e-5)
    # the original is untouched (inplace=False)
    assert all(type(net.get_submodule(n)) is nn.Conv2d for n in names)


def test_batch_of_one_and_float64():
    torch.manual_seed(1)
    net = zoo_net().double().eval()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    for kind in KINDS:
        converted, names = condconv.convert(net, kind, include="*", perturb=0.5, seed=3)
        assert converted.get_submodule(names[0]).weight.dtype == torch.float64
        torch.testing.assert_close(converted(x), net(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,kinds", [("resnet18_cifar", KINDS), ("mobilenet_v2_cifar", ["odconv"])])
def test_zoo_models_preserved(name, kinds):
    torch.manual_seed(0)
    model = randomise_norms(create_model(name, num_classes=10, width_mult=0.25).eval())
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    assert ref.abs().max() > 0.1
    for kind in kinds:
        converted, names = condconv.convert(model, kind, num_experts=2, perturb=0.05, seed=0)
        total = len(list_convs(model))
        assert len(names) == math.ceil(total / 3) and names == list_convs(model)[-len(names):]
        torch.testing.assert_close(converted(x), ref, rtol=1e-5, atol=1e-5)


def test_perturb_seed_and_symmetry(net):
    a, names = condconv.convert(net, "condconv", num_experts=4, include="*", perturb=0.05, seed=7)
    b, _ = condconv.convert(net, "condconv", num_experts=4, include="*", perturb=0.05, seed=7)
    c, _ = condconv.convert(net, "condconv", num_experts=4, include="*", perturb=0.05, seed=8)
    wa, wb, wc = (m.get_submodule(names[-1]).weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not torch.equal(wa[0], wa[1])  # perturbed experts differ
    # a seed also fixes the routers' random initialisation (ODConv's and DynamicConv's hidden layers)
    state = torch.get_rng_state()
    od1, _ = condconv.convert(net, "odconv", include="*", perturb=0.05, seed=1)
    od2, _ = condconv.convert(net, "odconv", include="*", perturb=0.05, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(od1.state_dict().values(), od2.state_dict().values()))
    # without perturbation the experts are identical and stay so under training (why perturb exists)
    flat, _ = condconv.convert(net, "condconv", num_experts=4, include="*", perturb=0.0)
    flat.train()
    opt = torch.optim.SGD(flat.parameters(), lr=0.1)
    flat(torch.randn(4, 3, 16, 16)).square().mean().backward()
    opt.step()
    w = flat.get_submodule(names[-1]).weight
    assert all(torch.allclose(w[0], w[i]) for i in range(1, 4))
    assert w.grad.abs().sum() > 0


def test_include_forms(net):
    assert select_convs(net, "1*") == ["11", "13"]
    assert select_convs(net, ["0", "13"]) == ["0", "13"]
    assert select_convs(net, lambda name, conv: conv.groups > 1) == ["5", "7", "13"]
    assert select_convs(net, "*", exclude=["0", lambda n, c: c.kernel_size == (1, 1)]) == ["2", "5", "7", "11", "13"]
    with pytest.warns(UserWarning, match="removes none"):
        select_convs(net, "*", exclude="nothing*")
    # a parent name selects every convolution inside it
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)), nn.Conv2d(4, 4, 1))
    assert select_convs(model, "0") == ["0.0", "0.1"]


def test_default_is_last_third_in_execution_order():
    class Reversed(nn.Module):  # registered in one order, executed in the other
        def __init__(self):
            super().__init__()
            self.late = nn.Conv2d(4, 4, 1)
            self.mid = nn.Conv2d(4, 4, 1)
            self.early = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.late(self.mid(self.early(x)))

    model = Reversed()
    assert select_convs(model) == ["early"]  # registration order: the last third is 'early'
    assert select_convs(model, example_input=torch.randn(1, 3, 4, 4)) == ["late"]
    assert list_convs(model, example_input=torch.randn(1, 3, 4, 4)) == ["early", "mid", "late"]
    assert model.training  # restored after the ordering pass


def test_inplace_and_shared_convolutions():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(2, 4, 6, 6)
    ref = model(x)
    out, names = condconv.convert(model, "dynamic", include="2", inplace=True, perturb=0.1, seed=0)
    assert out is model and names == ["0", "2"] and model[0] is model[2]
    assert isinstance(model[0], condconv.DynamicConv2d)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_layer_kwargs_pass_through(net):
    converted, names = condconv.convert(net, "condconv", include="11", routing="softmax", temperature=30.0)
    assert converted.get_submodule("11").routing == "softmax"
    converted, _ = condconv.convert(net, condconv.DynamicConv2d, num_experts=2, include="11", reduction=2)
    assert isinstance(converted.get_submodule("11"), condconv.DynamicConv2d)


def test_errors(net):
    with pytest.raises(ValueError, match="conv must be one of"):
        condconv.convert(net, "dynamicconv")
    with pytest.raises(ValueError, match="static"):
        condconv.convert(net, "static")
    with pytest.raises(TypeError, match="conv must be"):
        condconv.convert(net, nn.Conv2d)
    with pytest.raises(ValueError, match="'layer4.\\*' matches no module"):
        condconv.convert(net, include="layer4.*")
    with pytest.raises(TypeError, match="no convertible nn.Conv2d, only: 16 \\(Linear\\)"):
        condconv.convert(net, include="16")
    with pytest.raises(ValueError, match="predicate returned False"):
        condconv.convert(net, include=lambda n, m: False)
    with pytest.raises(ValueError, match="no convertible nn.Conv2d"):
        condconv.convert(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no convolution left"):
        condconv.convert(net, include="0", exclude="0")
    with pytest.raises(ValueError, match="num_experts"):
        condconv.convert(net, num_experts=0)
    with pytest.raises(ValueError, match="perturb"):
        condconv.convert(net, perturb=-1.0)
    with pytest.raises(ValueError, match="external"):
        condconv.convert(net, routing="external")
    with pytest.raises(TypeError, match="model must be"):
        condconv.convert("resnet18")
    converted, _ = condconv.convert(net, include="11")
    with pytest.raises(TypeError, match="already dynamic"):
        condconv.convert(converted, include="11")


def test_conv2d_subclasses():
    class InitConv(nn.Conv2d):  # only changes initialisation: converted
        pass

    class StandardisedConv(nn.Conv2d):  # its own forward: converting would change the function
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True)
                                                                               + 1e-5)
            return self._conv_forward(x, w, self.bias)

    model = nn.Sequential(InitConv(3, 4, 3), StandardisedConv(4, 4, 3), nn.Conv2d(4, 4, 1))
    assert list_convs(model) == ["0", "2"]
    assert select_convs(model, "*") == ["0", "2"]
    with pytest.raises(TypeError, match="nn.Conv2d subclass with its own forward"):
        select_convs(model, "1")


def test_apply_conversion_rebuilds_structure(net):
    converted, names = condconv.convert(net, "odconv", num_experts=2, include="1*", perturb=0.1, seed=0)
    fresh = apply_conversion(zoo_net(), [{"conv": "odconv", "num_experts": 2, "layers": names, "layer_kwargs": {}}])
    fresh.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), converted(x))
    with pytest.raises(ValueError, match="no nn.Conv2d named"):
        apply_conversion(zoo_net(), {"conv": "odconv", "layers": ["nope"]})


def test_cli_convert_roundtrip(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = randomise_norms(create_model("resnet18_cifar", num_classes=10, width_mult=0.25).eval())
    weights = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    kwargs = ["--model-kwargs", "num_classes=10", "width_mult=0.25"]
    assert cli_main(["convert", "resnet18_cifar", *kwargs, "--include", "blocks.8", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "* blocks.8.conv1.conv" in listing and "2 of 20 Conv2d layers selected" in listing

    out = tmp_path / "cc"
    assert cli_main(["convert", "resnet18_cifar", *kwargs, "--weights", str(weights), "--experts", "4",
                     "--include", "blocks.8", "--out", str(out)]) == 0
    report = json.loads((out / "convert.json").read_text())
    assert report["layers"] == ["blocks.8.conv1.conv", "blocks.8.conv2.conv"] and report["max_abs_diff"] < 1e-4
    model, config = load_checkpoint(out)
    assert config["model"] == "resnet18_cifar" and config["convert"][0]["conv"] == "condconv"
    assert isinstance(model.get_submodule("blocks.8.conv1.conv"), condconv.CondConv2d)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)  # pretrained function kept

    # a converted checkpoint converts again (records chain)
    out2 = tmp_path / "od"
    assert cli_main(["convert", str(out), "--conv", "odconv", "--experts", "2", "--include", "blocks.7.conv*",
                     "--out", str(out2)]) == 0
    model2, config2 = load_checkpoint(out2 / "model.safetensors")
    assert [s["conv"] for s in config2["convert"]] == ["condconv", "odconv"]
    torch.testing.assert_close(model2(x), base(x), rtol=1e-5, atol=1e-5)

    assert cli_main(["convert", "resnet18_cifar", "--include", "layer4.*", "--out", str(tmp_path / "x")]) == 2
    assert "matches no module" in capsys.readouterr().err
    assert cli_main(["convert", str(out), "--model-kwargs", "width_mult=1", "--out", str(tmp_path / "y")]) == 2


@pytest.mark.slow
def test_example_convert_finetune_export(tmp_path):
    pytest.importorskip("onnxruntime")
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "convert_finetune_export.py"
    main = runpy.run_path(str(example), run_name="example")["main"]
    result = main(["--out", str(tmp_path), "--epochs", "1", "--finetune-epochs", "1", "--train-size", "200"])
    assert result["converted_layers"] == 7
    # conversion preserves the function (at most one near-tie of the 360 test images may flip)
    assert abs(result["converted_top1"] - result["static_top1"]) < 0.3
    assert result["onnx_max_abs_diff"] < 1e-3 and abs(result["onnx_top1"] - result["finetuned_top1"]) < 0.3
