"""The README as a script: every ```bash block runs, in order, in a fresh folder, and the figures it quotes from
command output are what the commands print.

A block the test cannot run here (data downloads, GPUs, package installs, the test suite itself) is marked by an
HTML comment on the line before it, ``<!-- not run: REASON -->``; the test skips exactly those. Running every other
block takes about half an hour on 2 CPU cores (``condconv sweep`` alone about 10 minutes): marked slow.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import condconv

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SRC = Path(condconv.__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->\s*$")


def readme_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, reason not to run it or None)`` of every bash block, in order."""
    out = []
    for match in _BLOCK.finditer(text):
        line = text[: match.start()].count("\n") + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _NOT_RUN.search(before)
        out.append((line, match.group(1), marker.group(1) if marker else None))
    return out


def _commands(code: str) -> list[str]:
    """The commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


TEXT = README.read_text(encoding="utf-8")
BLOCKS = readme_blocks(TEXT)


def test_blocks_are_found_and_markers_name_a_reason():
    assert len(BLOCKS) >= 8
    for line, _, reason in BLOCKS:
        assert reason is None or len(reason) > 5, f"README.md:{line}: say why the block is not run"
    # a marker must sit right before a block: one anywhere else would silently mark nothing
    markers = re.findall(r"^<!--\s*not run:", TEXT, re.M)
    assert len(markers) == sum(reason is not None for _, _, reason in BLOCKS)


def test_ci_runs_exactly_the_readme_test_command():
    testing = TEXT.split("<!-- SECTION:testing -->")[1]
    readme_command = _commands(_BLOCK.search(testing).group(1))[0]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert readme_command == "python -m pytest" and readme_command in ci
    # then the interop stage, in its own environment, as the README's "Pretrained models" section says
    interop = ci[ci.index(readme_command) + 1:]
    assert interop[-1] == "python -m pytest -m interop tests/test_interop_timm.py" and interop[-1] in TEXT
    assert any("torchvision==" in line and "timm" in line for line in interop)


def _shim(folder: Path) -> Path:
    """A ``condconv`` executable that runs this checkout's package (whatever is installed)."""
    folder.mkdir()
    exe = folder / "condconv"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(SRC))}${{PYTHONPATH:+:$PYTHONPATH}} "
                   f"exec {shlex.quote(sys.executable)} -m condconv.cli \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """Run every bash block not marked 'not run', in order, in one fresh folder; the output of each by line."""
    base = tmp_path_factory.mktemp("readme")
    bin_dir, work = _shim(base / "bin"), base / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(SRC))
    outputs = {}
    for line, code, reason in BLOCKS:
        if reason is not None:
            continue
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True,
                              text=True)
        outputs[line] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README.md:{line} failed:\n{code}\n{outputs[line][-4000:]}"
    return work, outputs


def _output_of(outputs: dict[int, str], command: str) -> str:
    """The output of the block that holds ``command``."""
    for line, code, _ in BLOCKS:
        if line in outputs and command in code:
            return outputs[line]
    raise AssertionError(f"no README block runs {command!r}")


@pytest.mark.slow
def test_readme_commands_run_and_write_only_under_runs(readme_run):
    work, outputs = readme_run
    assert outputs
    left = sorted(p.name for p in work.iterdir())
    assert left == ["runs"], f"the README's commands left {left} outside runs/ (which .gitignore covers)"


@pytest.mark.slow
def test_readme_figures_match_the_commands(readme_run):
    work, outputs = readme_run
    # condconv train: 8 epochs of 37 steps on 1,197 digits
    train = _output_of(outputs, "condconv train --out runs/digits ")
    assert "8 epochs of 37 steps" in TEXT and "1,197 training digits" in TEXT
    assert re.search(r"on digits: top-1 (\d+\.\d+)% .* steps 296 ", train), train[-2000:]
    top1 = float(re.search(r"on digits: top-1 (\d+\.\d+)%", train).group(1))
    low, high = (float(v) for v in re.search(r"reaches (\d+\.?\d*)-(\d+\.?\d*)% top-1", TEXT).groups())
    assert low <= top1 <= high, f"README says {low}-{high}% top-1, condconv train printed {top1}%"
    # resume: 8 -> 12 epochs is a second segment, and the recomputed cosine restarts where the README says
    import yaml

    from condconv.training.optim import WarmupCosine

    segments = yaml.safe_load((work / "runs" / "a" / "config.yaml").read_text())["segments"]
    assert [(s["epochs"], s["from_step"]) for s in segments] == [(8, 0), (12, 296)]
    share = round(100 * WarmupCosine(37, 12 * 37, 0.05, 0.0)(296))
    assert f"12 epochs, to {share}% of the peak" in TEXT
    # condconv eval: the shown output's first line and class counts
    shown = re.search(r"```\n(mobilenet_v1_cifar on digits/test .*?)```", TEXT, re.S).group(1)
    printed = _output_of(outputs, "condconv eval runs/digits ")
    assert shown.splitlines()[0] in printed
    assert re.findall(r"\d: [\d.]+% \((\d+)\)", shown) == re.findall(r"\d: [\d.]+% \((\d+)\)", printed)[:6]
    # condconv sweep: parameters and multiply-adds of the table, the steps, the folder
    sweep = _output_of(outputs, "condconv sweep ")
    for width, experts, params, madds in re.findall(r"^\| (0\.\d+) \| (\d)(?: \(static\))? \| ([\d,]+) \| ([\d.]+)M \|",
                                                    TEXT, re.M):
        assert re.search(rf"^\s*{width} +{experts} +{params} +{madds}M ", sweep, re.M), (width, experts)
    assert "15 epochs of 9 steps" in TEXT
    runs = (work / "runs" / "sweep-mobilenet_v1_cifar-digits" / "runs.csv").read_text().splitlines()
    assert len(runs) == 17 and all(row.split(",")[10] == "135" for row in runs[1:])
    size, files = re.search(r"runs/sweep-mobilenet_v1_cifar-digits: ([\d.]+) MB in (\d+) files", sweep).groups()
    quoted = re.search(r"sweep-mobilenet_v1_cifar-digits/`\s+\(about\s+(\d+)\s+MB\s+in\s+(\d+)\s+files", TEXT)
    assert quoted and int(files) == int(quoted.group(2)) and abs(float(size) - int(quoted.group(1))) <= 1
    # condconv routing: the class dependence rises from the first dynamic layer to the classifier
    routing = _output_of(outputs, "condconv routing runs/digits")
    deps = [float(v) for v in re.findall(r"^\S+ +\d+ +(\d\.\d+)$", routing, re.M)]
    assert len(deps) == 15 and deps[0] < deps[-1]
