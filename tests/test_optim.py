"""Optimisers and learning-rate schedules: RMSpropTF against its update written out in float64, SGD's momentum
choice, the weight-decay groups, and each schedule's closed form at sampled steps."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from condconv.training.config import TrainConfig
from condconv.training.optim import (
    RMSpropTF,
    WarmupConstant,
    WarmupCosine,
    WarmupExponential,
    WarmupStep,
    build_optimizer,
    build_scheduler,
    make_schedule,
    param_groups,
    peak_lr,
    scaled_lr,
)


def _config(**overrides) -> SimpleNamespace:
    """Today's TrainConfig fields plus the new options (TrainConfig does not have them yet)."""
    return SimpleNamespace(**{**TrainConfig().to_dict(), **overrides})


def _tf_rmsprop(p, grads, lrs, rho, momentum, eps, wd=0.0):
    """TensorFlow 1's ApplyRMSProp, written out in float64: ms starts at ones, eps inside the root, lr in mom."""
    p = p.clone().double()
    ms, mom = torch.ones_like(p), torch.zeros_like(p)
    for g, lr in zip(grads, lrs):
        g = g.double() + wd * p
        ms = rho * ms + (1 - rho) * g * g
        mom = momentum * mom + lr * g / torch.sqrt(ms + eps)
        p = p - mom
    return p


def _run_rmsprop(p0, grads, lrs, **kwargs):
    p = nn.Parameter(p0.clone().double())
    opt = RMSpropTF([p], lr=lrs[0], **kwargs)
    for g, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = g.double().clone()
        opt.step()
    return p.detach(), opt


def test_rmsprop_tf_one_step_matches_the_tf_update():
    torch.manual_seed(0)
    p0, g = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    got, _ = _run_rmsprop(p0, [g], [0.1], rho=0.9, momentum=0.9, eps=1e-3)
    # one step by hand: ms = 0.9 + 0.1 g^2, mom = 0.1 g / sqrt(ms + 1e-3), p = p0 - mom
    expected = p0 - 0.1 * g / torch.sqrt(0.9 + 0.1 * g * g + 1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum, wd", [(0.9, 0.0), (0.9, 1e-2), (0.0, 0.0)])
def test_rmsprop_tf_several_steps_with_a_changing_lr(momentum, wd):
    torch.manual_seed(1)
    p0 = torch.randn(4, 4, dtype=torch.float64)
    grads = [torch.randn(4, 4, dtype=torch.float64) for _ in range(7)]
    lrs = [0.05, 0.05, 0.1, 0.1, 0.02, 0.3, 0.01]  # a change of lr acts through the momentum buffer
    got, _ = _run_rmsprop(p0, grads, lrs, rho=0.9, momentum=momentum, eps=1e-3, weight_decay=wd)
    torch.testing.assert_close(got, _tf_rmsprop(p0, grads, lrs, 0.9, momentum, 1e-3, wd), rtol=1e-12, atol=1e-12)


def test_rmsprop_tf_defaults_and_state_round_trip_weights_only():
    torch.manual_seed(2)
    p0 = torch.randn(3, dtype=torch.float64)
    grads = [torch.randn(3, dtype=torch.float64) for _ in range(6)]
    opt = RMSpropTF([nn.Parameter(p0.clone())], lr=0.1)
    group = opt.param_groups[0]
    assert (group["rho"], group["momentum"], group["eps"], group["weight_decay"]) == (0.9, 0.9, 1e-3, 0.0)
    # three steps, save (weights_only load), three more in a fresh optimizer == six in one
    p, opt = _run_rmsprop(p0, grads[:3], [0.1] * 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    q = nn.Parameter(p.clone())
    opt2 = RMSpropTF([q], lr=0.1)
    opt2.load_state_dict(state)
    for g in grads[3:]:
        q.grad = g.clone()
        opt2.step()
    full, _ = _run_rmsprop(p0, grads, [0.1] * 6)
    torch.testing.assert_close(q.detach(), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, name", [({"lr": -1.0}, "lr"), ({"lr": 0.1, "rho": 1.0}, "rho"),
                                          ({"lr": 0.1, "eps": 0.0}, "eps"), ({"lr": 0.1, "momentum": -0.1}, "momentum"),
                                          ({"lr": 0.1, "weight_decay": float("nan")}, "weight_decay")])
def test_rmsprop_tf_rejects_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RMSpropTF([nn.Parameter(torch.zeros(1))], **kwargs)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)


def _ids(params):
    return {id(p) for p in params}


def test_param_groups_three_exclusion_rules():
    net = _Net()
    norms = _ids([net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias])
    biases = _ids([net.conv.bias, net.fc.bias])
    everything = _ids(net.parameters())
    for exclude, skipped in (("norm_and_bias", norms | biases), ("norm", norms), ("none", set())):
        decay, no_decay = param_groups(net, 1e-4, exclude)
        assert _ids(no_decay["params"]) == skipped and _ids(decay["params"]) == everything - skipped, exclude
        assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="exclude"):
        param_groups(net, 1e-4, "bias")
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(net, -1.0)


