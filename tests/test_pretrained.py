"""Trained weights of other codes by name: the official ODConv checkpoints (OSVAI/ODConv, ICLR 2022, arXiv:2209.07947)
load into the presets and give the official model's outputs; bad files are refused in one line.

The official code is not a package: this file holds a minimal model written from its semantics (``modules/odconv.py``,
``models/od_resnet.py``, ``models/od_mobilenetv2.py``, ``models/resnet.py``, ``models/mobilenetv2.py``): the same
module names, parameter shapes and buffers, the attention with a BatchNorm trunk, absent heads as constants, the
temperature a plain attribute; each example's kernel aggregated in a loop. Its ``state_dict`` is saved as the official
``main.py`` saves it: ``{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}`` from a DataParallel model.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import condconv
from condconv.models import create_model
from condconv.models.pretrained import load_pretrained, read_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# the official models, minimal
# ----------------------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, groups: int, experts: int):
        super().__init__()
        hidden = max(int(cin * 0.0625), 16)
        self.k, self.temperature = k, 1.0
        self.fc = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.channel_fc = nn.Conv2d(hidden, cin, 1)
        if not (cin == groups and cin == cout):
            self.filter_fc = nn.Conv2d(hidden, cout, 1)
        if k > 1:
            self.spatial_fc = nn.Conv2d(hidden, k * k, 1)
        if experts > 1:
            self.kernel_fc = nn.Conv2d(hidden, experts, 1)

    def forward(self, x):
        h = F.relu(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(h) / t)
        filt = torch.sigmoid(self.filter_fc(h) / t) if hasattr(self, "filter_fc") else None
        spatial = torch.sigmoid(self.spatial_fc(h) / t) if hasattr(self, "spatial_fc") else None
        kernel = torch.softmax(self.kernel_fc(h) / t, dim=1) if hasattr(self, "kernel_fc") else None
        return channel, filt, spatial, kernel


class _ODConv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, experts=1):
        super().__init__()
        self.stride, self.padding, self.groups = stride, (k - 1) // 2, groups
        self.attention = _Attention(cin, cout, k, groups, experts)
        self.weight = nn.Parameter(torch.randn(experts, cout, cin // groups, k, k) * math.sqrt(2 / (cout * k * k)))

    def forward(self, x):
        channel, filt, spatial, kernel = self.attention(x)
        outs = []
        for b in range(x.shape[0]):  # one example at a time: its own aggregated kernel
            w = self.weight
            if spatial is not None:
                w = w * spatial[b].reshape(1, 1, 1, *w.shape[-2:])
            w = (w * kernel[b].reshape(-1, 1, 1, 1, 1)).sum(0) if kernel is not None else w[0]
            y = F.conv2d(x[b:b + 1] * channel[b:b + 1], w, None, self.stride, self.padding, 1, self.groups)
            outs.append(y * filt[b:b + 1] if filt is not None else y)
        return torch.cat(outs)


def _conv(cin, cout, k, stride=1, groups=1, experts=None):
    """An official ODConv layer (``experts`` kernels) or, for the static baselines (None), a plain convolution."""
    if experts is None:
        return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
    return _ODConv(cin, cout, k, stride, groups, experts)


class _Block(nn.Module):
    def __init__(self, cin, planes, stride, bottleneck, experts):
        super().__init__()
        cout = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1, self.bn1 = _conv(cin, planes, 1, experts=experts), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = _conv(planes, planes, 3, stride, experts=experts), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = _conv(planes, cout, 1, experts=experts), nn.BatchNorm2d(cout)
        else:
            self.conv1, self.bn1 = _conv(cin, planes, 3, stride, experts=experts), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = _conv(planes, planes, 3, experts=experts), nn.BatchNorm2d(planes)
        self.units = 3 if bottleneck else 2
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = x
        for i in range(1, self.units + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            out = F.relu(out) if i < self.units else out
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class OfficialResNet(nn.Module):
    def __init__(self, repeats, bottleneck, experts=None, classes=1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for i, n in enumerate(repeats):
            planes = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(_Block(cin, planes, 2 if j == 0 and i > 0 else 1, bottleneck, experts))
                cin = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _divisible(v, d=8):
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def _unit(cin, cout, k, stride=1, groups=1, experts=None):
    return nn.Sequential(_conv(cin, cout, k, stride, groups, experts), nn.BatchNorm2d(cout), nn.ReLU6())


class _Inverted(nn.Module):
    def __init__(self, cin, cout, stride, t, experts):
        super().__init__()
        hidden = int(round(cin * t))
        layers = [_unit(cin, hidden, 1, experts=experts)] if t != 1 else []
        layers += [_unit(hidden, hidden, 3, stride, hidden, experts), _conv(hidden, cout, 1, experts=experts),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class OfficialMobileNetV2(nn.Module):
    def __init__(self, width, experts=None, classes=1000):
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        features = [_unit(3, cin, 3, 2)]
        for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                           (6, 320, 1, 1)]:
            for i in range(n):
                features.append(_Inverted(cin, _divisible(c * width), s if i == 0 else 1, t, experts))
                cin = _divisible(c * width)
        features.append(_unit(cin, last, 1, experts=experts))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (attention trunks included), scaled to keep activations moderate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel() if p.dim() != 5 else p[0, 0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(1.0 / fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("bn.weight") else 0.0))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(1234)
    return model


def save_official(model: nn.Module, path) -> None:
    """As OSVAI/ODConv ``main.py`` saves: a DataParallel model's state_dict (``module.`` keys) and the run's state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = torch.tensor(74.19)
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "acc": acc, "best_acc": acc, "optimizer": optimizer.state_dict()}, path)


