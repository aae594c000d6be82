"""The Triton kernels compiled offline for sm_90a and sm_80, without a GPU (issue 21).

:mod:`condconv.nn.ops.triton_offline` compiles, in subprocesses with Triton's interpreter off (one per target, run
at once), every kernel launch the launcher plans for a set of representative layers through a stand-in driver, and
reads registers and spills with the ``ptxas -v`` shipped in Triton's wheel. Asserted for every compiled kernel: no
register spills, shared memory within the target's limit, no atomics (the backward is deterministic), and for 16-bit
inputs tensor-core products in the main loops (wgmma for the 2-D implicit GEMMs on sm_90a, mma elsewhere).

The default test compiles every kernel role once per target in 16 bits (``layer_sets()['default']``: small-map
regime with every ODConv attention, large-map regime with its mixing kernel, a stride and 16 experts, depthwise
5x5), 33-43 s with a cold Triton cache on two shared cores. The exhaustive sweep (every layer of
``triton_offline.LAYERS`` x E in {1, 4, 8, 16} x bf16, fp16, fp32, fp64) is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import condconv

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

from condconv.nn.ops.triton_offline import _tensor_core_dots_in_loops, ptxas  # noqa: E402

if ptxas(80) is None or ptxas(90) is None:
    pytest.skip("Triton's wheel ships no ptxas here (needed to compile and to read register use and spills)",
                allow_module_level=True)

DENSE_16BIT = ("forward/small-map", "forward/large-map", "input-grad/small-map", "input-grad/large-map",
               "kernel-grads/dense", "kernel-grads/large-map")
EVERY_ROLE = set(DENSE_16BIT) | {"forward/mix", "input-grad/mix", "forward/depthwise", "input-grad/depthwise",
                                 "kernel-grads/depthwise", "kernel-grads/reduce"}


def _compile(which: str, tmp_path: Path) -> list[dict]:
    """Compile the layer set ``which`` for sm_90a and sm_80, one subprocess per target, both at once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(condconv.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = "import sys; from condconv.nn.ops.triton_offline import write_reports; write_reports(*sys.argv[1:])"
    procs = {}
    for arch in ("90", "80"):
        out = tmp_path / f"{which}-sm{arch}.json"
        procs[out] = subprocess.Popen([sys.executable, "-c", code, which, str(out), arch], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports = []
    for out, proc in procs.items():
        _, stderr = proc.communicate(timeout=3600)
        assert proc.returncode == 0, stderr[-4000:]
        reports += json.loads(out.read_text())
    return reports


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    return _compile("default", tmp_path_factory.mktemp("compile"))


def _check(reports: list[dict]) -> None:
    assert reports
    for r in reports:
        what = f"{r['layer']} {r['dtype']} sm_{r['arch']} {r['role']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{what}: register spills ({r})"
        assert r["shared"] <= r["shared_limit"], f"{what}: {r['shared']} bytes of shared memory"
        assert r["atomics"] == 0, f"{what}: atomics (the backward must be deterministic)"
        if r["dtype"] in ("bfloat16", "float16") and r["role"] in DENSE_16BIT:
            assert r["loop_tensor_core_dots"] >= 1, f"{what}: no tensor-core product in a loop"
            want = "wgmma" if r["arch"] == 90 and r["role"].endswith("large-map") else "mma"
            assert r["instruction"] == want, f"{what}: {r['instruction']} instead of {want}"


def test_every_kernel_compiles_for_sm90a_and_sm80(reports):
    assert {(r["role"], r["arch"]) for r in reports} >= {(role, arch) for role in EVERY_ROLE for arch in (80, 90)}
    assert {r["dtype"] for r in reports} <= {"bfloat16", "float16"}
    _check(reports)


def test_the_loop_detector_sees_dots_in_and_out_of_loops():
    ttgir = """
    %a = tt.dot %x, %y, %z : tensor<16x16xf32, #mma>
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<64x64xf32, #mma>) {
      %d = ttng.warp_group_dot %p, %q, %acc : tensor<64x64xf32, #mma>
      %e = tt.dot %p2, %q2, %acc2 : tensor<16x16xf32, #blocked>
      scf.yield %d
    }
    %f = tt.dot %x, %y, %z : tensor<16x16xf32, #mma>
    """
    assert _tensor_core_dots_in_loops(ttgir) == (1, 2)


@pytest.mark.slow
def test_full_sweep_compiles(tmp_path):
    reports = _compile("full", tmp_path)
    assert {(r["role"], r["arch"]) for r in reports} >= {(role, arch) for role in EVERY_ROLE for arch in (80, 90)}
    assert {r["dtype"] for r in reports} == {"bfloat16", "float16", "float32", "float64"}
    assert {r["experts"] for r in reports} == {1, 4, 8, 16}
    _check(reports)
