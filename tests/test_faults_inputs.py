"""Bad or unusual inputs end in one line before any work, and every result is labelled by what really ran (issue 18).

The engine's strategy rule, model options that a dedicated flag sets, repeated grid values, ranges and relations
of numeric options, run folders whose config.yaml changed, clear messages, and a command line that answers
``--help``/``--version`` without importing torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import condconv
import condconv.models.checkpoint
from condconv.cli import COMMANDS, SUMMARIES, build_parser, main
from condconv.cli.commands.options import config_from_args
from condconv.models.checkpoint import load_checkpoint
from condconv.nn import functional as engine
from condconv.nn.layers import CondConv2d, DynamicConv2d, ODConv2d
from condconv.training.config import TrainConfig, model_args
from condconv.training.sweep import sweep_grid

LAYER_CLASSES = (CondConv2d, DynamicConv2d, ODConv2d)
SRC = Path(condconv.__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------------------------------------------------
# 5. clear messages from the layers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_integer_like_channel_counts_are_taken_as_nn_conv2d_takes_them(cls):
    np = pytest.importorskip("numpy")
    layer = cls(np.int64(4), np.int32(8), np.int64(3), padding=np.int64(1), groups=np.int16(2),
                num_experts=np.int64(2))
    static = torch.nn.Conv2d(np.int64(4), np.int32(8), np.int64(3), padding=np.int64(1), groups=np.int16(2))
    assert (layer.in_channels, layer.out_channels, layer.groups, layer.num_experts) == (4, 8, 2, 2)
    assert all(type(v) is int for v in (layer.in_channels, layer.out_channels, layer.groups, layer.num_experts,
                                        *layer.kernel_size, *layer.padding))
    x = torch.randn(2, 4, 5, 5)
    assert layer(x).shape == static(x).shape == (2, 8, 5, 5)
    for bad in (4.0, True, "4"):
        with pytest.raises((TypeError, ValueError), match="in_channels"):
            cls(bad, 8, 3, num_experts=2)


@pytest.mark.parametrize("mode,pad,size,ok", [("reflect", 3, 3, False), ("reflect", 2, 3, True),
                                               ("circular", 3, 2, False), ("circular", 3, 3, True)])
def test_wrap_padding_wider_than_the_input_is_a_clear_error(mode, pad, size, ok):
    layer = CondConv2d(2, 2, 2 * pad - 1, padding=pad, padding_mode=mode, num_experts=2)
    x = torch.randn(2, 2, size, size + 2)
    if ok:
        static = torch.nn.Conv2d(2, 2, 2 * pad - 1, padding=pad, padding_mode=mode)
        assert layer(x).shape == static(x).shape
        return
    with pytest.raises(ValueError, match=rf"padding_mode='{mode}' needs padding .* the input: padding {pad} along the "
                                         rf"height of a {size}x{size + 2} input"):
        layer(x)
    with pytest.raises(ValueError, match=f"padding_mode='{mode}'"):
        engine.dynamic_conv2d(x, layer.weight, torch.rand(2, 2), padding=pad, padding_mode=mode)


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_torchscript_scripting_says_what_is_not_supported_and_what_to_use(cls):
    layer = cls(4, 4, 3, padding=1, num_experts=2).eval()
    for module in (layer, torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), layer)):
        with pytest.raises(RuntimeError, match=rf"torch.jit.script does not support {cls.__name__} .*torch.jit.trace"
                                               r".*torch.export"):
            torch.jit.script(module)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(layer, x, check_trace=False)
        torch.testing.assert_close(traced(x), layer(x))  # what the message points to works


# ---------------------------------------------------------------------------------------------------------------
# 2. what a run records is what ran
# ---------------------------------------------------------------------------------------------------------------
# 2 steps of 16 images per epoch: a MobileNetV1 0.25x with 2-expert CondConv on 32 digits
TINY = ["--width", "0.25", "--experts", "2", "--train-size", "32", "--batch-size", "16", "--no-progress",
        "--eval-every", "0"]  # fmt: skip
GRID = ["--widths", "0.25", "--experts", "1", "--seeds", "0", "--train-size", "32", "--batch-size", "16",
        "--epochs", "1", "--no-progress", "--no-plot"]  # fmt: skip


@pytest.mark.parametrize("key,value,flag", [("width_mult", "0.5", "--width"), ("num_experts", "8", "--experts"),
                                            ("conv", "static", "--conv"), ("dropout", "0.1", "--dropout")])
def test_model_kwargs_set_by_a_flag_are_refused_naming_the_flag(key, value, flag, tmp_path, capsys, cli_error):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--model-kwargs", f"{key}={value}", "--out", str(out)]) == 2
    message = cli_error("train")
    assert "--model-kwargs must not set" in message and f"use {flag} instead" in message, message
    assert not out.exists()
    with pytest.raises(ValueError, match=f"model_kwargs must not set .*use {flag[2:]} instead"):
        TrainConfig(model_kwargs={key: 1}).validate()


@pytest.mark.parametrize("key,flag", [("width_mult", "--widths"), ("num_experts", "--experts")])
def test_sweep_refuses_model_kwargs_that_the_grid_sets(key, flag, tmp_path, capsys, cli_error):
    out = tmp_path / "sweep"
    assert main(["sweep", *GRID, "--model-kwargs", f"{key}=1", "--out", str(out)]) == 2
    assert f"use {flag} instead" in cli_error("sweep")
    assert not out.exists()
    with pytest.raises(ValueError, match=f"use {flag[2:]} instead"):
        sweep_grid({"model_kwargs": {key: 1}}, widths=[0.25], experts=[1], seeds=[0], out=out)
    assert not out.exists()


@pytest.mark.parametrize("grid,flag", [(["--seeds", "0", "0"], "--seeds"), (["--widths", "0.25", "0.25"], "--widths"),
                                       (["--experts", "2", "1", "2"], "--experts"),
                                       (["--seeds", str(2**32)], "--seeds")])
def test_sweep_refuses_repeated_or_out_of_range_grid_values(grid, flag, tmp_path, capsys, cli_error):
    out = tmp_path / "sweep"
    assert main(["sweep", *GRID, *grid, "--out", str(out)]) == 2
    message = cli_error("sweep")
    assert f"error: {flag} must" in message, message
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--conv", "static"],
                                   ["--model-kwargs", "dynamic_blocks=0", "dynamic_classifier=false"]])
def test_a_grid_point_whose_model_has_other_experts_is_refused_before_training(extra, tmp_path, capsys, cli_error):
    out = tmp_path / "sweep"
    assert main(["sweep", *GRID, "--experts", "1", "2", *extra, "--out", str(out)]) == 2
    message = cli_error("sweep")
    assert "--experts 2 cannot be trained with these settings: the model built for it" in message, message
    assert not (out / "runs").exists() and not (out / "sweep.json").exists()


def test_num_classes_must_match_the_dataset_before_any_folder(tmp_path, capsys, cli_error):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--model-kwargs", "num_classes=3", "--out", str(out)]) == 2
    message = cli_error("train")
    assert "num_classes=3 does not match the dataset digits, which has 10" in message, message
    assert not out.exists()


def test_config_summary_and_runs_record_the_model_that_was_built(tmp_path, capsys):
    """A static model records no experts (not the flag's 2); the parameter count is the built model's."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--conv", "static", "--epochs", "1", "--model-kwargs", "num_classes=10",
                 "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    model, _ = load_checkpoint(out)
    params = sum(p.numel() for p in model.parameters())
    assert saved["experts"] is None and saved["params"] == params and saved["width"] == 0.25
    assert saved["train_size"] == 32 and saved["train_images"] == 32
    assert "(static, experts=None, width=0.25)" in summary and f"params {params:,}" in summary
    # the recorded config can be given back as options: the same model
    config, _ = config_from_args(build_parser().parse_args(["train", "--config", str(out / "config.yaml")]))
    assert condconv.create_model(config.model, **model_args(config, 10, 1)).state_dict().keys() == \
        model.state_dict().keys()


# ---------------------------------------------------------------------------------------------------------------
# 3. ranges and relations, checked before any work
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--min-lr", "0.5", "--lr", "0.1"], "--min-lr (0.5) must not exceed --lr (0.1)"),
    (["--momentum", "5"], "--momentum must be in [0, 1), got 5.0"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--warmup-epochs", "100"], "--warmup-epochs (100.0) must not exceed --epochs (1)"),
    (["--lr-schedule", "step", "--lr-milestones", "6", "3"], "--lr-milestones must be strictly increasing"),
    (["--lr-milestones", "3", "3"], "--lr-milestones must be strictly increasing"),
    (["--seed", str(2**32)], "--seed must be an int in [0, 4294967295]"),
    (["--seed", "-1"], "--seed must be an int in [0, 4294967295]"),
])  # fmt: skip
def test_numeric_options_are_checked_with_their_relations_before_any_folder(argv, message, tmp_path, capsys, cli_error):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", *argv, "--out", str(out)]) == 2
    assert message in cli_error("train")
    assert not out.exists()