OFFICIAL = {  # preset -> the official model with the same architecture
    "odconv_resnet18_1x": lambda: OfficialResNet((2, 2, 2, 2), False, 1),
    "odconv_resnet18_4x": lambda: OfficialResNet((2, 2, 2, 2), False, 4),
    "odconv_resnet50_1x": lambda: OfficialResNet((3, 4, 6, 3), True, 1),
    "odconv_resnet50_4x": lambda: OfficialResNet((3, 4, 6, 3), True, 4),
    "odconv_resnet101_1x": lambda: OfficialResNet((3, 4, 23, 3), True, 1),
    "odconv_resnet101_2x": lambda: OfficialResNet((3, 4, 23, 3), True, 2),
    **{f"odconv_mobilenet_v2_{w}_{e}x": (lambda w=w, e=e: OfficialMobileNetV2(int(w) / 100, e))
       for w in ("100", "075", "050") for e in (1, 4)},
}
BASELINES = {  # the official static baselines -> condconv model and arguments
    "resnet18": (lambda: OfficialResNet((2, 2, 2, 2), False), "resnet18", {}),
    "resnet50": (lambda: OfficialResNet((3, 4, 6, 3), True), "resnet50", {}),
    "resnet101": (lambda: OfficialResNet((3, 4, 23, 3), True), "resnet101", {}),
    **{f"mobilenetv2_{w}": (lambda w=w: OfficialMobileNetV2(int(w) / 100), "mobilenet_v2",
                            {"width_mult": int(w) / 100}) for w in ("100", "075", "050")},
}
_SLOW = ("resnet50", "resnet101")