def test_build_optimizer_sgd_momentum_choice_and_rmsprop():
    net = _Net()
    assert build_optimizer(net, TrainConfig()).param_groups[0]["nesterov"] is True  # today's behaviour
    assert build_optimizer(net, _config(nesterov=False)).param_groups[0]["nesterov"] is False
    assert build_optimizer(net, _config(momentum=0.0)).param_groups[0]["nesterov"] is False
    opt = build_optimizer(net, _config(optimizer="rmsprop_tf", rmsprop_decay=0.8, rmsprop_eps=1e-4, lr=0.016,
                                       lr_reference_batch=256, batch_size=512, weight_decay_exclude="none"))
    assert isinstance(opt, RMSpropTF)
    assert opt.param_groups[0]["rho"] == 0.8 and opt.param_groups[0]["eps"] == 1e-4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.032) and not opt.param_groups[1]["params"]
    assert isinstance(build_optimizer(net, _config(optimizer="adamw")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(net, _config(optimizer="lamb"))


def test_scaled_lr_and_peak_lr():
    assert scaled_lr(0.016, 2048, 256) == pytest.approx(0.128)  # EfficientNet's RMSProp rule
    assert scaled_lr(0.1, 512, None) == 0.1
    assert peak_lr(_config(lr=0.1, batch_size=64, lr_reference_batch=256), world_size=4) == pytest.approx(0.1)
    assert peak_lr(TrainConfig(lr=0.3)) == 0.3
    with pytest.raises(ValueError, match="reference_batch"):
        scaled_lr(0.1, 256, 0)
    with pytest.raises(ValueError, match="batch_size"):
        scaled_lr(0.1, 0, 256)


def test_warmup_is_linear_in_every_schedule():
    for f in (WarmupCosine(8, 100, 0.1, 0.0), WarmupStep(8, [50], 0.1, 0.1, 0.0),
              WarmupExponential(8, 10.0, 0.9, 0.1, 0.0), WarmupConstant(8, 0.1, 0.0)):
        assert [f(s) for s in range(8)] == pytest.approx([(s + 1) / 8 for s in range(8)])


@pytest.mark.parametrize("step", [0, 1, 17, 29, 30, 31, 59, 60, 89, 90, 99, 250])
def test_step_schedule_closed_form(step):
    f = make_schedule("step", steps_per_epoch=1, epochs=100, milestones=[30, 60, 90], gamma=0.1)
    assert f(step) == pytest.approx(0.1 ** sum(step >= m for m in (30, 60, 90)))


@pytest.mark.parametrize("step", [0, 7, 40, 41, 99, 311, 624, 625, 1500, 3000])
def test_exponential_schedule_closed_form_staircase_and_continuous(step):
    spe, warmup = 125, 5  # 5 warm-up epochs of 125 steps, 0.97 every 2.4 epochs (300 steps)
    stair = make_schedule("exponential", steps_per_epoch=spe, epochs=30, warmup_epochs=warmup, gamma=0.97,
                          decay_epochs=2.4)
    smooth = make_schedule("exponential", steps_per_epoch=spe, epochs=30, warmup_epochs=warmup, gamma=0.97,
                           decay_epochs=2.4, staircase=False)
    if step < warmup * spe:
        assert stair(step) == smooth(step) == pytest.approx((step + 1) / (warmup * spe))
    else:  # the decay counts from step 0, as TensorFlow's (0.97**2 at the end of the 5 warm-up epochs)
        assert stair(step) == pytest.approx(0.97 ** math.floor(step / 300))
        assert smooth(step) == pytest.approx(0.97 ** (step / 300))


@pytest.mark.parametrize("step", [10, 11, 55, 60, 100, 109, 110, 500])
def test_cosine_schedule_closed_form(step):
    f = make_schedule("cosine", steps_per_epoch=10, epochs=11, warmup_epochs=1, peak=0.1, floor=0.001)
    progress = min(max((step - 10) / 100, 0.0), 1.0)
    assert f(step) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedule_floor_and_defaults():
    f = make_schedule("exponential", steps_per_epoch=1, epochs=100, decay_epochs=1, peak=0.1, floor=0.01)
    assert f(0) == 1.0 and f(1) == pytest.approx(0.97) and f(1000) == pytest.approx(0.1)  # default gamma 0.97
    assert make_schedule("step", steps_per_epoch=2, epochs=10, milestones=[1.5])(3) == pytest.approx(0.1)
    assert make_schedule("constant", steps_per_epoch=1, epochs=5)(4) == 1.0


@pytest.mark.parametrize("kwargs, name", [({"schedule": "poly"}, "schedule"), ({"steps_per_epoch": 0}, "steps_per_"),
                                          ({"epochs": 1.5}, "epochs"), ({"warmup_epochs": -1}, "warmup_epochs"),
                                          ({"schedule": "step", "milestones": "30"}, "milestones"),
                                          ({"schedule": "exponential", "decay_epochs": 0}, "decay_epochs"),
                                          ({"schedule": "step", "gamma": 0}, "gamma")])
def test_make_schedule_rejects_bad_options(kwargs, name):
    options = {"steps_per_epoch": 10, "epochs": 5, **kwargs}
    with pytest.raises(ValueError, match=name):
        make_schedule(**options)


def test_build_scheduler_step_schedule_and_numbers_only_state():
    net = nn.Linear(2, 2)
    config = _config(lr=0.1, epochs=4, warmup_epochs=0.0, lr_schedule="step", lr_milestones=[1, 3], lr_gamma=0.5)
    opt = build_optimizer(net, config)
    sched = build_scheduler(opt, config, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1] * 5 + [0.05] * 10 + [0.025] * 5)
    state = sched.state_dict()
    assert all(isinstance(v, (int, float, list, type(None), bool)) for v in state.values()), state
    # today's configuration (no new fields) keeps today's warm-up + cosine
    default = build_scheduler(build_optimizer(net, TrainConfig(lr=0.1, epochs=2)), TrainConfig(lr=0.1, epochs=2), 4)
    assert default.get_last_lr()[0] == pytest.approx(0.1 * WarmupCosine(4, 8, 0.1, 0.0)(0))