def test_the_largest_seed_trains(tmp_path):
    """The bound is what the generators take, not narrower: seed 2**32 - 1 runs."""
    from condconv.utils.checks import MAX_SEED

    assert main(["train", *TINY, "--epochs", "1", "--train-size", "16", "--seed", str(MAX_SEED),
                 "--out", str(tmp_path / "run")]) == 0


def test_convert_seed_and_macs_modules_are_range_checked(tmp_path, capsys, cli_error):
    out = tmp_path / "cc"
    assert main(["convert", "resnet18_cifar", "--seed", str(2**64), "--out", str(out)]) == 2
    assert "error: --seed must be an int in [0, 4294967295]" in cli_error("convert")
    assert not out.exists()
    with pytest.raises(SystemExit) as info:
        main(["macs", "resnet18_cifar", "--modules", "-1"])
    assert info.value.code == 2 and "--modules: expected an int >= 0, got -1" in capsys.readouterr().err


def _tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(CondConv2d(3, 4, 3, padding=1, num_experts=2), torch.nn.ReLU()).eval()


@pytest.mark.parametrize("opset,exporter", [(11, "auto"), (17, "torchscript"), (18, "dynamo"), (20, "auto")])
def test_the_written_onnx_file_declares_the_opset_asked_for(opset, exporter, tmp_path):
    pytest.importorskip("onnx")
    if exporter != "torchscript" and opset >= 18:
        pytest.importorskip("onnxscript")
    from condconv.deploy.export import export_model, onnx_file_opset

    path = export_model(_tiny_model(), tmp_path / "m.onnx", "onnx", (3, 8, 8), opset, exporter=exporter)
    assert onnx_file_opset(path) == opset


