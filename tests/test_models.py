"""Model zoo: every registered model with every convolution kind, registry, placement, features_only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import condconv
from condconv import CondConv2d, DynamicConv2d, ODConv2d, SigmoidRouter
from condconv.models import ConvNet, create_model, is_model, list_models, register_model
from condconv.models.blocks import BasicBlock, Bottleneck, MBConv, SqueezeExcite
from condconv.models.kernelwarehouse import KW_PRESETS as KW_PRESETS_
from condconv.models.presets import list_presets
from condconv.nn.layers import DynamicConvBase

KINDS = ("static", "condconv", "dynamic", "odconv")
CIFAR = list_models("*_cifar")
PRESETS = list_presets()  # full ImageNet models of the papers: tests/test_presets.py
# KernelWarehouse models and the official ConvNeXt-Tiny baseline: tests/test_kernel_warehouse_models.py
KW_PRESETS = [p.name for p in KW_PRESETS_] + ["convnext_tiny"]
IMAGENET = [name for name in list_models() if not name.endswith("_cifar") and name not in PRESETS + KW_PRESETS]
_DYNAMIC_EVERYWHERE = {"dynamic_blocks": "all", "dynamic_head": True, "dynamic_classifier": True,
                       "dynamic_pre_logits": True}

# tiny models: one intra-op thread (the shared conftest fixture)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(name: str, kind: str, **kwargs) -> ConvNet:
    options = {"num_classes": 10, "width_mult": 0.25, **kwargs}
    if kind != "static":
        options.update(conv=kind, num_experts=2, **_DYNAMIC_EVERYWHERE)
    return create_model(name, **options)


def test_registry_lists_every_family_and_its_cifar_variant():
    assert IMAGENET == ["efficientnet_b0", "efficientnet_b1", "mnasnet_a1",
                        "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large",
                        "mobilenet_v3_small", "resnet10", "resnet101", "resnet18", "resnet34", "resnet50"]
    assert CIFAR == sorted(f"{name}_cifar" for name in IMAGENET)
    assert list_models("resnet1*") == ["resnet10", "resnet101", "resnet101_cifar", "resnet10_cifar", "resnet18",
                                       "resnet18_cifar"]
    assert list_models("nothing*") == []
    assert sorted(set(list_models()) - set(IMAGENET) - set(CIFAR)) == sorted(PRESETS + KW_PRESETS)
    assert is_model("mobilenet_v3_small") and not is_model("mobilenet_v4")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CIFAR)
def test_forward_backward_eval_channels_last(name, kind):
    torch.manual_seed(0)
    model = _tiny(name, kind)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    if kind != "static":
        assert any(isinstance(m, DynamicConvBase) for m in model.modules())

    model.eval()
    with torch.no_grad():
        full = model(x)
        single = model(x[:1])
        if kind == "static":  # Module.to(memory_format=channels_last) rejects the dynamic layers' 5-D weights
            model.to(memory_format=torch.channels_last)
        channels_last = model(x.to(memory_format=torch.channels_last))
    assert single.shape == (1, 10)
    torch.testing.assert_close(single, full[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(channels_last, full, rtol=1e-4, atol=1e-5)


def test_shared_block_routing_gets_the_gradient():
    model = _tiny("efficientnet_b0_cifar", "condconv")
    blocks = [b for b in model.blocks if isinstance(b, MBConv)]
    assert all(isinstance(b.router, SigmoidRouter) for b in blocks)
    for block in blocks:
        convs = [m for m in block.modules() if isinstance(m, CondConv2d)]
        assert convs and all(c.routing == "external" and c.router is None for c in convs)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for block in blocks:
        assert block.router.fc.weight.grad is not None and block.router.fc.weight.grad.abs().sum() > 0


def test_shared_routing_can_be_turned_off_and_on():
    per_layer = _tiny("efficientnet_b0_cifar", "condconv", shared_routing=False)
    assert all(b.router is None for b in per_layer.blocks)
    assert all(c.router is not None for c in per_layer.modules() if isinstance(c, CondConv2d))
    shared = _tiny("mobilenet_v2_cifar", "condconv", shared_routing=True)
    assert all(isinstance(b.router, SigmoidRouter) for b in shared.blocks)
    # only CondConv has a block router; the other kinds route every layer themselves
    odconv = _tiny("efficientnet_b0_cifar", "odconv")
    assert all(b.router is None for b in odconv.blocks)


def _dynamic_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, DynamicConvBase)]


@pytest.mark.parametrize("name, blocks, head, classifier", [
    ("mobilenet_v1", 7, False, True),
    ("mobilenet_v2", 7, True, True),
    ("mnasnet_a1", 6, False, False),
    ("efficientnet_b0", 8, False, False),
    ("efficientnet_b1", 11, False, False),
    ("resnet18", 2, False, False),
    ("resnet50", 3, False, False),
    ("resnet10", 1, False, False),
    ("resnet34", 3, False, False),
    ("resnet101", 3, False, False),
    ("mobilenet_v3_small", 11, True, False),  # DynamicConv's
    ("mobilenet_v3_large", 15, True, False),
])
def test_default_placement_is_the_papers(name, blocks, head, classifier):
    with torch.device("meta"):
        model = create_model(name, conv="condconv")
    dynamic_blocks = sorted({int(n.split(".")[1]) for n in _dynamic_layers(model) if n.startswith("blocks.")})
    n_blocks = len(model.blocks)
    assert dynamic_blocks == list(range(n_blocks - blocks, n_blocks))
    assert isinstance(getattr(model.head_conv, "conv", None), CondConv2d) == head
    assert isinstance(model.head.fc, CondConv2d) == classifier
    assert all(m.num_experts == 8 for m in model.modules() if isinstance(m, DynamicConvBase))


def test_placement_options():
    count = len(_dynamic_layers(create_model("mobilenet_v1_cifar", width_mult=0.25, conv="condconv",
                                             dynamic_blocks=0, dynamic_classifier=True)))
    assert count == 1  # the classifier only
    model = create_model("mobilenet_v1_cifar", width_mult=0.25, conv="dynamic", num_experts=3,
                         dynamic_blocks=[0, -1], dynamic_classifier=False)
    names = _dynamic_layers(model)
    assert {n.split(".")[1] for n in names} == {"0", "12"} and len(names) == 4
    assert all(isinstance(model.get_submodule(n), DynamicConv2d) for n in names)
    model = create_model("resnet18_cifar", width_mult=0.25, conv="odconv", dynamic_blocks="all",
                         conv_kwargs={"reduction": 0.25})
    assert sum(isinstance(m, ODConv2d) for m in model.modules()) == 8 * 2 + 3  # 3 projection shortcuts
    assert not isinstance(model.stem.conv, DynamicConvBase)  # the stem is never converted
    layer = next(m for m in model.modules() if isinstance(m, ODConv2d))
    assert layer.router.fc.out_features == 16  # max(int(C_in * 0.25), min_channels=16)


@pytest.mark.parametrize("name", IMAGENET)
def test_features_only_imagenet_strides(name):
    model = create_model(name, width_mult=0.25, features_only=True).eval()
    assert [f.reduction for f in model.feature_info] == [2, 4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, i.channels, 64 // i.reduction, 64 // i.reduction)
                                               for i in model.feature_info]
    assert model.head is None
    for info in model.feature_info:
        model.get_submodule(info.module)  # names a real module


@pytest.mark.parametrize("name", CIFAR)
def test_features_only_cifar_ends_at_4x4(name):
    model = create_model(name, width_mult=0.25, features_only=True, conv="condconv", num_experts=2)
    feats = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32 // i.reduction,) * 2 for i in model.feature_info]
    assert feats[-1].shape[-2:] == (4, 4) and model.feature_info[-1].reduction == 8
    assert [f.shape[1] for f in feats] == [i.channels for i in model.feature_info]
    sum(f.mean() for f in feats).backward()
    with pytest.raises(RuntimeError, match="features_only"):
        model.forward_head(feats[-1])


def test_forward_features_head_and_defaults():
    model = create_model("resnet18_cifar", width_mult=0.5)
    assert model.num_classes == 1000 and model.head.fc.out_features == 1000
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 4, 4)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    grey = create_model("mobilenet_v2_cifar", width_mult=0.25, in_chans=1, num_classes=7)
    assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    # channel rounding: MobileNetV2 keeps its 1280-channel head below width 1, EfficientNet scales it
    assert create_model("mobilenet_v2", width_mult=0.5, features_only=False).num_features == 1280
    assert create_model("efficientnet_b0", width_mult=0.5).num_features == 640


def test_imagenet_models_run_at_224():
    model = create_model("mobilenet_v1", width_mult=0.25, conv="condconv", num_experts=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_parameter_counts_of_the_standard_models():
    # torchvision / timm counts: the architectures are the standard ones
    expected = {"mobilenet_v2": 3_504_872, "resnet18": 11_689_512, "resnet50": 25_557_032,
                "efficientnet_b0": 5_288_548, "efficientnet_b1": 7_794_184, "mnasnet_a1": 3_887_038,
                "resnet34": 21_797_672,
                "resnet101": 44_549_160, "mobilenet_v3_small": 2_542_856, "mobilenet_v3_large": 5_483_032}
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in create_model(name).parameters()) for name in expected}
    assert counts == expected


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'mobilenet_v3'.*'mobilenet_v1'"):
        create_model("mobilenet_v3")
    with pytest.raises(ValueError, match="unknown model 'resnet5'.*resnet50"):
        create_model("resnet5")
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: None, name="resnet18")

    @register_model(name="_test_only_model")
    def builder(**kwargs):
        return nn.Linear(2, 2)

    assert isinstance(create_model("_test_only_model"), nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        register_model(builder, name="_test_only_model")
    from condconv.models import registry
    del registry._MODELS["_test_only_model"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"conv": "lora"}, ValueError, "conv must be one of"),
    ({"num_experts": 4}, ValueError, "need a dynamic convolution"),
    ({"conv": "condconv", "num_experts": 0}, ValueError, "num_experts must be a positive int"),
    ({"conv": "condconv", "dynamic_blocks": 99}, ValueError, "dynamic_blocks must be between 0"),
    ({"conv": "condconv", "dynamic_blocks": [0, 40]}, ValueError, "dynamic_blocks indices"),
    ({"conv": "condconv", "dynamic_blocks": "some"}, ValueError, "dynamic_blocks must be None, 'all'"),
    ({"conv": "condconv", "dynamic_head": "yes"}, TypeError, "dynamic_head must be a bool"),
    ({"conv": "condconv", "conv_kwargs": {"routing": "softmax"}}, ValueError, "conflicts with shared_routing"),
    ({"width_mult": 0}, ValueError, "width_mult must be a positive number"),
    ({"num_classes": 0}, ValueError, "num_classes must be a positive int"),
    ({"dropout": 1.5}, ValueError, "dropout must be a number in"),
    ({"in_chans": -1}, ValueError, "in_chans must be a positive int"),
    ({"widht_mult": 0.5}, TypeError, "widht_mult"),
    ({"init": "he"}, ValueError, "init must be one of"),
    ({"conv": "odconv", "init": "official", "conv_kwargs": {"init": "default"}}, ValueError, "conflicts with init"),
    ({"conv": "condconv", "dynamic_shortcut": 1}, TypeError, "dynamic_shortcut must be a bool"),
    ({"conv": "condconv", "dynamic_pre_logits": "no"}, TypeError, "dynamic_pre_logits must be a bool"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match), torch.device("meta"):
        create_model("efficientnet_b0", **kwargs)


def test_conv_kwargs_reach_the_layers():
    model = create_model("mobilenet_v2_cifar", width_mult=0.25, conv="condconv", num_experts=3,
                         conv_kwargs={"routing": "softmax", "temperature": 5.0})
    layers = [m for m in model.modules() if isinstance(m, CondConv2d)]
    assert layers and all(m.routing == "softmax" and m.num_experts == 3 for m in layers)
    assert condconv.set_temperature(model, 1.0) == len(layers)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_forward_backward(kind):
    torch.manual_seed(0)
    model = _tiny("efficientnet_b0_cifar", kind).cuda()
    out = model(torch.randn(4, 3, 32, 32, device="cuda"))
    assert out.shape == (4, 10) and out.is_cuda and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters())


def test_mobilenet_v3_structure():
    """Hard-swish where the paper has it, squeeze-excite on the expanded width, the pre-logits layer without BN."""
    model = create_model("mobilenet_v3_large")
    assert isinstance(model.stem.act, nn.Hardswish) and isinstance(model.head_conv.act, nn.Hardswish)
    blocks = list(model.blocks)
    assert [type(b.depthwise.act).__name__ for b in blocks] == ["ReLU"] * 6 + ["Hardswish"] * 9
    se = [b.se for b in blocks if b.se is not None]
    assert len(se) == 8 and all(isinstance(m.gate, nn.Hardsigmoid) and isinstance(m.act, nn.ReLU) for m in se)
    # the bottleneck is make_divisible(hidden / 4) of the expanded width: 72 -> 24, 120 -> 32, 960 -> 240
    assert [(m.reduce.in_channels, m.reduce.out_channels) for m in se[:2]] == [(72, 24), (120, 32)]
    assert (se[-1].reduce.in_channels, se[-1].reduce.out_channels) == (960, 240)
    assert blocks[0].expand is None and blocks[1].expand.conv.out_channels == 64
    head = model.head
    assert isinstance(head.pre_logits, nn.Linear) and head.pre_logits.bias is not None
    assert (head.pre_logits.in_features, head.pre_logits.out_features) == (960, 1280)
    assert isinstance(head.pre_logits_act, nn.Hardswish) and head.dropout.p == 0.2
    assert model.num_features == 1280 and head.fc.in_features == 1280
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 1280)
    small = create_model("mobilenet_v3_small", width_mult=0.5)
    assert small.head_conv.conv.out_channels == 288 and small.num_features == 512  # both scaled by the width


def test_mobilenet_v3_multiply_adds():
    """torchvision's architecture: 56.5M / 216.6M in convolutions and linear layers (the paper: 56M / 219M)."""
    with torch.device("meta"):
        conv = {name: condconv.count_macs(create_model(name)).categories["conv"].macs
                for name in ("mobilenet_v3_small", "mobilenet_v3_large")}
    assert conv == {"mobilenet_v3_small": 56_510_400, "mobilenet_v3_large": 216_589_760}


