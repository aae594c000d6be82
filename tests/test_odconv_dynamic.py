"""ODConv (omni-dimensional attentions) and DynamicConv (softmax attention over kernels) specifics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condconv import DynamicConv2d, ODConv2d, OmniRouter, set_temperature
from condconv.nn.reference import reference_dynamic_conv2d, reference_odconv2d
from condconv.nn.routing import Attentions

pytestmark = [
    pytest.mark.usefixtures("one_thread", "clean_strategy"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

F64 = torch.float64




def _conv_kwargs(layer) -> dict:
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups,
            "padding_mode": layer.padding_mode}


# ----------------------------------------------------------------------------------------------------------------
# Heads that are meaningless for the shape are skipped

HEAD_CASES = {
    # name: (in, out, kernel, groups, experts) -> which heads exist (spatial, in_channel, out_channel, expert)
    "3x3-dense": ((4, 6, 3, 1, 3), (True, True, True, True)),
    "1x1": ((4, 6, 1, 1, 3), (False, True, True, True)),
    "1x3": ((4, 6, (1, 3), 1, 3), (True, True, True, True)),
    "3x3-depthwise": ((4, 4, 3, 4, 3), (True, True, False, True)),
    "3x3-depthwise-x2": ((4, 8, 3, 4, 3), (True, True, True, True)),
    "3x3-grouped": ((4, 6, 3, 2, 3), (True, True, True, True)),
    "3x3-one-expert": ((4, 6, 3, 1, 1), (True, True, True, False)),
    "1x1-dw-one-expert": ((4, 4, 1, 4, 1), (False, True, False, False)),
}


@pytest.mark.parametrize("case", HEAD_CASES.values(), ids=HEAD_CASES.keys())
def test_skipped_heads(case, strategy):
    (ci, co, k, groups, experts), present = case
    layer = ODConv2d(ci, co, k, padding="same", groups=groups, num_experts=experts, min_channels=4, dtype=F64,
                     strategy=strategy)
    router = layer.router
    heads = (router.spatial, router.in_channel, router.out_channel, router.expert)
    assert tuple(h is not None for h in heads) == present
    x = torch.randn(1 if strategy == "single" else 3, ci, 5, 6, dtype=F64)
    att = router(x)
    assert isinstance(att, Attentions) and att._fields == ("expert", "spatial", "in_channel", "out_channel")
    by_head = (att.spatial, att.in_channel, att.out_channel, att.expert)
    assert tuple(a is not None for a in by_head) == present
    kh, kw = layer.kernel_size
    for a, shape in zip(by_head, ((kh, kw), (ci,), (co,), (experts,))):
        if a is not None:
            assert a.shape == (x.shape[0], *shape)
    expected = reference_odconv2d(x, layer.weight, *att, layer.bias, **_conv_kwargs(layer))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    # no parameters are spent on skipped heads
    hidden = router.fc.out_features
    n_heads = sum((hidden + 1) * h.out_features for h in heads if h is not None)
    assert sum(p.numel() for p in router.parameters()) == ci * hidden + 2 * hidden + n_heads


# ----------------------------------------------------------------------------------------------------------------
# The attention formulas


@pytest.mark.parametrize("norm", ["layer", "batch", "none"])
def test_omni_router_formula(norm):
    router = OmniRouter(6, 10, (3, 2), groups=2, num_experts=3, reduction=0.5, min_channels=2, temperature=2.5,
                        norm=norm).double()
    assert router.fc.out_features == 3  # max(int(6 * 0.5), 2)
    if norm != "none":
        with torch.no_grad():  # make the norm's affine parameters non-trivial
            router.norm.weight.normal_()
            router.norm.bias.normal_()
    if norm == "batch":
        router.norm.running_mean.normal_()
        router.norm.running_var.uniform_(0.5, 2.0)
    router.eval()
    x = torch.randn(4, 6, 5, 7, dtype=F64)
    h = x.mean((2, 3)) @ router.fc.weight.T
    if norm == "layer":
        h = F.layer_norm(h, (3,), router.norm.weight, router.norm.bias, router.norm.eps)
    elif norm == "batch":
        h = (h - router.norm.running_mean) / torch.sqrt(router.norm.running_var + router.norm.eps)
        h = h * router.norm.weight + router.norm.bias
    h = torch.relu(h)

    def head(lin):
        return (h @ lin.weight.T + lin.bias) / 2.5

    att = router(x)
    torch.testing.assert_close(att.spatial, torch.sigmoid(head(router.spatial)).reshape(4, 3, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(att.in_channel, torch.sigmoid(head(router.in_channel)), rtol=0, atol=1e-12)
    torch.testing.assert_close(att.out_channel, torch.sigmoid(head(router.out_channel)), rtol=0, atol=1e-12)
    torch.testing.assert_close(att.expert, torch.softmax(head(router.expert), 1), rtol=0, atol=1e-12)


def test_layer_norm_by_hand():
    """The default trunk norm is a LayerNorm over the hidden units: check it against the textbook formula."""
    router = OmniRouter(32, 8, (3, 3), num_experts=2).double()
    assert router.fc.out_features == 16 and isinstance(router.norm, nn.LayerNorm)
    x = torch.randn(3, 32, 4, 4, dtype=F64)
    z = x.mean((2, 3)) @ router.fc.weight.T
    z = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + router.norm.eps)
    h = torch.relu(z * router.norm.weight + router.norm.bias)
    expected = torch.softmax(h @ router.expert.weight.T + router.expert.bias, 1)
    torch.testing.assert_close(router(x).expert, expected, rtol=0, atol=1e-12)


def test_trunk_width():
    assert ODConv2d(64, 8, 1).router.fc.out_features == 16  # 64/16 = 4 -> min_channels
    assert ODConv2d(512, 8, 1).router.fc.out_features == 32  # 512 / 16
    assert ODConv2d(64, 8, 1, reduction=0.25, min_channels=4).router.fc.out_features == 16
    assert ODConv2d(4, 8, 1, min_channels=1).router.fc.out_features == 1


def test_temperature_divides_every_head():
    layer = ODConv2d(4, 6, 3, num_experts=3, min_channels=4, dtype=F64)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    att1 = layer.router(x)
    set_temperature(layer, 4.0)
    att4 = layer.router(x)
    # sigmoid heads: logit(a_T) = logit(a_1) / T ; softmax: log-ratios scale by 1/T
    for a1, a4 in zip((att1.spatial, att1.in_channel, att1.out_channel), (att4.spatial, att4.in_channel,
                                                                         att4.out_channel)):
        torch.testing.assert_close(torch.logit(a4), torch.logit(a1) / 4.0, rtol=0, atol=1e-10)
    lr1 = torch.log(att1.expert[:, 1:] / att1.expert[:, :1])
    lr4 = torch.log(att4.expert[:, 1:] / att4.expert[:, :1])
    torch.testing.assert_close(lr4, lr1 / 4.0, rtol=0, atol=1e-10)
    assert float(layer.state_dict()["router.temperature"]) == 4.0


# ----------------------------------------------------------------------------------------------------------------
# ODConv with neutral channel/spatial attentions is DynamicConv


def _neutralise(layer: ODConv2d, how: str) -> None:
    """Make the sigmoid heads input-independent: exactly 1 (saturated) or exactly 0.5 (zeroed)."""
    with torch.no_grad():
        for head in (layer.router.spatial, layer.router.in_channel, layer.router.out_channel):
            if head is not None:
                head.weight.zero_()
                head.bias.fill_(60.0 if how == "saturated" else 0.0)  # sigmoid(60) == 1.0 in float64


CONFIGS = {
    "3x3-s2-reflect-g2": (4, 6, 3, {"stride": 2, "padding": 1, "groups": 2, "padding_mode": "reflect"}),
    "1x1": (4, 6, 1, {}),
    "2x3-dw-same-circular": (4, 4, (2, 3), {"padding": "same", "groups": 4, "padding_mode": "circular"}),
}


@pytest.mark.parametrize("how", ["saturated", "half"])
@pytest.mark.parametrize("config", CONFIGS)
def test_neutral_odconv_equals_dynamic_conv(config, how, strategy):
    ci, co, k, kw = CONFIGS[config]
    od = ODConv2d(ci, co, k, **kw, num_experts=3, min_channels=4, dtype=F64, strategy=strategy)
    dyn = DynamicConv2d(ci, co, k, **kw, num_experts=3, dtype=F64, strategy=strategy)
    _neutralise(od, how)
    with torch.no_grad():
        dyn.bias.copy_(od.bias)
        if how == "saturated":
            dyn.weight.copy_(od.weight)
        else:  # every sigmoid head gives 0.5: the experts must be scaled up by 1 / constant_gain to compensate
            dyn.weight.copy_(od.weight)
            od.weight.div_(od.router.constant_gain())
    x = torch.randn(1 if strategy == "single" else 3, ci, 7, 6, dtype=F64)
    att = od.router(x)
    neutral = 1.0 if how == "saturated" else 0.5
    for a in (att.spatial, att.in_channel, att.out_channel):
        if a is not None:
            assert torch.all(a == neutral)
    # the expert head still routes per example, as DynamicConv's softmax does
    assert not torch.allclose(att.expert[0], att.expert[-1]) or x.shape[0] == 1
    expected = dyn(x, routing_weights=att.expert)
    torch.testing.assert_close(od(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        expected, reference_dynamic_conv2d(x, dyn.weight, att.expert, dyn.bias, **_conv_kwargs(dyn)), rtol=0,
        atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Conversion: constant attentions


@pytest.mark.parametrize("case", ["3x3-dense", "1x1", "3x3-depthwise", "3x3-one-expert", "1x1-dw-one-expert"])
def test_from_conv_constant_attentions(case):
    (ci, co, k, groups, experts), present = HEAD_CASES[case]
    conv = nn.Conv2d(ci, co, k, padding=k // 2, groups=groups, dtype=F64)
    layer = ODConv2d.from_conv(conv, num_experts=experts, perturb=0.2)
    x = torch.randn(3, ci, 5, 5, dtype=F64)
    att = layer.router(x)
    for a in (att.spatial, att.in_channel, att.out_channel):
        if a is not None:
            assert torch.all(a == 0.5)
    if att.expert is not None:
        torch.testing.assert_close(att.expert, torch.full((3, experts), 1 / experts, dtype=F64), rtol=0, atol=1e-15)
    assert layer.router.constant_gain() == 0.5 ** sum(present[:3])
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.bias, conv.bias.expand(experts, -1))  # added after the attentions: unscaled


# ----------------------------------------------------------------------------------------------------------------
# Training at batch size 1; norm choice


def test_batch_size_one_training_step_with_default_norm():
    torch.manual_seed(0)
    layer = ODConv2d(8, 8, 3, padding=1)
    assert isinstance(layer.router.norm, nn.LayerNorm)
    layer.train()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(1, 8, 6, 6)
    loss = (layer(x) - 1).square().mean()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in layer.named_parameters())
    assert (layer(x) - 1).square().mean() < loss


def test_default_norm_keeps_examples_independent_in_training():
    layer = ODConv2d(8, 8, 3, padding=1, dtype=F64).train()
    x = torch.randn(4, 8, 5, 5, dtype=F64)
    out = layer(x)
    for b in range(4):
        torch.testing.assert_close(out[b:b + 1], layer(x[b:b + 1]), rtol=0, atol=1e-12)


def test_batch_norm_trunk_needs_more_than_one_example_in_training():
    """Documented: norm='batch' (the reference code's BatchNorm) fails in training at batch size 1."""
    assert "batch size 1" in OmniRouter.__doc__
    layer = ODConv2d(8, 8, 3, padding=1, norm="batch")
    assert isinstance(layer.router.norm, nn.BatchNorm1d)
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(ValueError, match=r"norm=.batch. cannot train on a batch of 1.*norm=.layer."):
        layer.train()(x)
    assert layer.train()(torch.randn(2, 8, 6, 6)).shape == (2, 8, 6, 6)
    assert layer.eval()(x).shape == (1, 8, 6, 6)  # running statistics: fine at batch 1


def test_norm_none():
    layer = ODConv2d(8, 8, 3, padding=1, norm="none").train()
    assert isinstance(layer.router.norm, nn.Identity)
    layer(torch.randn(1, 8, 6, 6)).sum().backward()


# ----------------------------------------------------------------------------------------------------------------
# Temperature


def test_odconv_temperature_is_a_buffer():
    layer = ODConv2d(4, 6, 3, padding=1, temperature=30.0, dtype=F64)
    assert "router.temperature" in layer.state_dict()
    assert "router.temperature" not in dict(layer.named_parameters())
    assert float(layer.router.temperature) == 30.0
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    hot = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # state_dict() tensors alias the module's
    set_temperature(layer, 1.0)
    assert not torch.allclose(layer(x), hot)
    layer.load_state_dict(state)
    assert float(layer.router.temperature) == 30.0
    torch.testing.assert_close(layer(x), hot, rtol=0, atol=0)


def test_dynamic_conv_temperature():
    layer = DynamicConv2d(8, 6, 3, padding=1, temperature=30.0, dtype=F64)
    x = torch.randn(3, 8, 5, 5, dtype=F64)
    hot = layer.router(x)
    torch.testing.assert_close(hot.sum(1), torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    set_temperature(layer, 1e-3)
    cold = layer.router(x)
    assert (cold.max(1).values > 0.99).all()  # a low temperature makes the routing (nearly) one-hot
    assert hot.max(1).values.max() < cold.max(1).values.min()
    fresh = DynamicConv2d(8, 6, 3, padding=1, dtype=F64)
    fresh.load_state_dict(layer.state_dict())
    assert float(fresh.router.temperature) == pytest.approx(1e-3)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
