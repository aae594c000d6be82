"""ModelEma: closed-form averages after k updates, TensorFlow's decay warm-up, which buffers are averaged, the
weights_only state round trip and swapping the averaged weights in and out."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from condconv.training.ema import ModelEma


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("temperature", torch.tensor(30.0))  # a setting: copied, never averaged


def _set(net: _Net, value: float) -> None:
    with torch.no_grad():
        for t in (*net.parameters(), net.bn.running_mean, net.bn.running_var):
            t.fill_(value)


def test_closed_form_without_warmup():
    net = _Net()
    _set(net, 0.0)
    ema = ModelEma(net, decay=0.9, warmup=False)
    values = [1.0, 2.0, 5.0, -3.0]
    for v in values:
        _set(net, v)
        ema.update(net)
    # s_k = d s_{k-1} + (1 - d) w_k with s_0 = 0
    expected = sum((1 - 0.9) * 0.9 ** (len(values) - 1 - i) * v for i, v in enumerate(values))
    for name in ("fc.weight", "fc.bias", "bn.weight", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(ema.averaged[name], torch.full_like(ema.averaged[name], expected))
    assert ema.num_updates == 4


def test_tf_decay_warmup_closed_form():
    net = _Net()
    _set(net, 0.0)
    ema = ModelEma(net, decay=0.9999)
    assert [ema.decay_at(k) for k in (1, 2, 10)] == pytest.approx([2 / 11, 3 / 12, 11 / 20])
    assert ema.decay_at(10**6) == 0.9999
    shadow = 0.0
    for k in range(1, 6):
        _set(net, float(k))
        ema.update(net)
        d = min(0.9999, (1 + k) / (10 + k))
        shadow = d * shadow + (1 - d) * k
    torch.testing.assert_close(ema.averaged["fc.weight"], torch.full((2, 3), shadow))


def test_settings_and_counters_are_copied_not_averaged():
    net = _Net()
    ema = ModelEma(net, decay=0.99, warmup=False)
    assert set(ema.copied) == {"temperature", "bn.num_batches_tracked"}
    net.temperature.fill_(7.0)
    net.bn.num_batches_tracked.fill_(12)
    ema.update(net)
    assert ema.copied["temperature"].item() == 7.0 and ema.copied["bn.num_batches_tracked"].item() == 12


def test_applied_swaps_in_and_restores_even_on_error():
    torch.manual_seed(0)
    net = _Net()
    ema = ModelEma(net, decay=0.5, warmup=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _set(net, 3.0)
    ema.update(net)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.applied(net) as model:
        assert model is net
        torch.testing.assert_close(net.fc.weight, (before["fc.weight"] + 3.0) / 2)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, trained[k])
    with pytest.raises(RuntimeError, match="boom"), ema.applied(net):
        raise RuntimeError("boom")
    torch.testing.assert_close(net.fc.weight, trained["fc.weight"])
    ema.copy_to(net)
    torch.testing.assert_close(net.fc.weight, ema.averaged["fc.weight"])


def test_state_round_trip_weights_only_continues_identically():
    torch.manual_seed(1)
    net = _Net()
    a = ModelEma(net, decay=0.999)
    for v in (1.0, 2.0):
        _set(net, v)
        a.update(net)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = ModelEma(_Net(), decay=0.5, warmup=False)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert (b.decay, b.warmup, b.num_updates) == (0.999, True, 2)
    _set(net, 4.0)
    a.update(net)
    b.update(net)
    for name in a.averaged:
        torch.testing.assert_close(a.averaged[name], b.averaged[name])


def test_state_and_model_mismatches_are_reported():
    ema = ModelEma(_Net())
    state = ema.state_dict()
    with pytest.raises(ValueError, match="num_updates"):
        ema.load_state_dict({k: v for k, v in state.items() if k != "num_updates"})
    bad = {**state, "averaged": {**state["averaged"], "fc.weight": torch.zeros(5)}}
    with pytest.raises(ValueError, match="fc.weight"):
        ema.load_state_dict(bad)
    with pytest.raises(ValueError, match="does not match"):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="decay"):
        ModelEma(_Net(), decay=1.0)
    with pytest.raises(TypeError, match="model"):
        ModelEma("net")


def test_device_placement_of_the_shadow():
    net = _Net()
    ema = ModelEma(net, device="cpu")
    assert all(t.device.type == "cpu" for t in ema.averaged.values())
    assert ema.to("cpu") is ema
    assert ema.averaged["fc.weight"] is not net.fc.weight  # a copy, not the parameter