def _marks(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if any(s in name for s in _SLOW) else name


def _same_outputs(official: nn.Module, ours: nn.Module, size: int = 64) -> None:
    """The same outputs in float32 (relative 1e-4) and float64 (relative 1e-6), eval mode."""
    official, ours = official.eval(), ours.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want32, got32 = official(x.float()), ours(x.float())
        want, got = official.double()(x), ours.double()(x)
    scale = float(want.abs().max())
    assert scale > 1e-3  # outputs that mean something
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(got32, want32, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", [_marks(n) for n in OFFICIAL])
def test_official_odconv_checkpoint_loads_by_name_and_gives_the_official_outputs(name, tmp_path):
    official = _randomise(OFFICIAL[name]())
    path = tmp_path / "model_best.pth.tar"
    save_official(official, path)
    ours = create_model(name, pretrained=path)
    _same_outputs(official, ours)


@pytest.mark.parametrize("name", [_marks(n) for n in BASELINES])
def test_official_static_baselines_load_into_the_library_models(name, tmp_path):
    build, model, kwargs = BASELINES[name]
    official = _randomise(build())
    path = tmp_path / "checkpoint.pth.tar"
    save_official(official, path)
    _same_outputs(official, condconv.load_pretrained(create_model(model, **kwargs), path))


def test_a_file_that_does_not_fit_is_refused_in_one_line_and_nothing_is_loaded(tmp_path):
    path = tmp_path / "od_resnet18_4x.pth.tar"
    save_official(_randomise(OfficialResNet((2, 2, 2, 2), False, 4, classes=10)), path)
    model = create_model("odconv_resnet18_1x", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_pretrained(model, path, name="odconv_resnet18_1x")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "odconv_resnet18_1x" in message
    assert "official ODConv training checkpoint" in message and "od_resnet18 with kernel_num=4 (10 classes)" in message
    assert "unexpected [layer1.0.conv1.attention.spatial_fc.weight" not in message  # 1x has a spatial head too
    assert "unexpected [layer1.0.conv1.attention.kernel_fc.weight" in message
    assert "mis-shaped [layer1.0.conv1.weight (4, 64, 64, 3, 3) -> blocks.1.conv1.conv.weight (1, 64, 64, 3, 3)" \
        in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    with pytest.raises(ValueError, match=r"resnet18 \(10 classes\)\) do not fit mobilenet_v2: "
                                         r"missing \[blocks.0.depthwise"):
        path = tmp_path / "resnet18.pth.tar"
        save_official(_randomise(OfficialResNet((2, 2, 2, 2), False, classes=10)), path)
        create_model("mobilenet_v2", num_classes=10, pretrained=path)


def test_classes_or_width_that_differ_are_mis_shaped(tmp_path):
    path = tmp_path / "mbv2.pth.tar"
    save_official(_randomise(OfficialMobileNetV2(0.5, 4, classes=10)), path)
    with pytest.raises(ValueError, match=r"od_mobilenetv2_050 with kernel_num=4\) do not fit odconv_mobilenet_v2_050_4x"
                                         r": mis-shaped \[classifier.1.weight \(10, 1280\) -> head.fc.weight"):
        create_model("odconv_mobilenet_v2_050_4x", pretrained=path)
    with pytest.raises(ValueError, match=r"mis-shaped \[features.0.0.weight \(16, 3, 3, 3\) -> stem.conv.weight"):
        create_model("odconv_mobilenet_v2_100_4x", num_classes=10, pretrained=path)
    create_model("odconv_mobilenet_v2_050_4x", num_classes=10, pretrained=path)  # the right one loads


def test_unknown_formats_and_unsafe_pickles_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "notes.pth"
    torch.save({"epoch": 3, "weights": [1, 2]}, path)
    with pytest.raises(ValueError, match=rf"pretrained weights {path}: unknown format \(a dict with keys "):
        create_model("resnet18", pretrained=path)
    unsafe = tmp_path / "unsafe.pth"
    with open(unsafe, "wb") as f:
        pickle.dump({"state_dict": _Attention(16, 16, 3, 1, 2)}, f)
    with pytest.raises(ValueError, match=rf"(refusing to load|corrupt or unreadable) weights file {unsafe}"):
        read_pretrained(unsafe)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        create_model("resnet18", pretrained=tmp_path / "nothing.pth")
    stray = tmp_path / "stray.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, stray)
    with pytest.raises(ValueError, match=r"with names of no known network \(first keys \['encoder.weight'\]\)"):
        create_model("resnet18", pretrained=stray)


def test_condconv_files_and_run_folders_load_back(tmp_path):
    from condconv.models.checkpoint import save_weights

    model = create_model("odconv_resnet18_4x", num_classes=10, width_mult=0.25).eval()
    save_weights(model, tmp_path / "model.safetensors", {"model": "odconv_resnet18_4x",
                                                          "model_args": {"num_classes": 10, "width_mult": 0.25}})
    for source in (tmp_path / "model.safetensors", tmp_path):
        again = create_model("odconv_resnet18_4x", num_classes=10, width_mult=0.25, pretrained=source)
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert read_pretrained(tmp_path).format.name == "condconv"


def test_features_only_backbone_takes_the_same_file(tmp_path):
    official = _randomise(OfficialResNet((2, 2, 2, 2), False, 4))
    path = tmp_path / "od_resnet18.pth.tar"
    save_official(official, path)
    backbone = create_model("odconv_resnet18_4x", features_only=True, pretrained=path).double().eval()
    official = official.double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        features = backbone(x)
        want = F.max_pool2d(F.relu(official.bn1(official.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            want = getattr(official, f"layer{i}")(want)
            torch.testing.assert_close(features[i], want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("size", [9, 10])
def test_tf_same_padding_is_tensorflows(size):
    """TensorFlow 'SAME': output ceil(n / s); the padding's extra row/column goes after (bottom/right)."""
    from condconv.models.blocks import ConvBnAct, ConvSpec

    torch.manual_seed(0)
    unit = ConvBnAct(3, 4, 5, 2, spec=ConvSpec(padding="tf_same"), act_layer=None).eval()
    x = torch.randn(1, 3, size, size)
    total = max((math.ceil(size / 2) - 1) * 2 + 5 - size, 0)
    want = unit.bn(F.conv2d(F.pad(x, (total // 2, total - total // 2) * 2), unit.conv.weight, stride=2))
    out = unit(x)
    assert out.shape[-1] == math.ceil(size / 2)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="padding='tf_same' pads a strided layer's input at run time"):
        ConvBnAct(3, 4, 3, 2, spec=ConvSpec("odconv", padding="tf_same"))
    with pytest.raises(ValueError, match="padding must be one of"):
        create_model("efficientnet_b0", padding="same")


def test_timm_names_are_aliases():
    assert condconv.models.is_model("tf_efficientnet_cc_b0_8e") and "tf_efficientnet_cc_b0_8e" not in \
        condconv.list_models()
    model = create_model("tf_efficientnet_cc_b1_8e", num_classes=10)
    assert sum(1 for _ in model.blocks) == 23 and model.stem.pad is not None
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _image_folder(root, classes=3, per_class=2, seed=0):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for c in range(classes):
        (root / f"n0{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = int(torch.randint(180, 300, (), generator=gen)), int(torch.randint(180, 300, (), generator=gen))
            pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"n0{c}" / f"img{i}.png")
    return root


def test_eval_command_runs_a_published_file_with_its_sources_preprocessing(tmp_path):
    from PIL import Image

    from condconv.cli import main
    from condconv.data.preprocess import eval_transform
    from condconv.models.pretrained import eval_config

    official = _randomise(OfficialMobileNetV2(0.5, 1, classes=3)).eval()
    path = tmp_path / "od_mobilenetv2_050_1x.pth.tar"
    save_official(official, path)
    val = _image_folder(tmp_path / "val")
    out = tmp_path / "result.json"
    assert main(["eval", "--model", "odconv_mobilenet_v2_050_1x", "--pretrained", str(path), "--data", "imagefolder",
                 "--data-dir", str(val), "--model-kwargs", "num_classes=3", "--json", str(out), "--no-progress",
                 "--workers", "0"]) == 0
    import json

    res = json.loads(out.read_text())
    cfg = eval_config("odconv_mobilenet_v2_050_1x")
    assert res["preprocess"]["interpolation"] == "bilinear" and res["images"] == 6
    images = sorted(val.glob("*/*.png"))
    x = torch.stack([eval_transform(Image.open(p), image_size=cfg.image_size, crop_pct=cfg.crop_pct,
                                    interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std) for p in images])
    labels = torch.tensor([int(p.parent.name[2:]) for p in images])
    with torch.no_grad():
        top1 = (official(x).argmax(1) == labels).double().mean().item() * 100
    assert res["top1"] == pytest.approx(top1)
    assert main(["eval", "--model", "odconv_mobilenet_v2_050_1x", "--data-dir", str(val)]) != 0


def test_backbone_out_indices_levels_and_norm_eval():
    model = create_model("odconv_mobilenet_v2_050_4x", features_only=True, out_indices=(2, 4), norm_eval=True,
                         width_mult=0.25)
    assert [(f.reduction, f.channels) for f in model.feature_info] == [(8, 8), (32, 80)]
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(isinstance(m, nn.BatchNorm1d) for m in norms) and not any(m.training for m in norms)
    assert model.training and all(m.training for m in model.modules() if isinstance(m, condconv.ODConv2d))
    x = torch.randn(1, 3, 64, 64)  # batch 1 trains: the routers' BatchNorm uses its running statistics
    feats = model(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 8, 8), (80, 2, 2)]
    feats[-1].sum().backward()
    levels = model.levels()
    assert [n for n, _ in levels.named_children()] == [f"level{i}" for i in range(1, 6)]
    levels.train()
    assert not any(m.training for m in levels.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    model.eval()
    with torch.no_grad():
        outs, y = [], x
        for level in levels:
            y = level(y)
            outs.append(y)
        torch.testing.assert_close(outs[2], model(x)[0])
        torch.testing.assert_close(outs[4], model(x)[1])
    with pytest.raises(ValueError, match="out_indices must be increasing level indices in 0-4"):
        create_model("resnet18", features_only=True, out_indices=(3, 1))
    with pytest.raises(ValueError, match="needs features_only=True"):
        create_model("resnet18", out_indices=(1,))


def _imported(tmp_path, capsys):
    from condconv.cli import main

    official = _randomise(OfficialMobileNetV2(0.5, 4, classes=3)).eval()
    path = tmp_path / "od_mobilenetv2_050_4x.pth.tar"
    save_official(official, path)
    run = tmp_path / "runs" / "odconv_mobilenet_v2_050_4x"
    assert main(["import", "odconv_mobilenet_v2_050_4x", str(path), "--model-kwargs", "num_classes=3",
                 "--out", str(run)]) == 0
    assert "od_mobilenetv2_050 with kernel_num=4" in capsys.readouterr().out
    return official, path, run


def test_import_makes_a_run_folder_evaluated_as_the_source_does(tmp_path, capsys):
    import json

    from condconv.cli import main
    from condconv.models.checkpoint import load_checkpoint

    official, path, run = _imported(tmp_path, capsys)
    model, config = load_checkpoint(run)
    assert config["preprocess"]["crop_pct"] == 0.875 and config["imported_from"]["format"] == "odconv"
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.double()(x), official.double()(x), rtol=1e-6, atol=1e-9)
    val = _image_folder(tmp_path / "val")
    results = []
    for argv in (["eval", str(run)], ["eval", "--model", "odconv_mobilenet_v2_050_4x", "--pretrained", str(path),
                                      "--model-kwargs", "num_classes=3"]):
        assert main([*argv, "--data-dir", str(val), "--no-progress", "--workers", "0", "--json", "-"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    first, second = results  # the run folder is evaluated with the source's preprocessing too
    assert first["images"] == 6 and first["top1"] == second["top1"]
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)
    assert main(["import", "odconv_mobilenet_v2_050_1x", str(path), "--model-kwargs", "num_classes=3",
                 "--out", str(tmp_path / "wrong")]) == 2
    assert not (tmp_path / "wrong").exists()


@pytest.mark.slow
def test_an_imported_run_folder_goes_to_routing_export_and_fine_tuning(tmp_path, capsys):
    from condconv.cli import main
    from condconv.models.checkpoint import load_checkpoint

    _, _, run = _imported(tmp_path, capsys)
    model, _ = load_checkpoint(run)
    data = tmp_path / "data"
    _image_folder(data / "train", seed=1), _image_folder(data / "val", seed=2)
    assert main(["routing", str(run), "--data-dir", str(data), "--out", str(tmp_path / "routing"), "--no-progress",
                 "--workers", "0"]) == 0
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--verify"]) == 0
    tuned = tmp_path / "tuned"
    assert main(["train", "--init", str(run), "--dataset", "imagefolder", "--data-dir", str(data), "--image-size",
                 "64", "--epochs", "1", "--batch-size", "2", "--eval-every", "0", "--no-progress", "--workers", "0",
                 "--out", str(tuned)]) == 0
    tuned_model, _ = load_checkpoint(tuned)
    assert not torch.equal(tuned_model.state_dict()["head.fc.weight"], model.state_dict()["head.fc.weight"])


def test_training_checkpoints_wrapping_a_state_dict_and_the_weights_option_of_export_and_convert(tmp_path):
    from condconv.models.checkpoint import load_model

    model = create_model("resnet18_cifar", num_classes=10, width_mult=0.25)
    path = tmp_path / "last.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    assert read_pretrained(path).format.name == "wrapped"
    loaded, _ = load_model("resnet18_cifar", {"num_classes": 10, "width_mult": 0.25}, path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    official = tmp_path / "od.pth.tar"  # convert / export --weights take the sources' files too
    save_official(_randomise(OfficialResNet((2, 2, 2, 2), False, 4, classes=10)), official)
    loaded, _ = load_model("odconv_resnet18_4x", {"num_classes": 10}, official)
    with pytest.raises(ValueError, match="do not fit resnet18_cifar"):
        load_model("resnet18_cifar", {"num_classes": 10}, official)
