"""torch.compile of the dynamic layers and of models: dynamic batch sizes without recompiling, training too.

Most cases use the 'aot_eager' backend (it runs the same Dynamo capture and AOTAutograd joint graph as Inductor,
without the slow C++ code generation); one Inductor case is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import condconv
from condconv.models import create_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


LAYERS = {
    "condconv": lambda: condconv.CondConv2d(6, 8, 3, padding=1, num_experts=3),
    "dynamic-depthwise": lambda: condconv.DynamicConv2d(6, 6, 3, padding=1, groups=6, num_experts=3),
    "dynamic-1x1": lambda: condconv.DynamicConv2d(6, 8, 1, num_experts=3),
    # ODConv's spatial attention traces one convolution per kernel position: 2x2 keeps the capture quick
    "odconv": lambda: condconv.ODConv2d(6, 8, 2, stride=2, num_experts=3),
}


def _check_train_and_eval(model: nn.Module, eager: nn.Module, shape, batches=(2, 5), backend="aot_eager"):
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    model.train()
    eager.train()
    for batch in batches:
        x = torch.randn(batch, *shape)
        y = compiled(x)
        y.square().mean().backward()
        ref = eager(x)
        ref.square().mean().backward()
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=f"gradient of {name}")
            p.grad = q.grad = None
    assert graphs() == 1, f"recompiled for batch sizes {batches}: {graphs()} graphs"
    model.eval()
    eager.eval()
    with torch.no_grad():
        for batch in (3, 6):
            x = torch.randn(batch, *shape)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    assert graphs() == 2  # one more for eval mode + no_grad, not one per batch size
    return compiled


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_compiles_with_dynamic_batch(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    eager = LAYERS[name]()
    eager.load_state_dict(layer.state_dict())
    compiled = _check_train_and_eval(layer, eager, (6, 8, 8))
    with torch.no_grad():  # batch 1 is specialised by PyTorch (one more graph) but must be right
        x = torch.randn(1, 6, 8, 8)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def test_converted_model_compiles():
    base = small_model()
    model, names = condconv.convert(base, "condconv", num_experts=3, include="*", exclude="0", perturb=0.05, seed=0)
    eager, _ = condconv.convert(base, "condconv", num_experts=3, include="*", exclude="0", perturb=0.05, seed=0)
    assert names == ["3", "6"]
    _check_train_and_eval(model, eager, (3, 8, 8))


@pytest.mark.slow
def test_zoo_model_compiles():
    torch.manual_seed(0)
    base = create_model("resnet18_cifar", num_classes=10, width_mult=0.25)
    model, _ = condconv.convert(base, "condconv", num_experts=2, perturb=0.05, seed=0)
    eager, _ = condconv.convert(base, "condconv", num_experts=2, perturb=0.05, seed=0)
    _check_train_and_eval(model, eager, (3, 16, 16))


@pytest.mark.slow
def test_inductor_backend():
    torch.manual_seed(0)
    model = nn.Sequential(condconv.CondConv2d(4, 8, 3, padding=1, num_experts=3), nn.ReLU(),
                          condconv.ODConv2d(8, 8, 3, padding=1, num_experts=2))
    eager = nn.Sequential(condconv.CondConv2d(4, 8, 3, padding=1, num_experts=3), nn.ReLU(),
                          condconv.ODConv2d(8, 8, 3, padding=1, num_experts=2))
    eager.load_state_dict(model.state_dict())
    _check_train_and_eval(model, eager, (4, 8, 8), backend="inductor")
