"""``condconv train`` / ``condconv eval``: logs, configs, checkpoints, exact resume after SIGKILL, DDP on gloo."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import condconv
import condconv.models.checkpoint as checkpoint_mod
from condconv.cli import build_parser, main
from condconv.cli.commands.options import config_from_args
from condconv.models.checkpoint import latest_checkpoint, load_checkpoint, save_weights
from condconv.models.checkpoint import read_state as _read_state
from condconv.models.checkpoint import write_checkpoint as _write_checkpoint
from condconv.training.config import TrainConfig
from condconv.training.evaluate import evaluate_checkpoint
from condconv.training.loop import NonFiniteLossError, train_model
from condconv.training.optim import WarmupCosine

SRC = str(Path(condconv.__file__).resolve().parents[1])
# a 0.2M-parameter MobileNetV1 (CondConv, 2 experts in the last 7 blocks and the classifier) on 64 digits
TINY = ["--model", "mobilenet_v1_cifar", "--width", "0.25", "--experts", "2", "--train-size", "64",
        "--batch-size", "16", "--no-progress", "--eval-every", "0"]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


# `condconv train ARGS` in a process that SIGKILLs itself right after global step argv[1] (a preempted job)
_KILLED_AT = """
import os, signal, sys
from condconv.cli import build_parser
from condconv.cli.commands.options import config_from_args
from condconv.training.loop import train_model

config, explicit = config_from_args(build_parser().parse_args(sys.argv[2:]))
kill_at = int(sys.argv[1])


def on_step(progress):
    if progress.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