@pytest.mark.parametrize("kind", ["condconv", "odconv"])
def test_static_shortcut(kind):
    """dynamic_shortcut=False keeps the projection shortcut a plain nn.Conv2d, also with block-shared routing."""
    model = _tiny("resnet18_cifar", kind, dynamic_shortcut=False, shared_routing=kind == "condconv")
    shortcuts = [b.downsample.conv for b in model.blocks if isinstance(b, BasicBlock) and b.downsample is not None]
    assert len(shortcuts) == 3 and all(type(conv) is nn.Conv2d for conv in shortcuts)
    assert all(isinstance(b.conv1.conv, DynamicConvBase) for b in model.blocks if isinstance(b, BasicBlock))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    dynamic = _tiny("resnet18_cifar", kind)
    assert all(isinstance(b.downsample.conv, DynamicConvBase) for b in dynamic.blocks
               if isinstance(b, BasicBlock) and b.downsample is not None)


def test_resnet_v1_layout():
    """The v1 bottleneck strides its first 1x1: ResNet-50 counts the 3.86G multiply-adds many tables quote."""
    from condconv.models.resnet import RESNET50, resnet_v1

    with torch.device("meta"):
        v15, v1 = RESNET50.build(), resnet_v1(RESNET50).build()
    strided = [b for b in v1.blocks if isinstance(b, Bottleneck) and b.stride == 2]
    assert len(strided) == 3 and all(b.conv1.conv.stride == (2, 2) and b.conv2.conv.stride == (1, 1)
                                     for b in strided)
    assert sum(p.numel() for p in v1.parameters()) == sum(p.numel() for p in v15.parameters())
    assert condconv.count_macs(v15).macs == 4_089_284_608
    assert condconv.count_macs(v1).macs == pytest.approx(3.858e9, rel=1e-3)


