"""Bad or unusual inputs end in one line before any work, and every result is labelled by what really ran (issue 18).

The engine's strategy rule, model options that a dedicated flag sets, repeated grid values, ranges and relations
of numeric options, run folders whose config.yaml changed, clear messages, and a command line that answers
``--help``/``--version`` without importing torch.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import condconv
from condconv.nn import functional as engine
from condconv.nn.layers import CondConv2d, DynamicConv2d, ODConv2d

LAYER_CLASSES = (CondConv2d, DynamicConv2d, ODConv2d)


# ---------------------------------------------------------------------------------------------------------------
# 1. one rule for the engine's strategy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_unknown_strategy_is_refused_wherever_it_is_set(cls):
    with pytest.raises(ValueError, match="'Grouped'"):
        cls(4, 4, 3, padding=1, num_experts=2, strategy="Grouped")
    layer = cls(4, 4, 3, padding=1, num_experts=2)
    with pytest.raises(ValueError) as info:
        layer.strategy = "Grouped"
    message = str(info.value)
    assert "'Grouped'" in message and all(repr(s) in message for s in engine.STRATEGIES)
    assert layer.strategy is None  # unchanged
    layer.strategy = "grouped"
    assert layer.strategy == "grouped" and "strategy='grouped'" in repr(layer)
    layer.strategy = None
    with pytest.raises(ValueError, match="'Grouped'"), condconv.use_strategy("Grouped"):
        pass
    with pytest.raises(ValueError, match="'Grouped'"):
        condconv.set_default_strategy("Grouped")
    assert condconv.get_default_strategy() == "auto"


def test_a_strategy_slipped_past_the_layer_check_never_reaches_a_path():
    """A name that reaches the engine around the property (``__dict__``) is an error, not example 0's kernel."""
    layer = CondConv2d(4, 6, 3, padding=1, num_experts=3)
    x = torch.randn(3, 4, 5, 5)
    layer.__dict__["_strategy"] = "Grouped"
    with pytest.raises(ValueError, match="'Grouped'"):
        layer(x)
    with pytest.raises(ValueError, match="'Grouped'"):
        engine.dynamic_conv2d(x, layer.weight, torch.rand(3, 3), strategy="Grouped")


def test_every_path_gets_a_batch_it_is_right_for():
    layer = CondConv2d(4, 6, 3, padding=1, num_experts=3)
    x = torch.randn(3, 4, 5, 5)
    layer.strategy = "single"
    with pytest.raises(ValueError, match="'single' needs batch size 1, got 3"):
        layer(x)
    call = engine._validate(x, layer.weight, torch.rand(3, 3), None, 1, 1, 1, 1, "zeros", None)
    with pytest.raises(ValueError, match="cannot run a batch of 3"):  # the engine's last branch asserts it too
        engine._execute("Grouped", x, layer.weight, torch.rand(3, 3), None, 1, "zeros", call)
    layer.strategy = "grouped"
    reference = torch.stack([torch.nn.functional.conv2d(
        x[b:b + 1], torch.einsum("e,eoikl->oikl", r, layer.weight), padding=1)[0] + (r @ layer.bias)[:, None, None]
        for b, r in enumerate(layer.router(x))])
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-5)


def test_a_layer_pickled_with_the_old_plain_attribute_still_loads():
    import pickle

    layer = CondConv2d(4, 4, 1, num_experts=2, strategy="bmm")
    state = layer.__dict__.copy()
    state["strategy"] = state.pop("_strategy")
    clone = CondConv2d.__new__(CondConv2d)
    clone.__setstate__(state)
    assert clone.strategy == "bmm"
    assert pickle.loads(pickle.dumps(layer)).strategy == "bmm"


# ---------------------------------------------------------------------------------------------------------------
# 5. clear messages from the layers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_integer_like_channel_counts_are_taken_as_nn_conv2d_takes_them(cls):
    np = pytest.importorskip("numpy")
    layer = cls(np.int64(4), np.int32(8), np.int64(3), padding=np.int64(1), groups=np.int16(2),
                num_experts=np.int64(2))
    static = torch.nn.Conv2d(np.int64(4), np.int32(8), np.int64(3), padding=np.int64(1), groups=np.int16(2))
    assert (layer.in_channels, layer.out_channels, layer.groups, layer.num_experts) == (4, 8, 2, 2)
    assert all(type(v) is int for v in (layer.in_channels, layer.out_channels, layer.groups, layer.num_experts,
                                        *layer.kernel_size, *layer.padding))
    x = torch.randn(2, 4, 5, 5)
    assert layer(x).shape == static(x).shape == (2, 8, 5, 5)
    for bad in (4.0, True, "4"):
        with pytest.raises((TypeError, ValueError), match="in_channels"):
            cls(bad, 8, 3, num_experts=2)


@pytest.mark.parametrize("mode,pad,size,ok", [("reflect", 3, 3, False), ("reflect", 2, 3, True),
                                               ("circular", 3, 2, False), ("circular", 3, 3, True)])
def test_wrap_padding_wider_than_the_input_is_a_clear_error(mode, pad, size, ok):
    layer = CondConv2d(2, 2, 2 * pad - 1, padding=pad, padding_mode=mode, num_experts=2)
    x = torch.randn(2, 2, size, size + 2)
    if ok:
        static = torch.nn.Conv2d(2, 2, 2 * pad - 1, padding=pad, padding_mode=mode)
        assert layer(x).shape == static(x).shape
        return
    with pytest.raises(ValueError, match=rf"padding_mode='{mode}' needs padding .* the input: padding {pad} along the "
                                         rf"height of a {size}x{size + 2} input"):
        layer(x)
    with pytest.raises(ValueError, match=f"padding_mode='{mode}'"):
        engine.dynamic_conv2d(x, layer.weight, torch.rand(2, 2), padding=pad, padding_mode=mode)


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_torchscript_scripting_says_what_is_not_supported_and_what_to_use(cls):
    layer = cls(4, 4, 3, padding=1, num_experts=2).eval()
    for module in (layer, torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), layer)):
        with pytest.raises(RuntimeError, match=rf"torch.jit.script does not support {cls.__name__} .*torch.jit.trace"
                                               r".*torch.export"):
            torch.jit.script(module)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(layer, x, check_trace=False)
        torch.testing.assert_close(traced(x), layer(x))  # what the message points to works
