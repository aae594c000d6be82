"""The layer benchmark runs end to end, and its baselines compute what the layers compute (fair comparisons)."""

from __future__ import annotations

import csv

import pytest
import torch

import condconv
from condconv.bench.layers import folded_baseline, format_table, geomean, odconv_reference_loop
from condconv.cli import main


def test_folded_baseline_equals_condconv():
    torch.manual_seed(0)
    layer = condconv.CondConv2d(8, 12, 3, stride=2, padding=1, groups=2, num_experts=3)
    x = torch.randn(4, 8, 9, 9)
    torch.testing.assert_close(folded_baseline(layer, x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,out", [(1, 16), (2, 16), (8, 8)])
def test_reference_loop_equals_odconv(groups, out):
    torch.manual_seed(0)
    layer = condconv.ODConv2d(8, out, 3, padding=1, groups=groups, num_experts=3, bias=False)
    x = torch.randn(3, 8, 6, 6)
    torch.testing.assert_close(odconv_reference_loop(layer, x), layer(x), rtol=1e-5, atol=1e-5)


def test_bench_cli_writes_csv_and_tables(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    threads = torch.get_num_threads()
    code = main(["bench", "layers", "--shapes", "2", "--experts", "2", "--batch", "2", "--modes", "forward", "train",
                 "--rounds", "1", "--budget", "0", "--threads", str(threads + 1), "--reference-loop", "--csv",
                 str(out)])
    assert code == 0
    assert torch.get_num_threads() == threads  # --threads is undone for the calling process
    rows = list(csv.DictReader(out.open()))
    names = {(r["kind"], r["strategy"], r["mode"]) for r in rows}
    for mode in ("forward", "train"):
        for expected in [("static", "static"), ("condconv", "grouped"), ("condconv", "bmm"), ("condconv", "auto"),
                         ("dynamic", "auto"), ("odconv", "auto"), ("odconv", "reference-loop"),
                         ("folded-baseline", "folded-baseline")]:
            assert (*expected, mode) in names
    assert all(float(r["median_ms"]) > 0 for r in rows)
    static = [r for r in rows if r["kind"] == "static"]
    assert all(float(r["ratio_to_static"]) == 1.0 for r in static)
    printed = capsys.readouterr().out
    assert "| forward, E=2, B=2 |" in printed and "geometric mean" in printed


def test_bench_rejects_bad_shape_index(tmp_path):
    assert main(["bench", "--shapes", "9", "--csv", str(tmp_path / "x.csv")]) == 2


def test_format_table_and_geomean():
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert format_table([], 8, 32, "forward") == ""