train_model(config, explicit=explicit, on_step=on_step)
"""


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    assert (
        main(["train", *TINY, "--epochs", "1", "--checkpoint-every", "2", "--dropout", "0.1", "--out", str(out)]) == 0
    )
    return out


def test_train_writes_logs_checkpoints_and_eval_agrees(trained_run, tmp_path, capsys):
    run = trained_run
    for name in ("model.safetensors", "log.jsonl", "log.csv", "config.yaml", "checkpoints/latest"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000004"  # keep_checkpoints=1 pruned step 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    rows = _csv_rows(run / "log.csv")
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and rows[0]["step"] == "4"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model_args"] == {"num_classes": 10, "in_chans": 1, "conv": "condconv", "width_mult": 0.25,
                                    "dropout": 0.1, "num_experts": 2}  # fmt: skip

    model, cfg = load_checkpoint(run)
    assert not model.training and cfg["classes"] == [str(i) for i in range(10)]
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 10)
    ck_model, _ = load_checkpoint(run / "checkpoints" / "step-00000004")
    file_model, _ = load_checkpoint(run / "model.safetensors")
    for a, b, c in zip(model.state_dict().values(), ck_model.state_dict().values(), file_model.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)

    out_json = tmp_path / "eval.json"
    assert main(["eval", str(run), "--json", str(out_json), "--no-progress"]) == 0
    res = json.loads(out_json.read_text())
    assert res["images"] == 600 and sum(res["per_class_count"]) == 600 and len(res["per_class_accuracy"]) == 10
    assert res["top1"] == pytest.approx(float(rows[0]["test_top1"]), abs=1e-9)  # same weights, same test set
    assert res["top5"] >= res["top1"] and res["loss"] == pytest.approx(float(rows[0]["test_loss"]), rel=1e-6)
    assert res["images_per_s"] > 0
    capsys.readouterr()
    assert main(["eval", str(run / "model.safetensors"), "--json", "-", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == res["top1"]


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("epochs: 3\nlr: 0.01\nwarmup-epochs: 0\nmodel_kwargs: {dynamic_head: false}\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--lr", "0.02", "--model-kwargs", "x=1"])
    cfg, explicit = config_from_args(args)
    assert (cfg.epochs, cfg.lr, cfg.warmup_epochs) == (3, 0.02, 0)
    assert cfg.model_kwargs == {"dynamic_head": False, "x": 1}
    assert {"epochs", "lr", "warmup_epochs", "model_kwargs"} <= set(explicit) and "batch_size" not in explicit
    assert config_from_args(build_parser().parse_args(["train"]))[0] == TrainConfig()

    cfg_file.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"cfg\.yaml.*learning_rate"):
        config_from_args(build_parser().parse_args(["train", "--config", str(cfg_file)]))
    cfg_file.write_text("epochs: [3\n")
    with pytest.raises(ValueError, match=r"cfg\.yaml"):
        config_from_args(build_parser().parse_args(["train", "--config", str(cfg_file)]))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "missing.yaml")]))
    for bad, name in ((dict(conv="sparse"), "conv"), (dict(epochs=0), "epochs"), (dict(label_smoothing=1.0), "label")):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**bad).validate()
    assert main(["train", "--optimizer", "adamw", "--lr", "-1"]) == 2


def test_lr_schedule_warmup_then_cosine():
    schedule = WarmupCosine(warmup=4, total=20, peak=0.1, floor=0.001)
    f = [schedule(s) for s in range(21)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert f[20] == pytest.approx(0.01)


def test_dynamic_conv_temperature_annealing_mixup_adamw(tmp_path):
    result = train_model(
        TrainConfig(model="mobilenet_v1_cifar", conv="dynamic", experts=2, width=0.25, train_size=32, batch_size=16,
                    epochs=2, temperature_epochs=1, mixup=0.2, optimizer="adamw", lr=1e-3, eval_every=0,
                    progress=False, out=str(tmp_path / "dyn"))
    )  # fmt: skip
    temps = [h["temperature"] for h in result.history]
    assert temps == pytest.approx([15.5, 1.0])  # 30 -> 1 linearly over the 2 steps of epoch 1
    model, cfg = load_checkpoint(result.checkpoint)
    buffers = [b for n, b in model.named_buffers() if n.endswith("temperature")]
    assert buffers and all(float(b) == 1.0 for b in buffers)
    assert cfg["conv"] == "dynamic" and 0 <= result.top1 <= 100


class _NaNAfter(nn.Module):
    """Wraps a model; its outputs become NaN from the k-th training forward on."""

    def __init__(self, inner: nn.Module, k: int) -> None:
        super().__init__()
        self.inner, self.k, self.calls = inner, k, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.k:
                out = out * float("nan")
        return out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = checkpoint_mod.build_model
    monkeypatch.setattr(checkpoint_mod, "build_model", lambda name, args: _NaNAfter(real(name, args), k=3))
    out = tmp_path / "nan"
    cfg = TrainConfig(width=0.25, experts=2, train_size=32, batch_size=16, epochs=3, eval_every=0, progress=False,
                      out=str(out))  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss.*epoch 2.*step-00000002"):
        train_model(cfg)
    assert latest_checkpoint(out).name == "step-00000002"
    assert not (out / "model.safetensors").exists()
    weights = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    shutil.rmtree(out)
    assert main(["train", *TINY, "--train-size", "32", "--epochs", "3", "--out", str(out)]) == 2
    assert "non-finite loss" in capsys.readouterr().err


def test_corrupt_and_mismatched_checkpoints_name_the_file(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # resuming into a folder that already holds a run needs --resume
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    # a resume may not change the model
    assert main(["train", "--resume", str(run), "--width", "0.5"]) == 2
    assert "width" in capsys.readouterr().err
    # weights of another model under this model's config
    _, cfg = load_checkpoint(run)
    other = checkpoint_mod.build_model(cfg["model"], {**cfg["model_args"], "width_mult": 0.5})
    save_weights(other, tmp_path / "other.safetensors", cfg)
    with pytest.raises(ValueError, match=r"other\.safetensors.*does not match"):
        load_checkpoint(tmp_path / "other.safetensors")
    # corrupt weights / state
    (run / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_checkpoint(run)
    state = run / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"state\.pt"):
        train_model(TrainConfig(resume=str(run), progress=False))
    (run / "checkpoints" / "latest").write_text("step-00000099\n")
    with pytest.raises(ValueError, match="latest"):
        train_model(TrainConfig(resume=str(run), progress=False))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_checkpoint_write_is_atomic(trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    model, cfg = load_checkpoint(run)
    state = _read_state(run / "checkpoints" / "step-00000004" / "state.pt")
    state["global_step"] = 99

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(checkpoint_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        _write_checkpoint(run, model, state, cfg, keep=1)
    monkeypatch.undo()
    assert latest_checkpoint(run).name == "step-00000004" and not (run / "checkpoints" / "step-00000099").exists()
    assert _read_state(run / "checkpoints" / "step-00000004" / "state.pt")["global_step"] == 4
    _write_checkpoint(run, model, state, cfg, keep=1)  # the next write succeeds, cleans up and prunes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000099"]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    train = ["train", *TINY, "--epochs", "2", "--checkpoint-every", "3", "--dropout", "0.2", "--mixup", "0.2"]
    args = [sys.executable, "-m", "condconv.cli", *train]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([*args, "--out", str(full)], env=_env(), check=True, capture_output=True)
    # 4 steps per epoch: dies at epoch 2, step 3
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT, "7", *train, "--out", str(killed)], env=_env(),
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ck = latest_checkpoint(killed)
    assert ck.name == "step-00000006" and not (killed / "model.safetensors").exists()
    state = _read_state(ck / "state.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)  # mid-epoch
    subprocess.run([*args, "--out", str(killed), "--resume"], env=_env(), check=True, capture_output=True)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cols = ("epoch", "step", "lr", "train_loss", "train_acc", "test_top1")
    ra, rb = _csv_rows(full / "log.csv"), _csv_rows(killed / "log.csv")
    assert [[r[c] for c in cols] for r in ra] == [[r[c] for c in cols] for r in rb]


def test_ddp_two_gloo_processes_match_one_process_at_the_combined_batch(tmp_path):
    """2 processes x batch 8 == 1 process x batch 16: DistributedSampler shards each combined batch and DDP
    averages the gradients. Exact up to float summation order when BatchNorm uses running statistics
    (``--freeze-bn``; per-process batch statistics would differ) and nothing else is random (no dropout, mixup)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not available")
    common = ["train", *TINY, "--epochs", "2", "--freeze-bn", "--dropout", "0", "--lr", "0.05"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    proc = subprocess.run(
        [*launcher, "condconv.cli", *common, "--batch-size", "8", "--out", str(ddp)], env=_env(), capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert main([*common, "--batch-size", "16", "--out", str(single)]) == 0
    a, b = load_file(ddp / "model.safetensors"), load_file(single / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    init = checkpoint_mod.build_model("mobilenet_v1_cifar", load_checkpoint(single)[1]["model_args"]).state_dict()
    changed = sum(not torch.allclose(init[k].float(), a[k].float()) for k in a if a[k].is_floating_point())
    assert changed > 10  # the runs did train
    records = [json.loads(line) for line in (ddp / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]  # rank 0 logs once
    rows_ddp, rows_single = _csv_rows(ddp / "log.csv"), _csv_rows(single / "log.csv")
    assert float(rows_ddp[-1]["train_loss"]) == pytest.approx(float(rows_single[-1]["train_loss"]), rel=1e-4)


def test_train_and_eval_on_an_imagefolder_tree_with_workers(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for cls in ("a", "b", "c"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (int(rng.integers(24, 60)), int(rng.integers(24, 60)))
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / "data" / split / cls / f"{i}.jpg")
    out = tmp_path / "run"
    args = ["train", "--dataset", str(tmp_path / "data"), "--image-size", "32", "--workers", "2", "--model",
            "mobilenet_v1_cifar", "--width", "0.25", "--experts", "2", "--batch-size", "4", "--epochs", "2",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = _csv_rows(out / "log.csv")
    assert [r["step"] for r in rows] == ["6", "12"] and all(r["test_top1"] for r in rows)
    _, cfg = load_checkpoint(out)
    assert cfg["classes"] == ["a", "b", "c"] and cfg["model_args"]["in_chans"] == 3 and cfg["image_size"] == 32
    res = evaluate_checkpoint(out, workers=0)
    assert res["images"] == 9 and res["top1"] == pytest.approx(float(rows[-1]["test_top1"]))


def test_fine_tune_and_evaluate_a_converted_checkpoint(trained_run, tmp_path):
    """``--init`` starts from a ``condconv convert`` checkpoint (layer conversions recorded in its config)."""
    converted = tmp_path / "converted"
    argv = ["convert", str(trained_run), "--conv", "dynamic", "--experts", "2", "--include", "blocks.0.*",
            "--perturb", "0.01", "--out", str(converted)]  # fmt: skip
    assert main(argv) == 0
    model, cfg = load_checkpoint(converted)
    assert cfg["convert"] and sum(isinstance(m, condconv.DynamicConv2d) for m in model.modules()) >= 1
    before = evaluate_checkpoint(converted, workers=0)
    original = evaluate_checkpoint(trained_run, workers=0)
    assert before["top1"] == pytest.approx(original["top1"], abs=0.5)  # conversion preserves the function
    out = tmp_path / "tuned"
    assert main(["train", "--init", str(converted), "--train-size", "32", "--batch-size", "16", "--epochs", "1",
                 "--eval-every", "0", "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    tuned, tuned_cfg = load_checkpoint(out)
    assert tuned_cfg["convert"] == cfg["convert"] and tuned_cfg["model_args"] == cfg["model_args"]
    assert sum(isinstance(m, condconv.DynamicConv2d) for m in tuned.modules()) >= 1
    assert not torch.equal(tuned.state_dict()["head.fc.weight"], model.state_dict()["head.fc.weight"])
