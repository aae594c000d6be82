"""KernelWarehouse presets (Li and Yao, ICML 2024, arXiv:2406.07879): parameters against the official README table,
official checkpoints (written here in the exact layout of the official main.py) loaded by preset name and giving the
official model's outputs, MACs, training."""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import condconv
from condconv.models import create_model, is_model
from condconv.models.kernelwarehouse import KW_BASELINES, KW_PRESETS, kw_preset
from condconv.models.kernelwarehouse_weights import (
    TrainingArgs,
    convert_state_dict,
    detect,
    load_kernelwarehouse_weights,
    preset_name,
    read_checkpoint,
)
from condconv.nn.kernel_warehouse import KWConvNd

F64 = torch.float64


# ---- an independent minimal model of the official code's semantics (its names, layouts and allocation) ----------
class OfficialAttention(nn.Module):
    """Official attention: fc1 (no bias) + norm1 (BatchNorm1d) + ReLU + fc2 [+ fc3 basis, basis_bias]."""

    def __init__(self, cin, reduction, cells, mixtures, ratio, start, basis_ratio, layer_norm=False):
        super().__init__()
        hidden = max(int(cin * reduction), 16)
        self.per, self.mixtures, self.start = cells + 1, mixtures, start
        self.local = int(ratio * mixtures)
        self.fc1 = nn.Linear(cin, hidden, bias=layer_norm)
        self.norm1 = nn.LayerNorm(hidden) if layer_norm else nn.BatchNorm1d(hidden)
        self.basis = None
        if basis_ratio < 1:
            self.basis = max(int((cells - self.local) * basis_ratio), 16)
            self.fc2 = nn.Linear(hidden, (self.local + self.basis + 1) * mixtures, bias=False)
            self.fc3 = nn.Linear(self.basis, cells - self.local, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.per * mixtures))
        else:
            self.fc2 = nn.Linear(hidden, self.per * mixtures)
        self.bias_vector = torch.zeros(self.per * mixtures)
        if ratio >= 1:
            for m in range(mixtures):
                self.bias_vector[m * self.per + start + m * int(ratio)] = 1
            self.end = start + mixtures * int(ratio)
        else:
            n = int(1 / ratio)
            for m in range(mixtures):
                if m % n == (m // n) % n:
                    self.bias_vector[m * self.per + start] = 1
                    start += 1
                else:
                    self.bias_vector[m * self.per + self.per - 1] = 1
            self.end = start

    def forward(self, x, t):
        v = F.relu(self.norm1(self.fc1(x.flatten(2).mean(2))))
        v = self.fc2(v)
        if self.basis is not None:
            v = v.reshape(-1, self.local + self.basis + 1)
            others = self.fc3(v[:, self.local:-1])
            v = torch.cat([others[:, :self.start], v[:, :self.local], others[:, self.start:], v[:, -1:]], 1)
            v = v.reshape(-1, self.per * self.mixtures) + self.basis_bias
        v = v.reshape(-1, self.per)
        v = v / (v.abs().sum(1, keepdim=True) + 1e-3)
        v = (1 - t) * v.reshape(-1, self.per * self.mixtures) + t * self.bias_vector.to(v.dtype)
        return v.reshape(-1, self.per)[:, :-1]


class OfficialConv(nn.Module):
    """Official KW convolution: kernel blocks filled from the warehouse mixture (block loops), grouped conv."""

    def __init__(self, manager, cin, cout, k, stride, pad, groups, bias, wid, dims):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.pad, self.groups, self.wid, self.dims = \
            cin, cout, k, stride, pad, groups, wid, dims
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.manager = [manager]

    def forward(self, x):
        cells = self.manager[0].weights[self.wid]
        att = self.attention(x, self.manager[0].t)
        b = x.shape[0]
        mixed = (att @ cells.reshape(cells.shape[0], -1)).reshape(b, -1, *cells.shape[1:3])
        co, ci = cells.shape[1:3]
        go, gi = self.cout // co, self.cin // self.groups // ci
        kernel = x.new_zeros(b, self.cout, self.cin // self.groups, *([self.k] * self.dims))
        for s in range(self.k**self.dims):  # kernel position s holds mixtures s*go*gi ... (s+1)*go*gi - 1
            pos = (s // self.k, s % self.k) if self.dims == 2 else (s,)
            blocks = mixed[:, s * go * gi:(s + 1) * go * gi].reshape(b, go, gi, co, ci)  # block (o, i)
            kernel[(slice(None), slice(None), slice(None), *pos)] = \
                blocks.transpose(2, 3).reshape(b, self.cout, self.cin // self.groups)
        conv = F.conv2d if self.dims == 2 else F.conv1d
        out = conv(x.reshape(1, -1, *x.shape[2:]), kernel.reshape(-1, *kernel.shape[2:]), None, self.stride,
                   self.pad, 1, self.groups * b)
        out = out.reshape(b, self.cout, *out.shape[2:])
        return out if self.bias is None else out + self.bias.reshape(1, -1, *([1] * self.dims))


class OfficialLinear(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x[:, :, None])[:, :, 0]


class OfficialManager(nn.Module):
    """Official manager semantics: names fused character by character for a string sharing range (as main.py passes
    the configs' "layer_conv"), warehouses in order of first reservation, cells handed out in module order."""

    def __init__(self, reduction, num, cin_ratio, cout_ratio, sharing, basis=1.0, layer_norm=False):
        super().__init__()
        self.opts = (reduction, num, cin_ratio, cout_ratio)
        self.sharing, self.basis, self.names, self.layers, self.t = sharing, basis, {}, [], 0.0
        self.layer_norm = layer_norm

    def reserve(self, cin, cout, k, stride, pad, groups, name, enabled=True, linear=False, bias=False):
        if not enabled:
            return nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
        parts = []
        for part in name.split("_"):
            for prefix in self.sharing:
                part = prefix if part.startswith(prefix) else part
            parts.append(part)
        wid = self.names.setdefault("_".join(parts), len(self.names))
        layer = OfficialConv(self, cin, cout, 1 if linear else k, stride, pad, groups, linear or bias, wid,
                             1 if linear else 2)
        self.layers.append(layer)
        return OfficialLinear(layer) if linear else layer

    def build(self, net):
        def pick(opt, i):
            return opt[i] if isinstance(opt, tuple) else opt

        self.weights = nn.ParameterList()
        self.cells = []
        for wid in range(len(self.names)):
            mine = [m for m in self.layers if m.wid == wid]
            co = max(int(math.gcd(*(m.cout for m in mine)) * pick(self.opts[3], wid)), 1)
            ci = max(int(math.gcd(*(m.cin // m.groups for m in mine)) * pick(self.opts[2], wid)), 1)
            total = sum(m.cout // co * (m.cin // m.groups // ci) * m.k**m.dims for m in mine)
            dims = mine[0].dims
            self.weights.append(nn.Parameter(torch.randn(max(int(total * pick(self.opts[1], wid)), 1), co, ci,
                                                         *([1] * dims))))
        ends = [0] * len(self.names)
        for m in net.modules():
            if isinstance(m, OfficialConv):
                cells = self.weights[m.wid]
                mixtures = m.cout // cells.shape[1] * (m.cin // m.groups // cells.shape[2]) * m.k**m.dims
                m.attention = OfficialAttention(m.cin, pick(self.opts[0], m.wid), len(cells), mixtures,
                                                pick(self.opts[1], m.wid), ends[m.wid], self.basis, self.layer_norm)
                ends[m.wid] = m.attention.end
        assert ends == [len(w) for w in self.weights]


class OfficialBlock(nn.Module):
    def __init__(self, wm, cin, planes, stride, down, stage, layer, handover):
        super().__init__()
        self.conv1 = wm.reserve(cin, planes, 3, stride, 1, 1, f"stage{max(stage - handover, 0)}_layer{layer}_conv0")
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = wm.reserve(planes, planes, 3, 1, 1, 1, f"stage{stage}_layer{0 if handover else layer}_conv1")
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = down

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class OfficialResNet18(nn.Module):
    def __init__(self, reduction, num, cin_ratio, cout_ratio, classes=1000):
        super().__init__()
        self.warehouse_manager = wm = OfficialManager(reduction, num, cin_ratio, cout_ratio, "layer_conv")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, layer = 64, 0
        for stage, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if stage == 0 else 2
            down = None
            if stride != 1:
                name = f"stage{stage - 1}_layer{layer + 1}_conv0"
                down = nn.Sequential(wm.reserve(cin, planes, 1, stride, 0, 1, name), nn.BatchNorm2d(planes))
            blocks = [OfficialBlock(wm, cin, planes, stride, down, stage, layer, True),
                      OfficialBlock(wm, planes, planes, 1, None, stage, 1, False)]
            cin, layer = planes, 2
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512, classes)
        wm.build(self)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def _cbr(wm, cin, cout, k, stride, groups, name, enabled=True):
    return nn.Sequential(wm.reserve(cin, cout, k, stride, (k - 1) // 2, groups, name, enabled), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class OfficialInverted(nn.Module):
    def __init__(self, wm, cin, cout, stride, t, stage, layer, pw):
        super().__init__()
        hidden = int(round(cin * t))
        self.res = stride == 1 and cin == cout
        units = [_cbr(wm, cin, hidden, 1, 1, 1, f"stage{stage}_layer{layer}_pwconv0", pw)] if t != 1 else []
        units += [_cbr(wm, hidden, hidden, 3, stride, hidden, f"stage{stage}_layer{layer}_dwconv0"),
                  wm.reserve(hidden, cout, 1, 1, 0, 1, f"stage{stage}_layer{layer}_pwconv1", pw), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*units)

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class OfficialMobileNetV2(nn.Module):
    def __init__(self, width, budget, classes=1000):
        super().__init__()

        def div(v):
            r = max(8, int(v + 4) // 8 * 8)
            return r + 8 if r < 0.9 * v else r

        half = budget == "1d2x"
        if half:
            wm = OfficialManager(0.03125, (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5), (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
                                 (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1), tuple("layer"))
        else:
            wm = OfficialManager(0.0625, 1 if budget == "1x" else 4, 1, 1,
                                 ["layer", "pwconv"] if budget == "1x" else ["layer"])
        self.warehouse_manager = wm
        stages = (1, 2, 3, 4, 5, 6, 6)
        pws = (False, False, False, False, False, True, True)
        cin = div(32 * width)
        feats = [_cbr(wm, 3, cin, 3, 2, 1, "stage0_conv0")]
        layer = 0
        rows = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
        for idx, (t, c, n, s) in enumerate(rows):
            for i in range(n):
                hand = i == 0 and idx > 0 and stages[idx] != stages[idx - 1]
                stage = stages[idx] - 1 if hand else stages[idx]
                feats.append(OfficialInverted(wm, cin, div(c * width), s if i == 0 else 1, t, stage, layer,
                                              pws[stage - 1] if half else True))
                cin = div(c * width)
                layer = 0 if hand else layer + 1
        feats.append(_cbr(wm, cin, 1280, 1, 1, 1, f"stage6_layer{layer}_pwconv1"))
        self.features = nn.Sequential(*feats)
        if half:
            self.classifier = nn.Sequential(nn.Dropout(0.0),
                                            wm.reserve(1280, classes, 1, 1, 0, 1, "classifier", linear=True))
        else:
            self.classifier = nn.Linear(1280, classes)
        wm.build(self)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class OfficialLN(nn.Module):  # LayerNorm over the channels of (B, C, H, W)
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, 1e-6).permute(0, 3, 1, 2)


class OfficialConvNeXtBlock(nn.Module):
    def __init__(self, wm, dim, stage, layer):
        super().__init__()
        name = f"stage{stage}_layer{layer}_"
        self.dwconv = wm.reserve(dim, dim, 7, 1, 3, dim, name + "dwconv0", bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = wm.reserve(dim, 4 * dim, 1, 1, 0, 1, name + "pwconv1", bias=True)
        self.pwconv2 = wm.reserve(4 * dim, dim, 1, 1, 0, 1, name + "pwconv2", bias=True)
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))


class OfficialKWConvNeXtTiny(nn.Module):
    def __init__(self, classes=1000, dims=(96, 192, 384, 768)):
        super().__init__()
        self.warehouse_manager = wm = OfficialManager(0.0625, 1, 1, 1, "layer_pwconv", layer_norm=True)
        self.downsample_layers = nn.ModuleList([nn.Sequential(wm.reserve(3, dims[0], 4, 4, 0, 1, "stagestem_conv0",
                                                                         bias=True), OfficialLN(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(OfficialLN(dims[i]), wm.reserve(
                dims[i], dims[i + 1], 2, 2, 0, 1, f"stage{i}_layerds_conv0", bias=True)))
        self.stages = nn.ModuleList(nn.Sequential(*[OfficialConvNeXtBlock(wm, dims[i], i, j) for j in range(n)])
                                    for i, n in enumerate((3, 3, 9, 3)))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)
        wm.build(self)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((2, 3))))


RESNET18_RATIOS = {"1d4x": (0.25, 0.5, 0.5), "1d2x": (0.5, 0.5, 0.5), "1x": (1, 1, 1), "2x": (2, 1, 1),
                   "4x": (4, 1, 1)}


def _official(name: str, classes: int = 1000) -> nn.Module:
    if name == "kw_convnext_tiny_1x":
        return OfficialKWConvNeXtTiny(classes)
    budget = name.rsplit("_", 1)[1]
    if name.startswith("kw_resnet18"):
        return OfficialResNet18(0.0625, *RESNET18_RATIOS[budget], classes=classes)
    width = 1.0 if "_100_" in name else 0.5
    return OfficialMobileNetV2(width, budget, classes=classes)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- parameters ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", KW_PRESETS, ids=[p.name for p in KW_PRESETS])
def test_parameters_match_the_official_table(preset):
    with torch.device("meta"):
        model = create_model(preset.name)
    params = _count(model) / 1e6
    gap = params / preset.params - 1
    if preset.note:  # the README figure disagrees with the official code's own count
        assert abs(gap) > 0.005 and "official code builds" in preset.note
    else:
        assert abs(gap) <= 0.005, f"{preset.name}: {params:.3f}M vs README {preset.params}M"
    if preset.name.startswith(("kw_resnet18", "kw_mobilenet", "kw_convnext")):
        with torch.device("meta"):
            official = _official(preset.name)
        assert _count(model) == _count(official)
        assert [tuple(c.shape) for c in model.warehouse.cells] == [tuple(w.shape) for w in
                                                                   official.warehouse_manager.weights]


def test_static_baselines_of_the_table():
    for name, (params, _top1) in KW_BASELINES.items():
        if name == "mobilenet_v2_050":
            model = create_model("mobilenet_v2", width_mult=0.5)
        else:
            model = create_model(name)
        assert abs(_count(model) / 1e6 / params - 1) <= 0.005, name


# ---- official checkpoints -------------------------------------------------------------------------------------------
def _randomised_official(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _official(name, classes=10).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * (0.3 if p.dim() <= 1 else 0.1))
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=F64) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=F64) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def _official_args(name: str, path) -> argparse.Namespace:
    """``args`` as main.py leaves them after reading the preset's config (config values as the JSON has them)."""
    if name.startswith("kw_mobilenet_v2") and name.endswith("1d2x"):
        model, ratio = f"kw1d2x_mobilenetv2_{name.split('_')[3]}", None
    elif name.startswith("kw_mobilenet_v2"):
        model, ratio = f"kw_mobilenetv2_{name.split('_')[3]}", 1 if name.endswith("_1x") else 4
    elif name.startswith("kw_convnext"):
        model, ratio = "kw_convnext_tiny", 1
    else:
        model, ratio = name.rsplit("_", 1)[0], RESNET18_RATIOS[name.rsplit("_", 1)[1]][0]
    return argparse.Namespace(model=model, lr=4e-3, epochs=300, sharing_range="layer_conv", cell_num_ratio=ratio,
                              reduction=None, temp_epoch=20, temp_init_value=1.0, opt_betas=None,
                              output_dir=str(path.parent))


def _save_official(model: nn.Module, path, name: str, ema: bool = False) -> None:
    """As the official utils.save_model writes it: model, optimizer, epoch, scaler, args (a Namespace)."""
    args = _official_args(name, path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32, dtype=F64)).sum().backward()
    optimizer.step()
    with torch.no_grad():  # the file holds float32, as the official runs: the model at exactly those values
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(value.float())
    state = {"model": {k: v.float() for k, v in model.state_dict().items()}, "optimizer": optimizer.state_dict(),
             "epoch": 41, "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}
    if ema:
        state["model_ema"] = {k: v.float().clone() for k, v in model.state_dict().items()}
    torch.save(state, path)


EXACT = ["kw_resnet18_1d4x", pytest.param("kw_resnet18_1x", marks=pytest.mark.slow),
         pytest.param("kw_resnet18_4x", marks=pytest.mark.slow),
         "kw_mobilenet_v2_100_1d2x", "kw_mobilenet_v2_050_1d2x", "kw_mobilenet_v2_050_1x",
         pytest.param("kw_mobilenet_v2_100_1x", marks=pytest.mark.slow), "kw_mobilenet_v2_050_4x",
         pytest.param("kw_convnext_tiny_1x", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", EXACT)
def test_official_checkpoint_gives_the_official_outputs(name, tmp_path):
    official = _randomised_official(name)
    path = tmp_path / "checkpoint-best.pth"
    _save_official(official, path, name)
    state = load_kernelwarehouse_weights(path)
    assert preset_name(read_checkpoint(path)["args"]) == name  # the file says which preset it is
    model = create_model(name, num_classes=10)
    model.load_state_dict(state)  # strict: every key named and shaped as the preset's
    by_name = create_model(name, num_classes=10, pretrained=path)  # the pretrained loader recognises the format
    for key, value in by_name.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    model = model.double().eval()
    assert _count(model) == _count(official)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    for t in (0.0, 0.5):
        official.warehouse_manager.t = t
        condconv.set_temperature(model, t)
        with torch.no_grad():
            expected, out = official(x), model(x)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_checkpoint_reading_is_restricted_and_names_the_file(tmp_path):
    official = _randomised_official("kw_mobilenet_v2_050_1d2x")
    path = tmp_path / "checkpoint-3.pth"
    _save_official(official, path, "kw_mobilenet_v2_050_1d2x", ema=True)
    obj = read_checkpoint(path)
    assert detect(obj) and isinstance(obj["args"], TrainingArgs) and obj["args"].model == "kw1d2x_mobilenetv2_050"
    ema = load_kernelwarehouse_weights(path, key="model_ema")
    assert set(ema) == set(load_kernelwarehouse_weights(path))
    assert "warehouse.cells.0" in ema and "features.0.0.attention.temperature" in ema
    assert not any("norm1" in k or "warehouse_manager" in k for k in ema)
    assert not detect({"model": {"conv1.weight": torch.zeros(1)}, "args": None}) and not detect([1])
    assert preset_name(obj["args"]) == "kw_mobilenet_v2_050_1d2x"
    assert preset_name(argparse.Namespace(model="kw_resnet18", cell_num_ratio=[0.25])) == "kw_resnet18_1d4x"
    assert preset_name(argparse.Namespace(model="kw_resnet50", cell_num_ratio=4)) == "kw_resnet50_4x"
    assert preset_name(argparse.Namespace(model="kw1d2x_mobilenetv2_050")) == "kw_mobilenet_v2_050_1d2x"
    assert preset_name(argparse.Namespace(model="kw_convnext_tiny", cell_num_ratio=1)) == "kw_convnext_tiny_1x"
    assert preset_name(argparse.Namespace(model="kw_resnet18", cell_num_ratio=3)) is None
    assert all(is_model(preset_name(argparse.Namespace(model=m, cell_num_ratio=1))) for m in
               ("kw_resnet18", "kw_resnet50", "kw_mobilenetv2_100", "kw_mobilenetv2_050", "kw_convnext_tiny"))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: not an official KernelWarehouse checkpoint"):
        load_kernelwarehouse_weights(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'model_ema' weights"):
        _save_official(official, tmp_path / "plain.pth", "kw_mobilenet_v2_050_1d2x")
        load_kernelwarehouse_weights(tmp_path / "plain.pth", key="model_ema")
    torch.save({"model": {}, "args": os.system}, tmp_path / "evil.pth")  # only argparse.Namespace is allowed
    with pytest.raises(ValueError, match="evil.pth: not a readable KernelWarehouse checkpoint"):
        load_kernelwarehouse_weights(tmp_path / "evil.pth")
    torch.save({"model": {}, "args": torch.optim.SGD}, tmp_path / "global.pth")
    with pytest.raises(ValueError, match="global.pth: not a readable"):
        read_checkpoint(tmp_path / "global.pth")
    converted = convert_state_dict({"module.warehouse_manager.weights.3": torch.ones(1),
                                    "module.layer1.0.conv1.attention.norm1.weight": torch.ones(1)})
    assert set(converted) == {"warehouse.cells.3", "layer1.0.conv1.attention.norm.weight"}


# ---- the models run, train and count --------------------------------------------------------------------------------
def test_tiny_input_forward_backward_batch_one_layer_norm():
    torch.manual_seed(0)
    model = create_model("kw_resnet18_1d4x", num_classes=10, norm="layer", temperature=1.0)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert condconv.set_temperature(model, 0.3) == sum(isinstance(m, KWConvNd) for m in model.modules())
    assert kw_preset("kw_resnet18_1x").temp_epoch == 20 and kw_preset("kw_mobilenet_v2_100_4x").temp_epoch == 15
    with pytest.raises(ValueError, match="unknown KernelWarehouse preset"):
        kw_preset("kw_resnet18_3x")
    with pytest.raises(ValueError, match="fixes its warehouse options"):
        create_model("kw_mobilenet_v2_100_1d2x", cell_num_ratio=2)


def test_training_config_for_kernelwarehouse_presets():
    from condconv.training.config import TrainConfig, model_args

    config = TrainConfig.from_recipe("kw-resnet")
    assert config.conv == "kernelwarehouse" and config.temperature_end == 0.0
    args = model_args(config, 10, 1)
    assert "conv" not in args and "num_experts" not in args
    model = create_model("kw_resnet18_1d4x", **args)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10


@pytest.mark.slow
def test_train_model_anneals_the_temperature_to_zero(tmp_path):
    from condconv import train_model
    from condconv.models.checkpoint import load_model

    result = train_model(model="kw_mobilenet_v2_050_1d2x", conv="kernelwarehouse", experts=None, width=None,
                         dataset="digits", train_size=64, image_size=32, epochs=2, batch_size=16,
                         temperature_start=1.0, temperature_end=0.0, temperature_epochs=1, out=str(tmp_path / "run"),
                         progress=False, model_kwargs={"norm": "layer"})
    assert [h["temperature"] for h in result.history] == [0.25, 0.0]  # 4 steps an epoch: 1 - 3/4, then 0
    model = load_model(str(tmp_path / "run"))[0]  # the saved weights carry the temperature buffers
    temps = {float(m.attention.temperature) for m in model.modules() if isinstance(m, KWConvNd)}
    assert temps == {0.0}


def test_macs_command_counts_a_preset(capsys):
    from condconv.cli import main

    assert main(["macs", "kw_mobilenet_v2_050_1d2x"]) == 0
    out = capsys.readouterr().out
    assert "kw_mobilenet_v2_050_1d2x" in out and "1.47M" in out


def test_official_checkpoint_into_another_preset_is_refused_in_one_line(tmp_path):
    name = "kw_mobilenet_v2_050_1d2x"
    path = tmp_path / "checkpoint-best.pth"
    _save_official(_randomised_official(name), path, name)
    with pytest.raises(ValueError) as info:
        create_model("kw_mobilenet_v2_050_4x", num_classes=10, pretrained=path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "an official KernelWarehouse checkpoint" in message and "do not fit" in message
