"""Bad or unusual inputs end in one line before any work, and every result is labelled by what really ran (issue 18).

The engine's strategy rule, model options that a dedicated flag sets, repeated grid values, ranges and relations
of numeric options, run folders whose config.yaml changed, clear messages, and a command line that answers
``--help``/``--version`` without importing torch.
"""

from __future__ import annotations

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