def test_squeeze_excite_default_is_unchanged():
    block = create_model("efficientnet_b0").blocks[1]
    assert isinstance(block.se, SqueezeExcite) and isinstance(block.se.gate, nn.Sigmoid)
    assert isinstance(block.se.act, nn.SiLU) and block.se.reduce.out_channels == 4  # int(16 * 0.25), block input


def test_drop_connect_rises_linearly_and_is_the_identity_in_eval():
    from condconv.models.blocks import DropPath

    torch.manual_seed(0)
    model = create_model("mobilenet_v2_cifar", num_classes=10, width_mult=0.25, drop_connect_rate=0.4)
    blocks = list(model.blocks)
    for index, block in enumerate(blocks):
        if block.residual and index > 0:  # the first block's rate is 0
            assert isinstance(block.drop_path, DropPath)
            assert block.drop_path.rate == pytest.approx(0.4 * index / len(blocks))
        else:
            assert isinstance(block.drop_path, nn.Identity)  # no residual branch to drop
    plain = create_model("mobilenet_v2_cifar", num_classes=10, width_mult=0.25)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))  # other examples dropped


def test_drop_path_keeps_the_expectation():
    from condconv.models.blocks import DropPath

    torch.manual_seed(0)
    layer = DropPath(0.25).train()
    x = torch.ones(20000, 3)
    out = layer(x)
    kept = (out[:, 0] != 0).float().mean().item()
    assert kept == pytest.approx(0.75, abs=0.02) and out[out != 0].unique().tolist() == [pytest.approx(1 / 0.75)]


def test_bn_momentum_and_eps_reach_every_batchnorm():
    model = create_model("resnet18_cifar", num_classes=10, width_mult=0.25, conv="odconv", dynamic_blocks=1,
                         conv_kwargs={"norm": "batch"}, bn_momentum=0.01, bn_eps=1e-3)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(isinstance(m, nn.BatchNorm1d) for m in norms)  # the ODConv attention's BatchNorm too
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)
    for bad in ({"bn_momentum": 1.5}, {"bn_eps": 0}, {"drop_connect_rate": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_model("resnet18_cifar", **bad)
