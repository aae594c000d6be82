"""Faults end in one line that names the file or the flag, and nothing is lost or mislabelled.

Two processes on one run folder, non-finite weights, resuming with fewer epochs, unreadable images (with DataLoader
workers), unwritable outputs for every command, a full disk during a checkpoint, argument parsing, refused pickles.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import condconv
import condconv.models.checkpoint as checkpoint_mod
from condconv.cli import build_parser, main
from condconv.data import EpochLoader, build_dataset
from condconv.data.loader import default_workers
from condconv.models import create_model
from condconv.models.checkpoint import latest_checkpoint, read_state, save_weights
from condconv.training.analysis import routing_statistics
from condconv.training.config import TrainConfig
from condconv.training.loop import train_model
from condconv.utils.checks import OptionError
from condconv.utils.fileio import FolderBusyError, OutputError, check_writable, folder_lock

SRC = Path(condconv.__file__).resolve().parents[1]
# 2 steps of 16 images per epoch: a MobileNetV1 0.25x with 2-expert CondConv on 32 digits
TINY = ["--width", "0.25", "--experts", "2", "--train-size", "32", "--batch-size", "16", "--no-progress",
        "--eval-every", "0"]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (but the lock file) with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _finite(path: Path) -> bool:
    """Whether a checkpoint folder's weights, buffers and optimizer state are all finite."""
    tensors = list(load_file(path / "model.safetensors").values())
    for slot in read_state(path / "state.pt")["optimizer"]["state"].values():
        tensors += [v for v in slot.values() if isinstance(v, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run (4 steps)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------------ one run folder
_HOLD_AT_STEP = """
import sys
from condconv.cli import build_parser
from condconv.cli.commands.options import config_from_args
from condconv.training.loop import train_model

config, explicit = config_from_args(build_parser().parse_args(sys.argv[1:]))


def on_step(progress):  # a barrier: tell the test we are training, wait until it answers
    if progress.global_step == 1:
        print("training", flush=True)
        sys.stdin.readline()


result = train_model(config, explicit=explicit, on_step=on_step)
print("done", result.steps, flush=True)
"""


def test_second_process_on_a_run_folder_is_refused_naming_the_first(tmp_path, capsys, cli_error):
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-c", _HOLD_AT_STEP, *args], env=_env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = first.stdout.readline()
        assert line.strip() == "training", first.stderr.read()[-3000:]
        before = _snapshot(out)
        # a second run into the same folder, fresh or resumed, stops before touching anything
        for argv in (args, ["train", "--resume", str(out), "--no-progress"]):
            assert main(argv) == 2
            message = cli_error("train")
            assert f"run folder {out} is in use by process {first.pid} on {socket.gethostname()}" in message
        assert _snapshot(out) == before
        first.stdin.write("\n")
        first.stdin.flush()
        stdout, stderr = first.communicate(timeout=600)
    finally:
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, stderr[-3000:]
    assert stdout.split() == ["done", "4"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "epoch"] == [2, 4]  # one run's log, not two interleaved
    assert latest_checkpoint(out).name == "step-00000004"
    assert (out / ".lock").read_text() == ""  # released


def test_sweep_folder_is_locked_and_a_stale_lock_is_taken_over(tmp_path, capsys, caplog, cli_error):
    folder = tmp_path / "sweep"
    with folder_lock(folder, "sweep folder"):
        assert main(["sweep", "--widths", "0.25", "--experts", "1", "--seeds", "0", *TINY[4:], "--epochs", "1",
                     "--out", str(folder)]) == 2  # fmt: skip
        assert f"sweep folder {folder} is in use by process {os.getpid()}" in cli_error("sweep")
        with pytest.raises(FolderBusyError, match="in use by process"):
            with folder_lock(folder):
                pass
    # a lock file left by a process that was killed: taken over with a warning naming it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(f"pid={dead.pid} host={socket.gethostname()} started=2020-01-01T00:00:00\n")
    with caplog.at_level(logging.WARNING, logger="condconv"), folder_lock(folder, "sweep folder"):
        assert f"pid={os.getpid()} " in (folder / ".lock").read_text()
    assert f"taking over the lock of process {dead.pid}" in caplog.text and "no longer running" in caplog.text


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="condconv"), folder_lock(tmp_path / "nfs", "run folder") as folder:
        assert folder == tmp_path / "nfs"
    assert "cannot lock it" in caplog.text


# ------------------------------------------------------------------------------------------------ non-finite values
def test_exploding_run_never_writes_a_non_finite_checkpoint(tmp_path, capsys, cli_error):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "3", "--lr", "1e6", "--checkpoint-every", "1", "--out", str(out)]) == 2
    message = cli_error("train")
    assert re.search(r"non-finite (loss \(\w+\)|values in \S+) at epoch \d+, step \d+: training stopped; last good "
                     r"checkpoint: ", message), message
    named = message.split("last good checkpoint: ")[1].split(" (")[0]
    assert Path(named) == latest_checkpoint(out) and _finite(Path(named))
    for ck in (out / "checkpoints").glob("step-*"):  # every checkpoint on disk, not only the named one
        assert _finite(ck), ck
    assert not (out / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ resume
def test_resume_never_rewrites_history(tmp_path, capsys, cli_error):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    # fewer epochs than already trained: refused, nothing touched
    assert main(["train", "--resume", str(run), "--epochs", "1", "--no-progress"]) == 2
    assert "--epochs must be >= 2 to resume" in cli_error("train")
    with pytest.raises(OptionError, match=r"^epochs must be >= 2 to resume .*already trained 2 of its 2 epochs"):
        train_model(TrainConfig(resume=str(run), epochs=1, progress=False))
    assert _snapshot(run) == before
    # the same epochs: the run is finished, nothing is trained or written
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _snapshot(run) == before
    # more epochs extend the run, recorded as a segment; the cosine is recomputed for the new length
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    rows = [r.split(",") for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert [r[:2] for r in rows] == [["1", "2"], ["2", "4"], ["3", "6"], ["4", "8"]]  # no epoch logged twice
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["epochs"] == 4 and config["resume"] is None
    assert [(s["epochs"], s["from_step"]) for s in config["segments"]] == [(2, 0), (4, 4)]
    assert float(rows[1][2]) == 0.0 < float(rows[2][2])  # lr: the end of the first cosine, then the new one
    # options that define the model may not change
    assert main(["train", "--resume", str(run), "--epochs", "5", "--width", "0.5", "--no-progress"]) == 2
    assert "--width cannot change when a run is resumed" in cli_error("train")
    with pytest.raises(OptionError, match=r"^width cannot change .* start from it with init\)"):
        train_model(TrainConfig(resume=str(run), epochs=5, width=0.5, progress=False))


# ------------------------------------------------------------------------------------------------ images
def _image_tree(root: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    for split, n in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")


def _truncate(path: Path) -> None:
    """Keep the header, drop half of the pixel data: the file opens, and fails only when decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


IMAGE_ARGS = ["--image-size", "16", "--width", "0.25", "--experts", "2", "--batch-size", "2", "--epochs", "1",
              "--workers", "2", "--no-progress"]  # fmt: skip


def test_unreadable_images_are_all_reported_before_the_first_step(tmp_path, capsys, caplog, cli_error):
    from PIL import Image

    data = tmp_path / "data"
    _image_tree(data, np.random.default_rng(0))
    (data / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (data / "val" / "b" / "bad.png").write_bytes(b"not an image")
    (data / "val" / "c").mkdir()  # a class only in val/
    Image.new("RGB", (20, 20)).save(data / "val" / "c" / "0.png")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="condconv"):
        assert main(["train", "--dataset", str(data), *IMAGE_ARGS, "--out", str(out)]) == 2
    message = cli_error("train")
    assert "2 image file(s) cannot be read (1 of 9 train, 1 of 5 test)" in message
    assert str(data / "train" / "a" / "bad.jpg") in message and str(data / "val" / "b" / "bad.png") in message
    assert "--skip-bad-images" in message and not (out / "checkpoints").exists()
    assert "class folder(s) c are not in" in caplog.text
    with pytest.raises(OptionError, match=r"pass skip_bad_images to go on"):
        train_model(TrainConfig(dataset=str(data), image_size=16, epochs=1, batch_size=2, workers=0, progress=False,
                                out=str(tmp_path / "api")))  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="condconv"):
        assert main(["train", "--dataset", str(data), *IMAGE_ARGS, "--skip-bad-images", "--out", str(out)]) == 0
    assert "leaving out 2 unreadable image file(s)" in caplog.text
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["eval"]["images"] == 4


@pytest.mark.parametrize("split", ["train", "val"])
def test_image_that_fails_only_when_decoded_in_a_worker_is_named_in_one_line(tmp_path, capsys, split, cli_error):
    data = tmp_path / "data"
    _image_tree(data, np.random.default_rng(1))
    bad = data / split / "b" / "1.png"
    good = bad.read_bytes()
    _truncate(bad)
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(data), *IMAGE_ARGS, "--out", str(out)]) == 2
    assert cli_error("train").startswith(f"condconv train: error: cannot decode image file {bad}: image file is "
                                              "truncated")
    if split == "val":  # the epoch was saved before its evaluation: fixing the file and resuming loses nothing
        assert latest_checkpoint(out).name == "step-00000004" and not (out / "model.safetensors").exists()
        bad.write_bytes(good)
        assert main(["train", "--resume", str(out), "--no-progress"]) == 0
        assert [line.split(",")[:2] for line in (out / "log.csv").read_text().splitlines()[1:]] == [["1", "4"]]


def test_default_workers_fit_the_machine():
    assert default_workers() == min(4, os.cpu_count() or 1)
    assert TrainConfig().workers is None
    assert EpochLoader(build_dataset("digits", "test"), 8, num_workers=None).num_workers == default_workers()


# ------------------------------------------------------------------------------------------------ unwritable outputs
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A loadable (untrained) checkpoint: a weights file with its config."""
    args = {"num_classes": 10, "in_chans": 1, "width_mult": 0.25, "conv": "condconv", "num_experts": 2}
    path = tmp_path_factory.mktemp("ck") / "model.safetensors"
    config = {**TrainConfig().to_dict(), "model_args": args, "num_classes": 10, "in_chans": 1, "image_size": 32}
    return save_weights(create_model("mobilenet_v1_cifar", **args), path, config)


# command, its arguments with OUT for the output, the function that does its work (must not be reached)
UNWRITABLE = [
    ("train", ["--out", "OUT/run", *TINY, "--epochs", "1"], "condconv.training.loop.build_dataset"),
    ("eval", ["CK", "--json", "OUT/eval.json", "--no-progress"], "condconv.cli.commands.eval.evaluate_checkpoint"),
    ("routing", ["CK", "--out", "OUT/routing", "--no-progress"], "condconv.cli.commands.routing.routing_statistics"),
    ("export", ["CK", "--out", "OUT/m.onnx"], "condconv.cli.commands.export.export_model"),
    ("convert", ["CK", "--out", "OUT/cc"], "condconv.cli.commands.convert.convert"),
    ("sweep", ["--out", "OUT/sweep", "--widths", "0.25", "--experts", "1", "--seeds", "0"],
     "condconv.cli.commands.sweep.sweep_grid"),
    ("bench", ["--csv", "OUT/bench.csv", "--shapes", "2", "--batch", "2", "--rounds", "1"],
     "condconv.cli.commands.bench.bench_layers"),
    ("macs", ["resnet18", "--csv", "OUT/macs.csv"], "condconv.cli.commands.macs.count_macs"),
]  # fmt: skip


def _never(*args, **kwargs):
    raise AssertionError("the command started its work before checking that it can write its output")


@pytest.mark.parametrize("command,args,work", UNWRITABLE, ids=[c[0] for c in UNWRITABLE])
def test_unwritable_output_fails_first_in_one_line(command, args, work, checkpoint, tmp_path, capsys, monkeypatch,
                                                   cli_error):
    blocker = tmp_path / "a-file"  # a path under a regular file: fails for root too
    blocker.write_text("")
    monkeypatch.setattr(work, _never)
    argv = [command, *(a.replace("OUT", str(blocker)).replace("CK", str(checkpoint)) for a in args)]
    assert main(argv) == 2
    assert f"cannot write {blocker}/" in (message := cli_error(command)), message
    assert message.endswith(f"{blocker} is a file, not a folder"), message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders: the path-under-a-file case covers root")
@pytest.mark.parametrize("command,args,work", UNWRITABLE, ids=[c[0] for c in UNWRITABLE])
def test_read_only_folder_fails_first_in_one_line(command, args, work, checkpoint, tmp_path, capsys, monkeypatch,
                                                  cli_error):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    monkeypatch.setattr(work, _never)
    try:
        argv = [command, *(a.replace("OUT", str(folder)).replace("CK", str(checkpoint)) for a in args)]
        assert main(argv) == 2
        assert "permission denied" in cli_error(command)
    finally:
        folder.chmod(0o700)


def test_writable_checks_name_what_is_wrong_and_create_nothing(tmp_path, capsys, cli_error):
    with pytest.raises(OutputError, match=r"^cannot write .*: it is a folder$"):
        check_writable(tmp_path)  # a file to be written that is a folder
    assert str(check_writable(tmp_path / "new" / "x.json")).endswith("x.json")
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert cli_error("train").endswith(f"no checkpoint to resume: {tmp_path / 'nothing'} does not exist")
    assert main(["eval", str(tmp_path / "nothing"), "--json", str(tmp_path / "new" / "eval.json")]) == 2
    assert cli_error("eval").endswith(f"checkpoint not found: {tmp_path / 'nothing'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder made for an output never written


# ------------------------------------------------------------------------------------------------ full disk
class _FullDisk:
    """``open`` for the checkpoint writer: the ``fail_at``-th ``state.pt`` gets half its bytes, then ENOSPC."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.seen = fail_at, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if Path(path).name != "state.pt":
            return handle
        self.seen += 1
        if self.seen != self.fail_at:
            return handle
        real_write = handle.write

        def write(data):
            real_write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handle.write = write
        return handle


def test_full_disk_during_a_checkpoint_leaves_nothing_behind_and_resume_works(tmp_path, capsys, monkeypatch, cli_error):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint_mod, "open", _FullDisk(fail_at=2), raising=False)
    assert main(["train", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--out", str(out)]) == 2
    message = cli_error("train")
    assert re.fullmatch(rf"condconv train: error: cannot write {re.escape(str(out))}/checkpoints/step-00000002/"
                        r"state\.pt: no space left on the device \([\d.]+ MiB needed, [\d.]+ MiB free on .+\)", message)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    monkeypatch.undo()
    assert main(["train", *TINY, "--epochs", "2", "--checkpoint-every", "1", "--out", str(out), "--resume"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "config.yaml", "log.csv", "log.jsonl",
                                                     "model.safetensors"]  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000004"]


# ------------------------------------------------------------------------------------------------ command line
def test_no_abbreviations_anywhere(capsys):
    parser = build_parser()
    assert parser.allow_abbrev is False
    assert all(sub.allow_abbrev is False for sub in parser.get_default("_commands").values())
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epoch", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "condconv train: error: unrecognized arguments: --epoch 3 (did you mean --epochs?)" in err


@pytest.mark.parametrize("command", [name for name, _ in condconv.cli.COMMANDS])
def test_version_and_verbose_before_or_after_every_subcommand(command, capsys):
    for argv in (["--version", command], [command, "--version"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"condconv {condconv.__version__}"
    for argv in (["-v", command, "--help"], [command, "--help", "-v"], [command, "--verbose", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0


def test_verbose_after_the_subcommand_gives_the_traceback_and_keeps_libraries_quiet(capsys, cli_error):
    assert main(["macs", "resnet5"]) == 2
    assert "did you mean 'resnet50'" in cli_error("macs")
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        main(["macs", "resnet5", "-v"])
    assert logging.getLogger("condconv").getEffectiveLevel() == logging.DEBUG
    for name in ("matplotlib", "PIL"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
    logging.getLogger("condconv").setLevel(logging.NOTSET)


@pytest.mark.parametrize("argv,message", [
    (["routing", "x", "--max-images", "0"], "argument --max-images: expected a positive int, got 0"),
    (["bench", "--batch", "0"], "argument --batch: expected a positive int, got 0"),
    (["train", "--lr", "-1"], None),
])  # fmt: skip
def test_bad_values_are_named_by_their_flag(argv, message, capsys, cli_error):
    if message is None:
        assert main(argv) == 2
        assert cli_error(argv[0]) == "condconv train: error: --lr must be a positive number, got -1.0"
        return
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_python_errors_name_arguments_not_flags(tmp_path):
    with pytest.raises(OptionError, match=r"^lr must be a positive number, got -1"):
        train_model(lr=-1)
    with pytest.raises(OptionError, match=r"^train_size must be"):
        train_model(train_size=0)
    with pytest.raises(OptionError, match=r"^data_dir is needed for dataset 'cifar10'"):
        build_dataset("cifar10")
    with pytest.raises(ValueError, match=r"^max_images must be a positive int"):
        routing_statistics(create_model("mobilenet_v1_cifar", conv="condconv"), [], 10, max_images=0)
    with pytest.raises(OptionError, match=r"^resume needs the run folder: pass it as resume or as out"):
        train_model(resume="auto")


def test_library_messages_do_not_mention_flags():
    """Flags belong to the command line: the library's error messages speak of arguments (the CLI rewrites them)."""
    package = SRC / "condconv"
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "commands" or path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = " ".join(c.value for c in ast.walk(node.exc)
                                if isinstance(c, ast.Constant) and isinstance(c.value, str))
                if re.search(r"(?<![\w-])--[a-z]", text):
                    found.append(f"{path.relative_to(package)}:{node.lineno}: {text[:80]}")
    assert not found, found


# ------------------------------------------------------------------------------------------------ pickles
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_that_would_run_code_are_refused_in_one_line(tiny_run, tmp_path, capsys, cli_error):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "state_dict": {"x": _RunsCode(marker)}}, evil)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copy(evil, latest_checkpoint(run) / "state.pt")
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 2
    assert cli_error("train") == (
        f"condconv train: error: refusing to load training state {latest_checkpoint(run)}/state.pt: it holds objects "
        "other than tensors, numbers and plain containers (posix.system), which are never loaded")
    assert main(["convert", "resnet18_cifar", "--weights", str(evil), "--out", str(tmp_path / "cc")]) == 2
    assert cli_error("convert").startswith(f"condconv convert: error: refusing to load weights file {evil}: ")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ many processes
@pytest.mark.slow
def test_ddp_resume_evaluates_the_epoch_left_unevaluated_on_every_rank(tmp_path):
    """A 2-process run stops between an epoch's checkpoint and its evaluation (an image fails to decode); once the
    file is fixed the resumed run evaluates that epoch on both ranks (rank 0 alone would wait forever for rank 1)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not available")
    data = tmp_path / "data"
    _image_tree(data, np.random.default_rng(2))
    bad = data / "val" / "a" / "0.png"
    good = bad.read_bytes()
    _truncate(bad)
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "condconv.cli", "train", "--dataset", str(data), "--image-size", "16", "--width", "0.25", "--experts",
                "2", "--batch-size", "2", "--epochs", "2", "--workers", "0", "--no-progress", "--out", str(out)]
    first = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode != 0 and f"cannot decode image file {bad}" in first.stderr
    assert latest_checkpoint(out).name == "step-00000002"  # epoch 1 (2 steps of 2 x 2 images) was saved
    bad.write_bytes(good)
    second = subprocess.run([*torchrun, "--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [line.split(",") for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert [r[:2] for r in rows] == [["1", "2"], ["2", "4"]] and all(r[7] for r in rows)  # both epochs evaluated