def test_an_opset_the_exporter_does_not_write_is_refused_before_any_work(tmp_path, capsys, monkeypatch, cli_error):
    pytest.importorskip("onnx")
    import condconv.deploy.export as export

    out = tmp_path / "m.onnx"
    monkeypatch.setattr(export, "_export_onnx", _never)
    for opset in (99, 3):
        with pytest.raises(ValueError, match=f"opset {opset} is outside what the ONNX exporters write here"):
            export.export_model(_tiny_model(), out, "onnx", (3, 8, 8), opset)
    if export.onnx_dynamo_available():
        with pytest.raises(ValueError, match="opset 11 is outside what the dynamo ONNX exporter writes here "
                                             r"\(18 to \d+\): use exporter torchscript \(7 to \d+\)"):
            export.export_model(_tiny_model(), out, "onnx", (3, 8, 8), 11, exporter="dynamo")
    assert main(["export", "resnet18_cifar", "--opset", "99", "--out", str(out)]) == 2
    assert "error: --opset 99 is outside what the ONNX exporters write here" in cli_error("export")
    assert not out.exists()


def test_a_file_written_at_another_opset_than_asked_is_not_kept(tmp_path, monkeypatch):
    """The dynamo exporter silently writes its own opset when it cannot convert: read back, refused, no file."""
    pytest.importorskip("onnxscript")
    import condconv.deploy.export as export

    real = export.onnx_opset_range
    monkeypatch.setattr(export, "onnx_opset_range", lambda name: (7, real(name)[1]))  # pretend it converts down
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"opset 11 was not written: the dynamo ONNX exporter wrote opset 1\d"):
        export.export_model(_tiny_model(), out, "onnx", (3, 8, 8), 11, exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


def _never(*args, **kwargs):
    raise AssertionError("the work started before the request was checked")


def test_a_model_that_would_not_fit_in_memory_is_refused_before_allocation(tmp_path, capsys, monkeypatch, cli_error):
    import condconv.training.budget as budget

    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": (2**20, "a test limit"))
    monkeypatch.setattr("condconv.models.checkpoint.build_model", _never_on_cpu(condconv.models.checkpoint.build_model))
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
    message = cli_error("train")
    assert re.search(r"would not fit in memory: training it needs at least [\d.]+ MiB \([\d,]+ parameters: .*\), "
                     r"1\.0 MiB available \(a test limit\): use fewer experts", message), message
    assert not out.exists()
    out = tmp_path / "sweep"
    assert main(["sweep", *GRID, "--experts", "2", "--out", str(out)]) == 2
    assert "grid point width=0.25, experts=2 would not fit in memory" in cli_error("sweep")
    assert not (out / "runs").exists()


def _never_on_cpu(build):
    """``build_model`` that refuses to allocate real weights (the estimate builds on the meta device only)."""

    def guarded(*args, **kwargs):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a model was allocated before the memory check")
        return build(*args, **kwargs)

    return guarded


def test_the_memory_estimate_counts_the_parameters_of_the_model_it_would_build():
    from condconv.training.budget import estimate_training_memory

    args = {"num_classes": 10, "in_chans": 1, "conv": "condconv", "num_experts": 3, "width_mult": 0.25}
    estimate = estimate_training_memory("mobilenet_v1_cifar", args, (1, 32, 32), 4, optimizer="adamw", ema=True)
    model = condconv.create_model("mobilenet_v1_cifar", **args)
    params = sum(p.numel() for p in model.parameters())
    assert estimate.params == params
    assert estimate.optimizer == 3 * 4 * params  # two AdamW moments and the weight average, float32
    assert estimate.weights >= 2 * 4 * params and estimate.activations > 4 * 4 * 32 * 32  # at least the input
    sgd = estimate_training_memory("mobilenet_v1_cifar", args, (1, 32, 32), 8, optimizer="sgd", momentum=0.0)
    assert sgd.optimizer == 0 and sgd.activations > estimate.activations  # twice the batch


# ---------------------------------------------------------------------------------------------------------------
# 4. a run folder whose config.yaml no longer matches the run
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run (2 steps)."""
    out = tmp_path_factory.mktemp("drift") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def _edited(run: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config.update(changes)
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def test_an_edited_config_is_refused_by_resume_and_eval_naming_the_keys(one_epoch_run, tmp_path, capsys, cli_error):
    run = _edited(one_epoch_run, tmp_path, epochs=2)
    weights = (run / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    message = cli_error("train")
    assert "config.yaml no longer matches the checkpoint" in message and "epochs (1 -> 2)" in message, message
    assert "--accept-config-change" in message
    assert main(["eval", str(run), "--no-progress"]) == 2
    message = cli_error("eval")
    assert "epochs (1 -> 2)" in message and "--accept-config-change" in message, message
    assert (run / "model.safetensors").read_bytes() == weights
    assert main(["eval", str(run), "--no-progress", "--accept-config-change"]) == 0


def test_accepting_a_raised_epochs_trains_the_extra_epochs(one_epoch_run, tmp_path, capsys):
    run = _edited(one_epoch_run, tmp_path, epochs=2)
    assert main(["train", "--resume", str(run), "--no-progress", "--accept-config-change"]) == 0
    assert "steps 4 " in capsys.readouterr().out  # 2 more steps: the second epoch
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    assert main(["eval", str(run), "--no-progress"]) == 0  # config.yaml and the weights agree again


def test_keys_that_cannot_change_on_resume_are_refused_even_when_accepting(one_epoch_run, tmp_path, capsys, cli_error):
    run = _edited(one_epoch_run, tmp_path, lr=0.2, epochs=2)
    for command in ("train", "eval"):
        argv = ["train", "--resume", str(run)] if command == "train" else ["eval", str(run)]
        assert main([*argv, "--no-progress", "--accept-config-change"]) == 2
        message = cli_error(command)
        assert "lr (0.05 -> 0.2)" in message and "restore lr in it" in message, message
    with pytest.raises(ValueError, match=r"no longer matches .*lr \(0.05 -> 0.2\)"):
        condconv.evaluate_checkpoint(run)


# ---------------------------------------------------------------------------------------------------------------
# 5. clear messages from the command line
# ---------------------------------------------------------------------------------------------------------------
def test_a_weights_file_that_does_not_fit_names_the_file_and_the_first_keys(tmp_path, capsys, cli_error):
    from safetensors.torch import save_file

    args = {"num_classes": 10, "width_mult": 0.25}
    state = {k: v.contiguous() for k, v in condconv.create_model("resnet18_cifar", **args).state_dict().items()}
    first = next(iter(state))
    del state[first]
    state["extra.weight"] = torch.zeros(1)
    state["head.fc.weight"] = torch.zeros(3, state["head.fc.weight"].shape[1])
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    out = tmp_path / "cc"
    assert main(["convert", "resnet18_cifar", "--model-kwargs", "num_classes=10", "width_mult=0.25",
                 "--weights", str(bad), "--out", str(out)]) == 2
    message = cli_error("convert")
    assert f"pretrained weights {bad} (" in message and "do not fit resnet18_cifar" in message, message
    assert f"missing [{first}]" in message and "unexpected [extra.weight]" in message
    assert "mis-shaped [head.fc.weight (3, 128) -> head.fc.weight (10, 128)]" in message
    assert not out.exists()


def _condconv(*argv: str, stdout=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "condconv.cli", *argv], stdout=stdout or subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=300)


@pytest.mark.parametrize("argv", [["--help"], ["macs", "resnet18_cifar", "--width", "0.25", "--input-size", "32"]])
def test_a_closed_pipe_ends_the_command_quietly(argv):
    """``condconv ... | head``: the reader is gone before the first line; no message, exit status 0."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = _condconv(*argv, stdout=write)
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stderr == "", done.stderr


# ---------------------------------------------------------------------------------------------------------------
# 6. --help and --version without torch
# ---------------------------------------------------------------------------------------------------------------
_NO_TORCH = """
import sys
from condconv.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = [name for name in ("torch", "numpy", "condconv.nn", "condconv.training") if name in sys.modules]
print("imported:", heavy, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["-v", "--version"], []])
def test_help_and_version_import_neither_torch_nor_the_library(argv):
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *argv], capture_output=True, text=True, env=env,
                          timeout=120)
    assert "imported: []" in done.stderr, done.stderr
    if argv and argv[-1] == "--version":
        assert done.stdout.strip() == f"condconv {condconv.__version__}"
    if argv == ["--help"]:
        assert all(name in done.stdout for name, _ in COMMANDS)


def test_python_m_condconv_cli_answers_version_and_help():
    assert _condconv("--version").stdout.strip() == f"condconv {condconv.__version__}"
    assert "train" in _condconv("--help").stdout


def test_the_torch_free_summaries_are_the_commands_help():
    import importlib

    for name, module in COMMANDS:
        assert SUMMARIES[name] == importlib.import_module(module).HELP, name
    assert list(SUMMARIES) == [name for name, _ in COMMANDS]


def test_an_unknown_subcommand_is_reported_without_loading_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["trian"])
    assert info.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def test_config_drift_compares_what_both_records_hold(tmp_path):
    from condconv.training.runlog import config_drift, describe_drift

    recorded = {"epochs": 8, "lr": 0.05, "mean": (0.5,), "out": "a", "segments": [{"epochs": 8}], "params": 10}
    path = tmp_path / "config.yaml"
    assert config_drift(path, recorded) == {}  # no config.yaml: nothing to compare
    path.write_text(yaml.safe_dump({"epochs": 10, "lr": 0.05, "mean": [0.5], "out": "b",
                                    "segments": [{"epochs": 10}], "extra_from_a_newer_version": 1}))
    drift = config_drift(path, recorded)
    assert drift == {"epochs": (8, 10)} and describe_drift(drift) == "epochs (8 -> 10)"
    path.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match=f"malformed run config {path}"):
        config_drift(path, recorded)


def test_export_reports_the_opset_the_file_declares(tmp_path, capsys):
    pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    assert main(["export", "resnet18_cifar", "--model-kwargs", "num_classes=10", "width_mult=0.25", "--opset", "17",
                 "--out", str(out)]) == 0
    assert "ONNX opset 17) to" in capsys.readouterr().out
