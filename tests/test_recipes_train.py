"""Every packaged recipe trains end to end for a few steps on the embedded digits: its optimiser, schedule, weight
average, augmentation and model options all exercised, the learning rate following the schedule's closed form."""

from __future__ import annotations

import json

import pytest
import torch

from condconv import TrainConfig, load_checkpoint, train_model
from condconv.cli import main
from condconv.training.optim import make_schedule, peak_lr
from condconv.training.recipes import list_recipes, load_recipe


def _small(name: str, tmp_path, **more) -> TrainConfig:
    """The recipe on 32 digits, a quarter of the width, batches of 8, two epochs."""
    options = load_recipe(name)
    small = {"dataset": "digits", "train_size": 32, "global_batch_size": None, "batch_size": 8, "epochs": 2,
             "warmup_epochs": min(options.get("warmup_epochs", 0), 1), "eval_every": 1, "progress": False,
             "out": str(tmp_path / name), "workers": 0,
             "width": 0.25,
             "temperature_epochs": 1 if options["temperature_epochs"] else 0}
    return TrainConfig.from_recipe(name, **{**small, **more})


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_trains_a_few_steps_on_digits(name, tmp_path):
    config = _small(name, tmp_path)
    result = train_model(config)
    assert result.steps == 8 and 0 <= result.top1 <= 100
    assert result.config["recipe"] == name and result.config["augment"] == load_recipe(name)["augment"]
    records = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    factor = make_schedule(config.lr_schedule, steps_per_epoch=4, epochs=2, warmup_epochs=config.warmup_epochs,
                           peak=peak_lr(config), floor=config.min_lr, milestones=config.lr_milestones,
                           gamma=config.lr_gamma, decay_epochs=config.lr_decay_epochs, staircase=config.lr_staircase)
    for record in epochs:  # the lr in force after the epoch's last step
        assert record["lr"] == pytest.approx(peak_lr(config) * factor(record["step"]), rel=1e-9)
    if config.ema_decay:
        assert all("eval_raw" in r for r in epochs)  # test_* are the average's, the raw weights' kept beside
    model, _ = load_checkpoint(result.checkpoint)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def on_step(progress):
        if progress.global_step == step:
            raise _Stop

    return on_step


def test_ema_weights_are_saved_and_resume_exactly(tmp_path):
    """The weight average is checkpointed with the optimizer: a run stopped mid-way and resumed ends where an
    uninterrupted one does (augmentation included), and the final weights are the average's."""
    options = {"checkpoint_every": 3, "augment": "randaugment", "randaug_layers": 1}
    full = train_model(_small("condconv-efficientnet", tmp_path / "full", **options))
    with pytest.raises(_Stop):  # stopped after step 7: the last checkpoint is step 6, mid-epoch
        train_model(_small("condconv-efficientnet", tmp_path / "cut", **options), on_step=_stop_at(7))
    resumed = train_model(_small("condconv-efficientnet", tmp_path / "cut", resume="auto", **options),
                          explicit=["resume", "out"])
    assert resumed.steps == full.steps == 8
    a, _ = load_checkpoint(full.checkpoint)
    b, _ = load_checkpoint(resumed.checkpoint)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert full.top1 == resumed.top1
    raw, _ = load_checkpoint(tmp_path / "full" / "condconv-efficientnet" / "checkpoints" / "step-00000008")
    assert not torch.equal(raw.state_dict()["head.fc.weight"], a.state_dict()["head.fc.weight"])  # final = average


def test_cli_recipe_and_overrides(tmp_path, capsys):
    assert main(["train", "--list-recipes"]) == 0
    assert "odconv-resnet" in capsys.readouterr().out
    out = tmp_path / "run"
    argv = ["train", "--recipe", "odconv-resnet", "--dataset", "digits", "--train-size", "16", "--global-batch-size",
            "8", "--epochs", "1", "--width", "0.25", "--temperature-epochs", "1", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    _, cfg = load_checkpoint(out)
    assert cfg["recipe"] == "odconv-resnet" and cfg["optimizer"] == "sgd" and cfg["nesterov"] is False
    assert cfg["batch_size"] == 8 and cfg["lr_schedule"] == "step" and cfg["model"] == "odconv_resnet50_4x"
    assert main(["train", "--recipe", "no-such-recipe"]) == 2
    assert "available" in capsys.readouterr().err
