"""KernelWarehouse ResNet-18/50, MobileNetV2 (1.0, 0.5) and ConvNeXt-Tiny by the names of the official configs.

Li and Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024, arXiv:2406.07879; layouts,
warehouse names and budgets as the official code (OSVAI/KernelWarehouse ``models/kw_resnet.py``,
``models/kw_mobilenetv2.py``, ``models/kw1d2x_mobilenetv2.py``, ``configs/*.json``) builds them, module for module,
so that its checkpoints load (:mod:`condconv.models.kernelwarehouse_weights`):

- ResNet: the stem convolution, the classifier and the stride-1 projection shortcut stay static; every other
  convolution is a KernelWarehouse layer. Warehouses per stage and convolution position (``sharing_range`` layer and
  conv); the first block of a stage hands its first convolution (and the projection shortcut) over to the previous
  stage's warehouse.
- MobileNetV2: every convolution is a KernelWarehouse layer (the stem included), warehouses per stage and kind
  (depthwise / pointwise; 4x also separates expansion and projection); the ``1d2x`` layout keeps the pointwise
  convolutions of the first five stages static, makes the classifier a :class:`~condconv.nn.kernel_warehouse.KWLinear`
  and gives each of its ten warehouses its own budget.

Every model holds its :class:`~condconv.nn.kernel_warehouse.KernelWarehouse` as ``warehouse`` (cells
``warehouse.cells.{i}``). Temperatures are built at 0, the end of the official annealing (1 -> 0 over ``temp_epoch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from condconv.models.blocks import DropPath
from condconv.models.kernelwarehouse_convnext import ConvNeXt
from condconv.models.registry import register_model
from condconv.nn.kernel_warehouse import KernelWarehouse, KWConv2d, KWLinear

__all__ = ["KWResNet", "KWMobileNetV2", "KWPreset", "KW_PRESETS", "KW_BASELINES", "kw_preset", "convnext_tiny"]


def _conv(wh: KernelWarehouse, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, *, name: str,
          enabled: bool = True) -> nn.Module:
    """A KernelWarehouse convolution drawing on ``wh`` (or, ``enabled=False``, a static one), no bias."""
    if not enabled:
        return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
    return KWConv2d(cin, cout, k, stride, (k - 1) // 2, 1, groups, False, warehouse=wh, name=name)


class _Residual(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(identity + self.drop_path(self.branch(x)))


class KWBasicBlock(_Residual):
    """Two 3x3 KernelWarehouse convolutions; ``handover``: the first block of a stage (conv1 goes to the previous
    stage's warehouse, conv2 to layer 0 of this stage)."""

    expansion = 1

    def __init__(self, wh, cin, planes, stride, downsample, stage, layer, handover, drop_path):
        super().__init__()
        stage0 = max(stage - 1 if handover else stage, 0)
        self.conv1 = _conv(wh, cin, planes, 3, stride, name=f"stage{stage0}_layer{layer}_conv0")
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        layer = 0 if handover else layer
        self.conv2 = _conv(wh, planes, planes, 3, name=f"stage{stage}_layer{layer}_conv1")
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class KWBottleneck(_Residual):
    """1x1, 3x3 (strided), 1x1 KernelWarehouse convolutions (the very first 1x1 of the network stays static)."""

    expansion = 4

    def __init__(self, wh, cin, planes, stride, downsample, stage, layer, handover, drop_path):
        super().__init__()
        stage0 = stage - 1 if handover else stage
        self.conv1 = _conv(wh, cin, planes, 1, name=f"stage{stage0}_layer{layer}_conv0", enabled=stage0 >= 0)
        self.bn1 = nn.BatchNorm2d(planes)
        layer = 0 if handover else layer
        self.conv2 = _conv(wh, planes, planes, 3, stride, name=f"stage{stage}_layer{layer}_conv1")
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(wh, planes, planes * 4, 1, name=f"stage{stage}_layer{layer}_conv2")
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class KWResNet(nn.Module):
    """ResNet with KernelWarehouse convolutions (official layout; see the module docstring).

    Args:
        block: :class:`KWBasicBlock` or :class:`KWBottleneck`. layers: blocks per stage.
        num_classes: Default 1000. in_chans: input channels. Default 3.
        width_mult: multiplier of every stage's width (not in the official code; for small experiments). Default 1.0.
        dropout: before the classifier. Default 0.0 (the official main.py's).
        drop_path_rate: stochastic depth of every block (the same rate for all, as the official code). Default 0.0.
        **warehouse: :class:`~condconv.nn.kernel_warehouse.KernelWarehouse` options (``sharing_range`` defaults to
            ``('layer', 'conv')``).
    """

    def __init__(self, block: type, layers: tuple[int, ...], *, num_classes: int = 1000, in_chans: int = 3,
                 width_mult: float = 1.0, dropout: float = 0.0, drop_path_rate: float = 0.0, **warehouse) -> None:
        super().__init__()
        warehouse.setdefault("sharing_range", ("layer", "conv"))
        self.warehouse = KernelWarehouse(**warehouse)
        widths = [max(int(round(64 * 2**i * width_mult)), 1) for i in range(len(layers))]
        self.inplanes, self._layer = widths[0], 0
        self.conv1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, n in enumerate(layers):
            stage = self._make_stage(block, widths[i], n, 1 if i == 0 else 2, i, drop_path_rate)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.warehouse.build(self)

    def _make_stage(self, block, planes, blocks, stride, stage, drop_path) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            conv = _conv(self.warehouse, self.inplanes, planes * block.expansion, 1, stride,
                         name=f"stage{stage - 1}_layer{self._layer + 1}_conv0", enabled=stride != 1)
            downsample = nn.Sequential(conv, nn.BatchNorm2d(planes * block.expansion))
        units = [block(self.warehouse, self.inplanes, planes, stride, downsample, stage, self._layer, True, drop_path)]
        self._layer = 1
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            units.append(block(self.warehouse, self.inplanes, planes, 1, None, stage, self._layer, False, drop_path))
            self._layer += 1
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def _divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never more than 10% down (the MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _ConvBNReLU(nn.Sequential):
    def __init__(self, wh, cin, cout, k=3, stride=1, groups=1, *, name, enabled=True):
        super().__init__(_conv(wh, cin, cout, k, stride, groups, name=name, enabled=enabled), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))


class KWInvertedResidual(nn.Module):
    """MobileNetV2 block with KernelWarehouse convolutions (``pointwise=False``: static 1x1 convolutions)."""

    def __init__(self, wh, cin, cout, stride, expand, stage, layer, pointwise=True):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        units: list[nn.Module] = []
        if expand != 1:
            units.append(_ConvBNReLU(wh, cin, hidden, 1, name=f"stage{stage}_layer{layer}_pwconv0", enabled=pointwise))
        units += [_ConvBNReLU(wh, hidden, hidden, 3, stride, hidden, name=f"stage{stage}_layer{layer}_dwconv0"),
                  _conv(wh, hidden, cout, 1, name=f"stage{stage}_layer{layer}_pwconv1", enabled=pointwise),
                  nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


_MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))
_MBV2_STAGES = (1, 2, 3, 4, 5, 6, 6)  # warehouse stage of each row of the setting
#: The official 1/2x MobileNetV2 layout: reduction, per-warehouse budgets (its ten warehouses), static pointwise stages
HALF_LAYOUT = {"reduction": 0.03125, "cell_num_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5),
               "cell_inplane_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
               "cell_outplane_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1), "sharing_range": ("layer",)}
_HALF_POINTWISE = (False, False, False, False, False, True, True)


class KWMobileNetV2(nn.Module):
    """MobileNetV2 with KernelWarehouse convolutions (official layouts; see the module docstring).

    Args:
        width_mult: Default 1.0. num_classes: Default 1000. in_chans: input channels. Default 3.
        dropout: before the classifier. Default 0.0.
        half_layout: the official ``kw1d2x_mobilenetv2`` layout (its budgets are fixed; warehouse options other than
            ``norm`` and ``temperature`` are then refused). Default False.
        **warehouse: :class:`~condconv.nn.kernel_warehouse.KernelWarehouse` options.
    """

    def __init__(self, *, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.0,
                 half_layout: bool = False, **warehouse) -> None:
        super().__init__()
        if half_layout:
            fixed = set(warehouse) - {"norm", "temperature"}
            if fixed:
                raise ValueError(f"the 1/2x layout fixes its warehouse options; got {sorted(fixed)}")
            warehouse.update(HALF_LAYOUT)
        self.warehouse = wh = KernelWarehouse(**warehouse)
        cin = _divisible(32 * width_mult)
        self.last_channel = _divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_ConvBNReLU(wh, in_chans, cin, 3, 2, name="stage0_conv0")]
        layer = 0
        for row, (t, c, n, s) in enumerate(_MBV2_SETTING):
            cout = _divisible(c * width_mult)
            for i in range(n):
                handover = i == 0 and row > 0 and _MBV2_STAGES[row] != _MBV2_STAGES[row - 1]
                stage = _MBV2_STAGES[row] - 1 if handover else _MBV2_STAGES[row]
                pointwise = _HALF_POINTWISE[stage - 1] if half_layout else True
                features.append(KWInvertedResidual(wh, cin, cout, s if i == 0 else 1, t, stage, layer, pointwise))
                cin, layer = cout, (0 if handover else layer + 1)
        last = f"stage{_MBV2_STAGES[-1]}_layer{layer}_pwconv1"
        features.append(_ConvBNReLU(wh, cin, self.last_channel, 1, name=last))
        self.features = nn.Sequential(*features)
        if half_layout:
            self.classifier = nn.Sequential(nn.Dropout(dropout), KWLinear(self.last_channel, num_classes,
                                                                          warehouse=wh, name="classifier"))
        else:
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.classifier = nn.Linear(self.last_channel, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        wh.build(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x).mean((2, 3))
        if isinstance(self.classifier, nn.Sequential):
            return self.classifier(x)
        return self.classifier(self.dropout(x))


@dataclass(frozen=True)
class KWPreset:
    """One official KernelWarehouse model: its builder arguments and the official README's figures.

    Attributes:
        name: registered name. config: the official config file. params: README parameters (millions).
        top1: README ImageNet top-1 (%). kwargs: builder arguments (from the config and main.py).
        temp_epoch: epochs of the 1 -> 0 temperature annealing (config, else main.py's 20).
        note: why the README's parameter figure differs from the official code's count, where it does by over 0.5%.
    """

    name: str
    config: str
    params: float
    top1: float
    kwargs: dict = field(default_factory=dict)
    temp_epoch: int = 20
    note: str = ""


def _resnet18(budget, params, top1, ratios, drop_path, note=""):
    num, cin, cout = ratios
    return KWPreset(f"kw_resnet18_{budget}", f"configs/resnet18/kw{budget}_resnet18.json", params, top1,
                    {"arch": "resnet18", "cell_num_ratio": num, "cell_inplane_ratio": cin, "cell_outplane_ratio": cout,
                     "drop_path_rate": drop_path}, note=note)


def _resnet50(budget, params, top1, ratios, extra=None):
    num, cin, cout = ratios
    return KWPreset(f"kw_resnet50_{budget}", f"configs/resnet50/kw{budget}_resnet50.json", params, top1,
                    {"arch": "resnet50", "cell_num_ratio": num, "cell_inplane_ratio": cin, "cell_outplane_ratio": cout,
                     "drop_path_rate": 0.1, **(extra or {})})


def _mobilenet(width, budget, params, top1):
    folder = f"mobilenetv2_{width}"
    kwargs: dict = {"arch": "mobilenet_v2", "width_mult": int(width) / 100}
    if budget == "1d2x":
        kwargs["half_layout"] = True
    else:
        kwargs.update(cell_num_ratio=1 if budget == "1x" else 4,
                      sharing_range=("layer", "pwconv") if budget == "1x" else ("layer",))
    return KWPreset(f"kw_mobilenet_v2_{width}_{budget}", f"configs/{folder}/kw{budget}_{folder}.json", params, top1,
                    kwargs, temp_epoch=15)


#: The official models (README table: parameters in millions, ImageNet top-1).
KW_PRESETS: tuple[KWPreset, ...] = (
    _resnet18("1d4x", 4.08, 72.73, (0.25, 0.5, 0.5), 0.0,
              "the official code builds configs/resnet18/kw1d4x_resnet18.json with 4,031,768 parameters (4.03M, as "
              "this preset); the README's 4.08M is 1.2% more and fits no setting of that config"),
    _resnet18("1d2x", 7.43, 73.33, (0.5, 0.5, 0.5), 0.0),
    _resnet18("1x", 11.93, 74.77, (1, 1, 1), 0.1),
    _resnet18("2x", 23.24, 75.19, (2, 1, 1), 0.1),
    _resnet18("4x", 45.86, 76.05, (4, 1, 1), 0.1),
    _resnet50("1d2x", 17.64, 79.30, (0.5, 0.5, 0.5), {"nonlocal_basis_ratio": 0.0625}),
    _resnet50("1x", 28.05, 80.38, (1, 1, 1)),
    _resnet50("4x", 102.02, 81.05, (4, 1, 1)),
    _mobilenet("100", "1d2x", 2.65, 72.59),
    _mobilenet("100", "1x", 5.17, 74.68),
    _mobilenet("100", "4x", 11.38, 75.92),
    _mobilenet("050", "1d2x", 1.47, 65.20),
    _mobilenet("050", "1x", 2.85, 68.29),
    _mobilenet("050", "4x", 4.65, 70.26),
    KWPreset("kw_convnext_tiny_1x", "configs/convnext/kw1x_convnext_tiny.json", 39.37, 82.51,
             {"arch": "convnext_tiny", "drop_path_rate": 0.3}),
)
#: The official static baselines (README: parameters in millions, top-1), by the zoo's model names.
KW_BASELINES = {"resnet18": (11.69, 70.44), "resnet50": (25.56, 78.44), "mobilenet_v2": (3.50, 72.04),
                "mobilenet_v2_050": (1.97, 64.32), "convnext_tiny": (28.59, 82.07)}


def kw_preset(name: str) -> KWPreset:
    """The :class:`KWPreset` named ``name``."""
    for preset in KW_PRESETS:
        if preset.name == name:
            return preset
    raise ValueError(f"unknown KernelWarehouse preset {name!r}; known: {[p.name for p in KW_PRESETS]}")


def _build(preset: KWPreset, **overrides) -> nn.Module:
    kwargs = {k: v for k, v in preset.kwargs.items() if k != "arch"}
    kwargs.update(overrides)
    arch = preset.kwargs["arch"]
    if arch == "resnet18":
        return KWResNet(KWBasicBlock, (2, 2, 2, 2), **kwargs)
    if arch == "resnet50":
        return KWResNet(KWBottleneck, (3, 4, 6, 3), **kwargs)
    if arch == "convnext_tiny":
        return ConvNeXt(kernelwarehouse=True, **kwargs)
    return KWMobileNetV2(**kwargs)


def _register(preset: KWPreset) -> None:
    def builder(**kwargs) -> nn.Module:
        return _build(preset, **kwargs)

    builder.__name__ = builder.__qualname__ = preset.name
    builder.__doc__ = (f"KernelWarehouse {preset.name} (official {preset.config}: {preset.params}M parameters, "
                       f"{preset.top1}% top-1). Keyword arguments override the preset's (num_classes, dropout, "
                       "norm, temperature, warehouse options).")
    register_model(builder)


for _preset in KW_PRESETS:
    _register(_preset)


@register_model
def convnext_tiny(**kwargs) -> nn.Module:
    """ConvNeXt-Tiny (static) in the layout of the official KernelWarehouse code's baseline (28.59M parameters,
    82.07% top-1 in its README; configs/convnext/convnext_tiny.json: drop_path 0.1). Keyword arguments: see
    :class:`~condconv.models.kernelwarehouse_convnext.ConvNeXt`."""
    kwargs.setdefault("drop_path_rate", 0.1)
    return ConvNeXt(**kwargs)
