"""``condconv sweep`` (grid, CSVs, figure, resumability) and ``condconv routing`` (per-class routing analysis)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import condconv
from condconv.cli import main
from condconv.training.analysis import routing_statistics
from condconv.training.sweep import summarize_runs

GRID = ["--widths", "0.25", "--experts", "1", "2", "--seeds", "0", "1", "--train-size", "32", "--epochs", "1",
        "--batch-size", "16", "--no-progress"]  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "grid"
    assert main(["sweep", *GRID, "--out", str(out)]) == 0
    return out


def test_sweep_writes_raw_and_summary_csv_and_figure(sweep_dir):
    runs = _rows(sweep_dir / "runs.csv")
    assert sorted((r["experts"], r["seed"]) for r in runs) == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    assert {r["conv"] for r in runs if r["experts"] == "1"} == {"static"}  # 1 expert = the static baseline
    assert {r["conv"] for r in runs if r["experts"] == "2"} == {"condconv"}
    summary = _rows(sweep_dir / "summary.csv")
    assert [s["experts"] for s in summary] == ["1", "2"] and all(s["n"] == "2" for s in summary)
    static, cc = summary
    assert int(cc["params"]) > int(static["params"]) and int(cc["macs"]) > int(static["macs"])
    for s in summary:
        seeds = [float(r["top1"]) for r in runs if r["experts"] == s["experts"]]
        assert float(s["top1_mean"]) == pytest.approx(np.mean(seeds), abs=1e-3)
        assert float(s["top1_std"]) == pytest.approx(np.std(seeds, ddof=1), abs=1e-3)
        assert len(s["top1_per_seed"].split(";")) == 2
    png = (sweep_dir / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # each run keeps its final weights; checkpoints are removed once the run is recorded
    run = sweep_dir / "runs" / "w0.25_e2_s0"
    assert (run / "model.safetensors").is_file() and not (run / "checkpoints").exists()


def test_sweep_resumes_skipping_finished_runs(sweep_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    import shutil

    shutil.copytree(sweep_dir, out)
    before = (out / "runs.csv").read_text()
    capsys.readouterr()
    assert main(["sweep", *GRID, "--out", str(out)]) == 0
    assert "0 run(s) trained, 4 already done" in capsys.readouterr().out
    assert (out / "runs.csv").read_text() == before
    # forget one run: only that one is trained again, with the same result (same seed, same data)
    lines = before.splitlines()
    dropped = next(line for line in lines if ",0.25,2,1," in line)
    (out / "runs.csv").write_text("\n".join(line for line in lines if line != dropped) + "\n")
    shutil.rmtree(out / "runs" / "w0.25_e2_s1")
    assert main(["sweep", *GRID, "--out", str(out)]) == 0
    assert "1 run(s) trained, 3 already done" in capsys.readouterr().out
    again = next(r for r in _rows(out / "runs.csv") if r["experts"] == "2" and r["seed"] == "1")
    old = next(r for r in _rows(sweep_dir / "runs.csv") if r["experts"] == "2" and r["seed"] == "1")
    assert again["top1"] == old["top1"]
    # other training settings may not be mixed into the same CSV
    assert main(["sweep", *GRID[:-5], "--epochs", "2", "--batch-size", "16", "--no-progress", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_summarize_runs():
    rows = [
        {"model": "m", "conv": "condconv", "width": "0.5", "experts": "4", "seed": str(s), "params": "10",
         "macs": "2000000", "top1": str(v), "top5": "100"}
        for s, v in enumerate([90.0, 92.0, 97.0])
    ]  # fmt: skip
    (s,) = summarize_runs(rows)
    assert s["top1_mean"] == pytest.approx(93.0) and s["top1_std"] == pytest.approx(np.std([90, 92, 97], ddof=1))
    assert s["madds_m"] == 2.0 and s["n"] == 3 and s["top1_per_seed"] == "90.00;92.00;97.00"


def test_routing_cli_on_a_sweep_checkpoint(sweep_dir, tmp_path, capsys):
    out = tmp_path / "routing"
    ck = sweep_dir / "runs" / "w0.25_e2_s0" / "model.safetensors"
    assert main(["routing", str(ck), "--out", str(out), "--no-progress", "--max-images", "300"]) == 0
    rows = _rows(out / "routing.csv")
    layers = sorted({r["layer"] for r in rows})
    assert len(layers) == 15  # the last 7 blocks (depthwise + pointwise) and the classifier
    assert len(rows) == 15 * 10 * 2 and sum(int(r["images"]) for r in rows if r["layer"] == layers[0]) == 300 * 2
    assert all(0.0 <= float(r["mean_weight"]) <= 1.0 for r in rows)  # sigmoid routing
    assert all(0.0 <= float(r["class_dependence"]) <= 1.0 for r in rows)
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert "class dependence" in capsys.readouterr().out
    static = sweep_dir / "runs" / "w0.25_e1_s0"
    assert main(["routing", str(static), "--out", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert "no dynamic layer" in capsys.readouterr().err


class _Tiny(nn.Module):
    """A routed layer and a layer fed external routing (the block-shared case)."""

    def __init__(self) -> None:
        super().__init__()
        self.routed = condconv.CondConv2d(1, 2, 1, num_experts=3)
        self.shared = condconv.CondConv2d(2, 2, 1, num_experts=3, routing="external")

    def external(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x.mean((1, 2, 3)))[:, None] * torch.tensor([1.0, 0.5, 0.25])

    def forward(self, x):
        return self.shared(self.routed(x), routing_weights=self.external(x))


def test_routing_statistics_match_hand_computed_means():
    torch.manual_seed(0)
    model = _Tiny().eval()
    labels = torch.tensor([0, 1, 2] * 8)
    x = labels.view(-1, 1, 1, 1).float() - 1.0 + 0.3 * torch.randn(24, 1, 4, 4)
    batches = [(x[:10], labels[:10]), (x[10:], labels[10:])]
    stats = routing_statistics(model, batches, 3, classes=["a", "b", "c"])
    assert stats.layers == ["routed", "shared"] and stats.num_experts == [3, 3]
    with torch.no_grad():
        per_layer = [model.routed.router(x), model.external(x)]
    for li, r in enumerate(per_layer):
        r = r.double().numpy()
        for c in range(3):
            np.testing.assert_allclose(stats.means[li, c], r[labels.numpy() == c].mean(0), rtol=1e-6)
        grand = r.mean(0)
        between = sum((labels == c).sum().item() * (r[labels.numpy() == c].mean(0) - grand) ** 2 for c in range(3))
        eta2 = np.mean(between / ((r - grand) ** 2).sum(0))
        assert stats.class_dependence[li] == pytest.approx(eta2, rel=1e-6)
    assert stats.counts.tolist() == [8, 8, 8]
    assert 0.5 < stats.class_dependence[1] <= 1.0  # the external routing depends on the class-shifted mean
    with pytest.raises(ValueError, match="no dynamic layer"):
        routing_statistics(nn.Sequential(nn.Conv2d(1, 2, 1)), batches, 3)


@pytest.mark.slow
def test_sweep_under_torchrun_two_gloo_processes(tmp_path):
    """Each grid point is a 2-process DDP run; rank 0 alone writes the CSVs and the figure."""
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not available")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(condconv.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "condconv.cli", "sweep", *GRID[:-3], "--batch-size", "8", "--no-progress", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert len(_rows(out / "runs.csv")) == 4 and (out / "sweep.png").is_file()
    assert proc.stdout.decode().count("run(s) trained") == 1  # printed by rank 0 only
