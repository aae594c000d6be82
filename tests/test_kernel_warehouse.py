"""KernelWarehouse layers (Li and Yao, ICML 2024, arXiv:2406.07879): every strategy against the per-example
reference that builds each kernel cell by cell, gradcheck, batch 1, temperature, warehouse sharing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import condconv
from condconv.nn.functional import conv_with_kernels
from condconv.nn.kernel_warehouse import KernelWarehouse, KWConv1d, KWConv2d, KWConv3d, KWLinear
from condconv.nn.kw_reference import reference_kw_conv, reference_kw_kernel

F64 = torch.float64
LAYERS = {1: KWConv1d, 2: KWConv2d, 3: KWConv3d}


class Pair(nn.Module):
    """Two layers sharing one warehouse (the second's input is the first's output)."""

    def __init__(self, dim=2, cin=4, mid=8, k=3, groups=1, bias=True, stride=1, dilation=1, **options):
        super().__init__()
        self.warehouse = KernelWarehouse(sharing_range=("conv",), **options)
        layer = LAYERS[dim]
        self.a = layer(cin, mid, k, stride, dilation * (k // 2), dilation, 1, bias, warehouse=self.warehouse,
                       name="conv0")
        self.b = layer(mid, mid, k, 1, k // 2, 1, groups, bias, warehouse=self.warehouse, name="conv1")
        self.warehouse.build(self)

    def forward(self, x):
        return self.b(self.a(x))


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BatchNorm statistics, so nothing is at a special value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=F64) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=F64) + 0.5)
    return model


def _expected_one_hot(num_mixtures, num_cells, start, ratio):
    """The temperature-1 attention, written out from the rule of the official code's temperature initialisation."""
    table = torch.zeros(num_mixtures, num_cells + 1, dtype=F64)
    if ratio >= 1:
        for m in range(num_mixtures):
            table[m, start + m * int(ratio)] = 1
        return table
    n = int(1 / ratio)
    for m in range(num_mixtures):
        if m % n == (m // n) % n:
            table[m, start] = 1
            start += 1
        else:
            table[m, num_cells] = 1
    return table


def reference_attention(att, x):
    """The attention of one layer (eval mode) from its parameters, mixture by mixture."""
    pooled = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
    h = pooled @ att.fc1.weight.T + (att.fc1.bias if att.fc1.bias is not None else 0)
    if isinstance(att.norm, nn.BatchNorm1d):
        h = (h - att.norm.running_mean) / torch.sqrt(att.norm.running_var + att.norm.eps) * att.norm.weight \
            + att.norm.bias
    elif isinstance(att.norm, nn.LayerNorm):
        h = F.layer_norm(h, h.shape[-1:], att.norm.weight, att.norm.bias, att.norm.eps)
    h = torch.clamp(h, min=0)
    logits = h @ att.fc2.weight.T + (att.fc2.bias if att.fc2.bias is not None else 0)
    rows = []
    num_cells, mixtures = att.num_cells, att.num_mixtures
    one_hot = _expected_one_hot(mixtures, num_cells, att.start, att.cell_num_ratio)
    t = float(att.temperature)
    for b in range(x.shape[0]):
        per_example = []
        width = logits.shape[1] // mixtures
        for m in range(mixtures):
            row = logits[b, m * width:(m + 1) * width]
            if att.fc3 is not None:  # basis: local cells, the basis mapped to the other cells, the zero cell
                local, basis, zero = row[:att.num_local], row[att.num_local:-1], row[-1:]
                others = att.fc3.weight @ basis
                row = torch.cat([others[:att.start], local, others[att.start:], zero])
                row = row + att.basis_bias[m * (num_cells + 1):(m + 1) * (num_cells + 1)]
            row = row / (row.abs().sum() + 1e-3)
            row = (1 - t) * row + t * one_hot[m]
            per_example.append(row[:-1])
        rows.append(torch.stack(per_example))
    return torch.stack(rows)


def _check_against_reference(model, x, strategies):
    model.eval()
    h = x
    expected_in = []
    for layer in (model.a, model.b):
        expected_in.append(h)
        att = reference_attention(layer.attention, h)
        torch.testing.assert_close(layer.attention(h), att, rtol=1e-10, atol=1e-12)
        cells = model.warehouse.cells[layer.warehouse_index]
        h = reference_kw_conv(h, att, cells, layer.kernel_shape, layer.bias, layer.stride, layer.padding,
                              layer.dilation, layer.groups)
    for strategy in strategies:
        with condconv.use_strategy(strategy):
            out = model(x)
        torch.testing.assert_close(out, h, rtol=1e-10, atol=1e-10, msg=f"strategy {strategy}")


CASES = [  # (dim, cin, mid, k, groups, bias, stride, dilation, options)
    (2, 4, 8, 3, 1, True, 1, 1, {}),
    (2, 4, 8, 3, 8, False, 2, 1, {"cell_num_ratio": 2}),  # depthwise second layer, 2x cells
    (2, 4, 8, 3, 2, True, 1, 2, {"cell_num_ratio": 0.5, "cell_inplane_ratio": 0.5, "cell_outplane_ratio": 0.5}),
    (2, 4, 8, 1, 1, True, 2, 1, {"cell_num_ratio": 0.25, "cell_inplane_ratio": 0.5, "cell_outplane_ratio": 0.5}),
    (2, 4, 8, 3, 1, False, 1, 1, {"spatial_partition": False, "cell_num_ratio": 4}),
    (2, 8, 8, 3, 1, True, 1, 1, {"nonlocal_basis_ratio": 0.5, "norm": "layer"}),
    (1, 4, 8, 3, 2, True, 2, 1, {"cell_num_ratio": 0.5, "cell_inplane_ratio": 0.5, "cell_outplane_ratio": 0.5}),
    (1, 4, 8, 5, 1, False, 1, 1, {"spatial_partition": False, "norm": "none"}),
    (3, 4, 8, 3, 1, True, 1, 1, {}),
    (3, 4, 8, 3, 8, False, 2, 1, {"cell_num_ratio": 2, "nonlocal_basis_ratio": 0.25}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}d-k{c[3]}-g{c[4]}-{c[8]}" for c in CASES])
def test_every_strategy_matches_the_per_example_reference(case):
    dim, cin, mid, k, groups, bias, stride, dilation, options = case
    torch.manual_seed(0)
    model = _randomise(Pair(dim, cin, mid, k, groups, bias, stride, dilation, **options).double())
    x = torch.randn(3, cin, *([7] * dim), dtype=F64)
    strategies = ("grouped", "bmm", "scan", "auto", "experts") if dim < 3 else ("auto",)
    _check_against_reference(model, x, strategies)
    _check_against_reference(model, x[:1], strategies + ("single",))


def test_attention_temperature_one_hot_and_independence_of_the_batch():
    torch.manual_seed(1)
    model = _randomise(Pair(2, 4, 8, 3, cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5).double())
    model.eval()
    x = torch.randn(4, 4, 6, 6, dtype=F64)
    full = model(x)
    torch.testing.assert_close(torch.cat([model(x[b:b + 1]) for b in range(4)]), full, rtol=1e-10, atol=1e-12)
    assert condconv.set_temperature(model, 1.0) == 2
    for layer, inputs in ((model.a, x), (model.b, model.a(x))):
        att = layer.attention(inputs)
        assert set(att.unique().tolist()) <= {0.0, 1.0}  # exactly the one-hot assignment
        own = (att.sum(0) > 0).nonzero()[:, 1].unique()
        assert own.tolist() == list(range(layer.attention.start, layer.attention.end))
    # at temperature 1 each layer uses its own cells: the kernel is static (same for every example)
    kernels = model.a.assemble(model.a.attention(x))
    torch.testing.assert_close(kernels, kernels[:1].expand_as(kernels))
    condconv.set_temperature(model, 0.5)
    half = model.a.attention(x)
    condconv.set_temperature(model, 0.0)
    zero = model.a.attention(x)
    torch.testing.assert_close(half, 0.5 * zero + 0.5 * model.a.attention.one_hot[:, :-1].to(F64))
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0.0, 1.0\]"):
        condconv.set_temperature(model, 1.5)
    mixed = nn.Sequential(Pair(2), condconv.DynamicConv2d(8, 8, 3, padding=1))
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        condconv.set_temperature(mixed, 0.0)
    assert condconv.set_temperature(mixed, 1.0) == 3
    assert "a.attention.temperature" in model.state_dict()  # a buffer: saved


@pytest.mark.parametrize("strategy", ["grouped", "bmm", "scan"])
def test_gradcheck(strategy):
    torch.manual_seed(2)
    model = _randomise(Pair(2, 2, 2, 3, groups=2, cell_num_ratio=0.5, cell_inplane_ratio=0.5,
                            cell_outplane_ratio=0.5, nonlocal_basis_ratio=0.5, norm="layer").double())
    names = ["warehouse.cells.0", "a.attention.fc1.weight", "b.attention.fc3.weight", "b.bias"]
    params = dict(model.named_parameters())
    x = torch.randn(2, 2, 4, 4, dtype=F64, requires_grad=True)

    def f(x, *tensors):
        values = {**params, **dict(zip(names, tensors))}
        with condconv.use_strategy(strategy):
            return torch.func.functional_call(model, values, (x,))

    inputs = (x, *(params[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 3])
def test_gradcheck_1d_3d(dim):
    torch.manual_seed(3)
    layer = _randomise(LAYERS[dim](2, 4, 3, padding=1, norm="none", cell_num_ratio=2).double())
    x = torch.randn(2, 2, *([4] * dim), dtype=F64, requires_grad=True)
    cells = layer.warehouse.cells[0].detach().clone().requires_grad_(True)
    params = dict(layer.named_parameters())

    def f(x, cells):
        return torch.func.functional_call(layer, {**params, "warehouse.cells.0": cells}, (x,))

    assert torch.autograd.gradcheck(f, (x, cells), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_batch_one_trains_without_batch_norm(norm):
    torch.manual_seed(4)
    model = Pair(2, 4, 8, 3, norm=norm).train()
    out = model(torch.randn(1, 4, 6, 6))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        Pair(2, 4, 8, 3, norm="batch").train()(torch.randn(1, 4, 6, 6))


def test_warehouse_sharing_cells_and_names():
    wh = KernelWarehouse(sharing_range="layer_conv")
    assert wh.warehouse_name("stage2_layer1_conv0") == "stage2_layer_conv"
    assert wh.warehouse_name("stage2_block1_dwconv0") == "stage2_block1_dwconv0"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.wh = wh
            self.c0 = KWConv2d(16, 32, 3, bias=False, warehouse=wh, name="stage1_layer0_conv0")
            self.c1 = KWConv2d(32, 32, 3, bias=False, warehouse=wh, name="stage1_layer1_conv1")
            self.c2 = KWConv2d(32, 48, 1, bias=False, warehouse=wh, name="stage1_layer2_conv5")
            wh.build(self)

    net = Net()
    assert wh.names == ["stage1_layer_conv"]  # one warehouse: conv0/conv1/conv5 all share it
    # gcd of out channels (32, 32, 48) = 16, of in channels (16, 32, 32) = 16; cells (16, 16, 1, 1)
    assert tuple(wh.cells[0].shape[1:]) == (16, 16, 1, 1)
    mixtures = [2 * 1 * 9, 2 * 2 * 9, 3 * 2 * 1]
    assert [layer.attention.num_mixtures for layer in (net.c0, net.c1, net.c2)] == mixtures
    assert wh.cells[0].shape[0] == sum(mixtures)
    assert net.c2.attention.end == sum(mixtures)


def test_cell_num_ratio_per_warehouse_and_errors():
    wh = KernelWarehouse(cell_num_ratio=(1, 2))
    KWConv2d(8, 8, 3, warehouse=wh, name="x")
    KWConv2d(8, 8, 1, warehouse=wh, name="y")
    holder = nn.Module()
    holder.wh = wh
    wh.build()
    assert [c.shape[0] for c in wh.cells] == [9, 2]
    with pytest.raises(ValueError, match="cell_num_ratio must be one value or one per warehouse"):
        bad = KernelWarehouse(cell_num_ratio=(1, 2, 3))
        KWConv2d(8, 8, 3, warehouse=bad, name="x")
        bad.build()
    with pytest.raises(ValueError, match="without spatial_partition needs one kernel size"):
        bad = KernelWarehouse(spatial_partition=False)
        KWConv2d(8, 8, 3, warehouse=bad)
        KWConv2d(8, 8, 1, warehouse=bad)
        bad.build()
    with pytest.raises(ValueError, match="norm must be one of"):
        KWConv2d(4, 4, 3, norm="group")
    with pytest.raises(TypeError, match="options of the shared warehouse"):
        KWConv2d(4, 4, 3, warehouse=KernelWarehouse(), reduction=0.5)
    with pytest.raises(RuntimeError, match="not built yet"):
        KWConv2d(4, 4, 3, warehouse=KernelWarehouse())(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"input must be \(batch, 4"):
        KWConv2d(4, 4, 3)(torch.randn(1, 3, 5, 5))


def test_linear_matches_reference_and_nn_linear_shape():
    torch.manual_seed(5)
    layer = _randomise(KWLinear(12, 10, cell_inplane_ratio=0.25, cell_num_ratio=0.5).double()).eval()
    x = torch.randn(3, 12, dtype=F64)
    att = reference_attention(layer.conv.attention, x[:, :, None])
    cells = layer.conv.warehouse.cells[0]
    expected = reference_kw_conv(x[:, :, None], att, cells, layer.conv.kernel_shape, layer.conv.bias)[:, :, 0]
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    assert layer(torch.randn(3, 5, 12, dtype=F64)).shape == (3, 5, 10)


def test_conv_with_kernels_padding_modes_and_errors():
    torch.manual_seed(6)
    x = torch.randn(3, 4, 6, 7, dtype=F64)
    kernels = torch.randn(3, 6, 2, 3, 3, dtype=F64)
    bias = torch.randn(6, dtype=F64)
    for mode in ("zeros", "reflect", "circular"):
        ref = torch.cat([nn.Conv2d(4, 6, 3, 1, 1, 1, 2, True, mode).double().requires_grad_(False)
                         ._conv_forward(x[b:b + 1], kernels[b], bias) for b in range(3)])
        for strategy in ("grouped", "bmm", "scan"):
            out = conv_with_kernels(x, kernels, bias, 1, 1, 1, 2, mode, strategy)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    x1 = torch.randn(2, 4, 9, dtype=F64)
    k1 = torch.randn(2, 4, 4, 3, dtype=F64)
    out = conv_with_kernels(x1, k1, None, 2, "valid", 1, 1, "zeros")
    torch.testing.assert_close(out, torch.cat([F.conv1d(x1[b:b + 1], k1[b], None, 2) for b in range(2)]))
    with pytest.raises(ValueError, match="must match"):
        conv_with_kernels(x, kernels[:2])
    with pytest.raises(ValueError, match="strategy must be one of"):
        conv_with_kernels(x, kernels, strategy="fast")


def test_reference_kernel_places_cells():
    cells = torch.arange(4 * 2 * 1 * 1 * 1, dtype=F64).reshape(4, 2, 1, 1, 1) + 1
    attention = torch.eye(4, dtype=F64)  # mixture m takes cell m
    kernel = reference_kw_kernel(attention, cells, (2, 2, 2, 1))  # 2 positions x 1 out block x 2 in blocks
    assert kernel[:, 0, 0, 0].tolist() == [1.0, 2.0] and kernel[:, 1, 0, 0].tolist() == [3.0, 4.0]
    assert kernel[:, 0, 1, 0].tolist() == [5.0, 6.0] and kernel[:, 1, 1, 0].tolist() == [7.0, 8.0]


def test_count_macs_counts_the_assembly():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(7)
    model = Pair(2, 4, 8, 3, groups=2, cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5,
                 nonlocal_basis_ratio=0.5).eval()
    report = condconv.count_macs(model, (4, 6, 6))
    mixing = sum(layer.attention.num_mixtures * layer.attention.num_cells * math.prod(layer.cell_shape)
                 for layer in (model.a, model.b))
    assert report.categories["mixing"].macs == mixing
    assert report.categories["conv"].macs == 8 * 36 * 4 * 9 + 8 * 36 * 4 * 9
    assert report.categories["conv"].params == model.warehouse.cells[0].numel() + 16  # cells and the two biases
    assert report.params == sum(p.numel() for p in model.parameters())
    pooling = 4 * 36 + 8 * 36  # the attentions' global average pooling, which the flop counter does not see
    with FlopCounterMode(display=False) as counter, condconv.use_strategy("grouped"):
        model(torch.randn(1, 4, 6, 6))
    assert counter.get_total_flops() // 2 == report.macs - pooling


def _chain() -> nn.Module:
    return nn.Sequential(Pair(2, 4, 8, 3, cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
                         nn.Flatten(2), KWConv1d(8, 4, 3, padding=1, norm="none"), nn.Flatten(1),
                         KWLinear(4 * 36, 5), nn.Unflatten(1, (5, 1, 1, 1)), KWConv3d(5, 2, 1)).eval()


def test_empty_batch():
    model = _chain()
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    out = model(x)
    assert out.shape == (0, 2, 1, 1, 1)
    out.sum().backward()
    assert model[0].warehouse.cells[0].grad is not None


@pytest.mark.slow
def test_torch_export_keeps_the_batch_dynamic():
    torch.manual_seed(8)
    model = _chain()
    x = torch.randn(3, 4, 6, 6)
    batch = torch.export.Dim("batch", min=1, max=16)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    for n in (1, 5):
        xn = torch.randn(n, 4, 6, 6)
        torch.testing.assert_close(exported(xn), model(xn), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(9)
    model = condconv.create_model("kw_mobilenet_v2_050_1d2x", num_classes=10, width_mult=0.25).eval()
    condconv.export_model(model, tmp_path / "kw.onnx", input_size=(3, 32, 32), verify=True,
                          verify_batch_sizes=(1, 3))  # raises when onnxruntime's outputs differ


def test_deepcopy_keeps_each_copy_on_its_own_warehouse():
    import copy

    model = Pair(2, 4, 8, 3).eval()
    clone = copy.deepcopy(model)
    assert clone.a._get_warehouse() is clone.warehouse and clone.b._get_warehouse() is clone.warehouse
    with torch.no_grad():
        clone.warehouse.cells[0].mul_(2.0)
    x = torch.randn(2, 4, 6, 6)
    assert not torch.allclose(clone(x), model(x))
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x), model(x))
