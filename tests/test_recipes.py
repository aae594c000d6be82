"""The packaged recipes: names, loading (by name or path), that every option is a TrainConfig field or a documented
new knob with a valid value and a source comment, and that the optimiser, schedule and augmentation build from them."""

from __future__ import annotations

import re
from importlib import resources
from types import SimpleNamespace

import pytest
from torch import nn

from condconv.data.augment import build_augment
from condconv.training.config import TrainConfig
from condconv.training.optim import build_optimizer, build_scheduler
from condconv.training.recipes import KNOBS, MODEL_KNOBS, list_recipes, load_recipe, recipe_about, validate_knobs

RECIPES = ("condconv-efficientnet", "condconv-mobilenet", "dynamic-mobilenet", "dynamic-resnet", "kw-mobilenet",
           "kw-resnet", "odconv-mobilenet", "odconv-resnet")
FIELDS = set(TrainConfig.__dataclass_fields__)
KNOB_NAMES = {k.name for k in KNOBS}
# options whose value must say where it comes from (a comment on its line)
SOURCED = ("epochs", "global_batch_size", "optimizer", "lr", "lr_schedule", "weight_decay", "weight_decay_exclude",
           "label_smoothing", "dropout", "temperature_epochs")


def test_list_recipes():
    assert tuple(list_recipes()) == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_options_are_known_valid_and_sourced(name):
    options = load_recipe(name)
    assert KNOB_NAMES <= FIELDS, "every knob of the recipes is a TrainConfig option"
    unknown = set(options) - FIELDS
    assert not unknown, f"{name}: options that are not TrainConfig fields: {unknown}"
    assert set(options.get("model_kwargs", {})) <= {k.name for k in MODEL_KNOBS}
    validate_knobs(options)
    config = TrainConfig.from_recipe(name)  # every value is one TrainConfig accepts
    assert config.recipe == name and config.global_batch_size == options["global_batch_size"]
    assert options["dataset"] == "imagefolder" and options["image_size"] == 224
    # the papers anneal over a fixed number of epochs (10; KernelWarehouse its temp_epoch, 1 -> 0) or not at all
    if options["conv"] == "kernelwarehouse":
        from condconv.models.kernelwarehouse import kw_preset

        assert options["temperature_epochs"] == kw_preset(options["model"]).temp_epoch
        assert (options["temperature_start"], options["temperature_end"]) == (1.0, 0.0)
    else:
        assert options["temperature_epochs"] == (0 if options["conv"] == "condconv" else 10)
    about = recipe_about(name)
    assert about["paper"] and "arXiv" in about["paper"]
    assert set(about["unverified"]) <= set(options), about["unverified"]
    text = (resources.files("condconv.training.recipes") / f"{name}.yaml").read_text(encoding="utf-8")
    for key in SOURCED:
        line = re.search(rf"^  {key}: .*$", text, flags=re.M)
        assert line and "#" in line.group(0), f"{name}: option {key} has no source comment"


def _config(options: dict) -> SimpleNamespace:
    return SimpleNamespace(**{**TrainConfig().to_dict(), **options})


def test_recipes_build_their_optimizer_schedule_and_augmentation():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    peaks = {}
    for name in RECIPES:
        config = _config(load_recipe(name))
        opt = build_optimizer(net, config)
        sched = build_scheduler(opt, config, steps_per_epoch=10)
        peaks[name] = opt.param_groups[0]["initial_lr"]
        assert sched.get_last_lr()[0] > 0
        build_augment(config.augment, randaug_layers=getattr(config, "randaug_layers", 2))
    assert peaks["condconv-efficientnet"] == pytest.approx(0.016 * 2048 / 256)  # the TPU trainer's 0.128
    assert peaks["condconv-mobilenet"] == pytest.approx(0.016 * 1024 / 256)
    assert peaks["odconv-resnet"] == pytest.approx(0.1) and peaks["odconv-mobilenet"] == pytest.approx(0.05)
    # the ODConv ResNet schedule: / 10 at epochs 30, 60, 90, no warm-up
    config = _config(load_recipe("odconv-resnet"))
    opt = build_optimizer(net, config)
    factor = build_scheduler(opt, config, steps_per_epoch=10).lr_lambdas[0]
    assert [factor(s) for s in (0, 299, 300, 600, 900)] == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    assert opt.param_groups[0]["nesterov"] is False and opt.param_groups[1]["params"] == []  # decay on everything


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ValueError, match="odconv-resnet") as info:
        load_recipe("odconv-resnet-50")
    assert "available" in str(info.value)
    with pytest.raises(TypeError, match="name"):
        load_recipe(3)


def test_yaml_paths_and_fresh_copies(tmp_path):
    sectioned = tmp_path / "mine.yaml"
    sectioned.write_text("about: {paper: x}\noptions:\n  lr: 0.2\n  model_kwargs: {bn_eps: 0.001}\n")
    plain = tmp_path / "plain.yml"
    plain.write_text("lr: 0.3\nepochs: 2\n")
    assert load_recipe(sectioned) == {"lr": 0.2, "model_kwargs": {"bn_eps": 0.001}}
    assert load_recipe(str(plain)) == {"lr": 0.3, "epochs": 2} and recipe_about(plain) == {}
    first = load_recipe("odconv-resnet")
    first["lr_milestones"].append(100)
    assert load_recipe("odconv-resnet")["lr_milestones"] == [30, 60, 90]
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_recipe(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("options: {lr: [\n")
    with pytest.raises(ValueError, match="malformed"):
        load_recipe(broken)


@pytest.mark.parametrize("options, name", [({"lr_schedule": "poly"}, "lr_schedule"), ({"ema_decay": 1.0}, "ema_decay"),
                                           ({"nesterov": "yes"}, "nesterov"), ({"lr_milestones": 30}, "lr_milestones"),
                                           ({"lr_reference_batch": 0}, "lr_reference_batch"),
                                           ({"augment": "rand"}, "augment"), ({"randaug_layers": -1}, "randaug_layers"),
                                           ({"weight_decay_exclude": "bias"}, "weight_decay_exclude")])
def test_validate_knobs_names_the_bad_option(options, name):
    with pytest.raises(ValueError, match=f"^{name} must be") as info:
        validate_knobs(options)
    assert info.value.option == name
