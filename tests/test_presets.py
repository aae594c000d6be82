"""The papers' models by name: presets build and run, their cost tables against the papers', official initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condconv import CondConv2d, DynamicConv2d, ODConv2d, SigmoidRouter
from condconv.models import create_model, list_models
from condconv.models.macs import PAPER_CONVENTIONS, count_macs
from condconv.models.papers import MACS_TOLERANCE, PARAMS_TOLERANCE, paper_table
from condconv.models.presets import PAPERS, PRESETS, get_preset, list_presets
from condconv.nn.layers import DynamicConvBase

pytestmark = pytest.mark.usefixtures("one_thread")


def test_presets_are_registered_and_named_by_the_scheme():
    names = list_presets()
    assert names == [p.name for p in PRESETS] and len(names) == len(set(names)) == 29
    assert set(names) <= set(list_models())
    assert sorted(list_presets("condconv")) == sorted(list_models("condconv_*") + list_models("tf_condconv_*"))
    assert set(list_presets("dynamic")) == set(list_models("dy_*"))
    assert set(list_presets("odconv")) == set(list_models("odconv_*"))
    for preset in PRESETS:
        prefix = {"condconv": "condconv_", "dynamic": "dy_", "odconv": "odconv_"}[preset.paper]
        assert preset.name.removeprefix("tf_").startswith(prefix + preset.model)
        assert preset.kwargs["init"] == "official" and preset.source
        assert (preset.rule == "total" and not preset.deviation) or preset.note
    with pytest.raises(ValueError, match="paper must be one of"):
        list_presets("dyconv")
    with pytest.raises(ValueError, match="unknown preset 'odconv_resnet18_8x'"):
        get_preset("odconv_resnet18_8x")


@pytest.mark.parametrize("name", list_presets())
def test_preset_builds_and_runs(name):
    """Each preset with its own options, narrowed (width 0.25, 10 classes, 32x32) so that it runs in a blink."""
    torch.manual_seed(0)
    model = create_model(name, width_mult=0.25, num_classes=10)
    preset = get_preset(name)
    layers = [m for m in model.modules() if isinstance(m, DynamicConvBase)]
    assert layers and all(m.init == "official" for m in layers)
    assert {type(m) for m in layers} == {{"condconv": CondConv2d, "dynamic": DynamicConv2d,
                                          "odconv": ODConv2d}[preset.paper]}
    assert all(m.num_experts == preset.kwargs["num_experts"] for m in layers)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_preset_options():
    odconv = get_preset("odconv_resnet50_4x").build(num_classes=10, conv_kwargs={"temperature": 30.0})
    layers = [m for m in odconv.modules() if isinstance(m, ODConv2d)]
    assert len(layers) == 16 * 3  # every convolution of the blocks ...
    assert all(type(b.downsample.conv) is nn.Conv2d for b in odconv.blocks if getattr(b, "downsample", None))
    assert type(odconv.stem.conv) is nn.Conv2d and isinstance(odconv.head.fc, nn.Linear)
    router = layers[0].router
    assert isinstance(router.norm, nn.BatchNorm1d) and router.fc.out_features == 16  # max(64 / 16, 16)
    assert float(router.temperature) == 30.0 and odconv.head.dropout.p == 0.2 and odconv.num_classes == 10
    mbv2 = get_preset("odconv_mobilenet_v2_100_1x").build()
    assert isinstance(mbv2.head_conv.conv, ODConv2d) and isinstance(mbv2.head.fc, nn.Linear)  # 1x1 head converted
    assert sum(isinstance(m, ODConv2d) for m in mbv2.modules()) == 16 * 3 + 2 + 1  # the first block has no expand
    dy = get_preset("dy_mobilenet_v2_100").build()
    assert not isinstance(dy.head_conv.conv, DynamicConvBase) and isinstance(dy.head.fc, nn.Linear)
    assert all(m.router.hidden[0].out_features == max(m.in_channels // 4, 4) for m in dy.modules()
               if isinstance(m, DynamicConv2d))
    v3 = get_preset("dy_mobilenet_v3_small").build()
    assert isinstance(v3.head_conv.conv, DynamicConv2d) and isinstance(v3.head.pre_logits, nn.Linear)
    effnet = get_preset("condconv_efficientnet_b0_8e").build()
    assert effnet.head.dropout.p == 0.25 and all(isinstance(b.router, SigmoidRouter) for b in effnet.blocks[-8:])
    assert get_preset("dy_resnet18").anneal == (30.0, 1.0, 10)


def _check_row(row: dict) -> None:
    """Within the targets, or off by exactly the gap the preset documents (and then truly outside them)."""
    for key, tolerance in (("params", PARAMS_TOLERANCE), ("macs", MACS_TOLERANCE)):
        diff = row[f"{key}_diff"]
        documented = row["documented_deviation"].get(key)
        if documented is not None:
            assert row["note"] and abs(documented) > tolerance, row["preset"]
            assert diff == pytest.approx(documented, abs=0.002), (row["preset"], key, diff)
        elif diff is not None:
            assert abs(diff) <= tolerance, (row["preset"], key, diff)
    assert row["reproduced"] == (not row["documented_deviation"])


def test_condconv_table():
    """CondConv Table 2 and the official EfficientNet-CondConv README: every multiply-add figure within 0.5%."""
    rows = paper_table("condconv")
    assert [r["preset"] for r in rows] == list_presets("condconv")
    unpublished = [r["preset"] for r in rows if r["paper_macs"] is None]
    assert unpublished == ["tf_condconv_efficientnet_b1_8e", "condconv_efficientnet_b1_8e"]  # timm's, no figures
    for row in rows:
        _check_row(row)
        assert row["convention"] == "default" and row["reproduced"]
        if row["preset"] in unpublished:
            continue
        assert abs(row["macs_diff"]) < 0.005
        assert row["baseline_macs"] / 1e6 == pytest.approx(row["paper_baseline_macs"], rel=0.01)


def test_dynamic_table():
    rows = {r["preset"]: r for r in paper_table("dynamic")}
    for row in rows.values():
        _check_row(row)
    assert rows["dy_mobilenet_v2_100"]["reproduced"] and rows["dy_mobilenet_v2_075"]["reproduced"]
    # the parameter counts of the ResNet rows are in units of 2**20: so are the paper's static ones
    assert rows["dy_resnet18"]["rule"] == "mebi" and rows["dy_resnet18"]["reproduced"]
    for name, static in (("dy_resnet18", 11.1), ("dy_resnet10", 5.2)):
        assert round(rows[name]["baseline_params"] / 2**20, 1) == static
        assert rows[name]["baseline_params"] / 1e6 > static * 1.04
    # MobileNetV3-Small: the paper's baseline is the first arXiv version's (2.9M / 66M), ours the final one's
    v3 = rows["dy_mobilenet_v3_small"]
    assert v3["rule"] == "increment" and v3["baseline_params"] == 2_542_856
    assert (v3["params"] - v3["baseline_params"]) / 1e6 == pytest.approx(1.9, abs=0.1)  # the paper's 4.8 - 2.9


def test_odconv_table():
    """The README: parameters exact everywhere; ResNet multiply-adds within 0.7% (ResNet-50/101 on the v1 layout)."""
    rows = paper_table("odconv")
    assert PAPER_CONVENTIONS["odconv"] == "odconv"
    for row in rows:
        _check_row(row)
        assert abs(row["params_diff"]) < 0.002
        if row["model"].startswith("resnet"):
            assert row["reproduced"] and abs(row["macs_diff"]) < 0.0075
    # the README's static baselines: ResNet-50/101 are the v1 layout's 3.858G / 7.570G
    for row in rows:
        assert row["baseline_macs"] / 1e6 == pytest.approx(row["paper_baseline_macs"], rel=0.001), row["preset"]
    v15 = {r["model"]: r["macs"] - r["compared_macs"] for r in rows if r["rule"] == "v1"}
    assert v15["resnet50"] > 0.2e9 and v15["resnet101"] > 0.2e9  # the presets themselves are v1.5


def test_paper_table_errors_and_conventions():
    with pytest.raises(ValueError, match="paper must be one of"):
        paper_table("dyconv")
    assert set(PAPER_CONVENTIONS) == set(PAPERS)
    # counted the CondConv way (E multiply-adds per kernel element) ODConv (4x) ResNet-18 falls 2.2% short of 1.916G
    with torch.device("meta"):
        model = create_model("odconv_resnet18_4x")
    default, official = (count_macs(model, convention=c).macs / 1e6 for c in ("default", "odconv"))
    assert default / 1916 - 1 == pytest.approx(-0.022, abs=0.001)
    assert official / 1916 - 1 == pytest.approx(-0.0046, abs=0.001)


def test_odconv_convention_by_hand():
    layer = ODConv2d(8, 16, 3, padding=1, num_experts=4, bias=False)
    kernel = 16 * 8 * 9
    default = count_macs(layer, (8, 10, 10)).categories["mixing"].macs
    official = count_macs(layer, (8, 10, 10), convention="odconv").categories["mixing"].macs
    assert default == 4 * kernel + kernel + 8 * 100 + 16 * 100
    assert official == 2 * 4 * kernel + 8 * 100 + 16 * 100  # attentions times each expert, then the sum
    pointwise = ODConv2d(8, 16, 1, num_experts=1, bias=False)  # the official code uses its kernel as it is
    assert count_macs(pointwise, (8, 10, 10), convention="odconv").categories["mixing"].macs == 8 * 100 + 16 * 100
    cond = CondConv2d(8, 16, 3, num_experts=4)
    assert count_macs(cond, (8, 10, 10), convention="odconv") == count_macs(cond, (8, 10, 10))
    with pytest.raises(ValueError, match="convention must be one of"):
        count_macs(layer, (8, 10, 10), convention="thop")
