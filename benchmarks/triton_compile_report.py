"""What is known of the Triton kernels before a GPU run: compiler reports and an analytic count of expert bytes.

Compiles every kernel launch the launcher plans for the representative layers of
:mod:`condconv.nn.ops.triton_offline` (a stand-in driver, no GPU), for sm_90a and sm_80, and writes a Markdown file with

- per kernel: tiles, warps, pipeline stages, registers, spills, shared memory, the tensor-core instruction in the
  PTX and the atomics count (from Triton and its own ptxas);
- per layer (batch 128, 8 experts, bf16 activations with float32 experts as under autocast): the expert bytes the
  forward and input-gradient kernels load per multiply-add of the convolution, for the new kernels (from the
  launcher's own plan: tiles, example groups, regimes, tap tables) beside the kernels before issue 21 (their tile
  rule: one example per program, ``BM = next_pow2(positions)`` clamped to [16, 128], the experts read in their own
  dtype, float32 under autocast). A count, not a measurement.

Run without Triton's interpreter (``TRITON_INTERPRET`` unset), from the repository root::

    PYTHONPATH=src python benchmarks/triton_compile_report.py                 # the report set, a few minutes
    PYTHONPATH=src python benchmarks/triton_compile_report.py --set full      # every layer x E x dtype (long)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import replace

import torch
import triton

from condconv.nn.ops import triton_launch, triton_offline

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "triton-compile.md")


def _old_bm(rows: int, depthwise: bool) -> int:
    """Rows per program of the pre-issue-21 kernels (one example per program)."""
    return max(16, min(64 if depthwise else 128, triton.next_power_of_2(rows)))


def _taps_fraction(layer) -> float:
    """Mean over the input gradient's stride phases of the share of kernel positions that reach the phase."""
    stride, padding, dilation, _ = layer.geometry()
    _, counts = triton_launch._tap_table((layer.k, layer.k), stride, (padding[2], padding[0]), dilation)
    return sum(counts) / (len(counts) * layer.k * layer.k)


def expert_bytes(layer) -> dict:
    """Expert bytes per multiply-add of the forward and the input gradient, new and old kernels (see module doc)."""
    t = layer.tensors(torch.bfloat16)
    stride, padding, dilation, groups = layer.geometry()
    launches = triton_launch.plan(t["x"], t["weight"], t["routing"], None, t["spatial"], t["in_scale"],
                                  t["out_scale"], stride, padding, dilation, groups,
                                  triton_launch.Target(227 << 10, 132))
    b, e, k = layer.batch, layer.experts, layer.k
    out = (layer.size + 2 * (k // 2) - k) // layer.stride + 1
    positions = out * out
    bank = e * k * k * (layer.cin // groups) * layer.cout  # elements
    macs = b * positions * bank // e
    phases = layer.stride * layer.stride
    rows = (-(-layer.size // layer.stride)) ** 2
    taps = _taps_fraction(layer)
    new = {"forward": 0.0, "input-grad": 0.0}
    workspace = {"forward": 0.0, "input-grad": 0.0}
    regime = {}
    for launch in launches:
        part, kind = launch.role.split("/")
        if part not in new:
            continue
        kw = launch.kwargs
        if kind == "small-map":
            n_mb = -(-(positions if part == "forward" else rows) // kw["BM"])
            reads = n_mb * -(-b // kw["G"]) * bank * (1 if part == "forward" else phases * taps)
            new[part] += reads * 2
            regime[part] = f"small-map G={kw['G']} BM={kw['BM']}"
        elif kind == "mix":
            new[part] += launch.grid[0] * bank * 2  # each example group reads every expert column block once
            regime[part] = "large-map (mix once per 16 examples)"
        elif kind == "large-map":  # the chunk's mixed kernels: written once, read once per row block
            per_example = bank // e * 2
            blocks = -(-(positions if part == "forward" else rows) // kw["BM"]) * (1 if part == "forward" else phases)
            workspace[part] += b * per_example * (1 + blocks * (1 if part == "forward" else taps))
        elif kind == "depthwise":
            rows_ = positions if part == "forward" else rows
            n_mb = -(-rows_ // kw["BM"])
            new[part] += b * n_mb * bank * 2 * (1 if part == "forward" else phases * taps)
            regime[part] = f"depthwise BM={kw['BM']}"
    depthwise = groups == layer.cin
    old = {"forward": b * -(-positions // _old_bm(positions, depthwise)) * bank,
           "input-grad": b * phases * -(-rows // _old_bm(rows, depthwise)) * bank * taps}
    return {"regime": regime, "macs": macs, **{f"workspace {p}": workspace[p] / macs for p in workspace},
            **{f"new {p}": new[p] / macs for p in new},
            **{f"old {p} fp32": 4 * old[p] / macs for p in old},
            **{f"old {p} bf16": 2 * old[p] / macs for p in old}}


def wgrad_bytes(layer) -> dict | None:
    """Large maps' kernel gradients, bf16: operand bytes the kernels load per multiply-add (loads issued, before
    caches), the per-kernel-position kernel before this change (``x`` and ``dy`` tiles of ``BC`` x ``BO`` per step)
    beside the per-example implicit GEMM (``BM`` x ``BN`` tiles) plus its float32 workspace (written once, read
    once). None for small maps and depthwise layers (unchanged)."""
    t = layer.tensors(torch.bfloat16)
    stride, padding, dilation, groups = layer.geometry()
    launches = triton_launch.plan(t["x"], t["weight"], t["routing"], None, t["spatial"], t["in_scale"],
                                  t["out_scale"], stride, padding, dilation, groups,
                                  triton_launch.Target(227 << 10, 132))
    panel = [launch.kwargs for launch in launches if launch.role == "kernel-grads/large-map"]
    if not panel:
        return None
    out = (layer.size + 2 * (layer.k // 2) - layer.k) // layer.stride + 1
    eb = triton_launch._experts_block(layer.experts, torch.float32)
    old = triton_launch._wgrad_tiles(layer.cout // groups, layer.cin // groups, out * out, eb, torch.bfloat16)
    bm, bn = panel[0]["BM"], panel[0]["BN"]
    return {"old": 2 * (old["BC"] + old["BO"]) / (old["BC"] * old["BO"]), "old tiles": f"BC={old['BC']} BO={old['BO']}",
            "new": 2 * (bm + bn) / (bm * bn), "new tiles": f"BM={bm} BN={bn}", "workspace": 8 / (out * out)}


def _wgrad_rows() -> list[str]:
    rows = ["| layer | positions | before: tiles | bytes/MAC | now: tiles | bytes/MAC | + workspace | ratio |",
            "|---" * 8 + "|"]
    for layer in triton_offline.LAYERS.values():
        c = wgrad_bytes(replace(layer, experts=8, batch=128))
        if c is None:
            continue
        out = (layer.size + 2 * (layer.k // 2) - layer.k) // layer.stride + 1
        new = c["new"] + c["workspace"]
        rows.append(f"| {layer.name} | {out}x{out} | {c['old tiles']} | {c['old']:.4f} | {c['new tiles']} | "
                    f"{c['new']:.4f} | {c['workspace']:.4f} | {c['old'] / new:.1f}x |")
    return rows


def _kernel_rows(reports: list[dict]) -> list[str]:
    rows = ["| layer | dtype | E | sm | role | kernel | tiles | warps | stages | registers | spills (B) | shared (B) |"
            " instruction | loop TC dots | atomics |", "|---" * 15 + "|"]
    for r in reports:
        tiles = " ".join(f"{k}={v}" for k, v in r["tiles"].items())
        rows.append(f"| {r['layer']} | {r['dtype']} | {r['experts']} | {r['arch']} | {r['role']} | `{r['kernel']}` | "
                    f"{tiles} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                    f"{r['spill_stores'] + r['spill_loads']} | {r['shared']} | {r['instruction']} | "
                    f"{r['loop_tensor_core_dots']}/{r['loop_dots']} | {r['atomics']} |")
    return rows


def _bytes_rows() -> list[str]:
    rows = ["| layer | positions | forward regime | fwd new | fwd old (fp32 experts) | ratio | ratio, old in bf16 |"
            " input-grad regime | igrad new | igrad old (fp32 experts) | ratio | ratio, old in bf16 |"
            " large-map workspace fwd / igrad |", "|---" * 13 + "|"]
    for layer in triton_offline.LAYERS.values():
        layer = replace(layer, experts=8, batch=128)
        c = expert_bytes(layer)
        out = (layer.size + 2 * (layer.k // 2) - layer.k) // layer.stride + 1
        cells = [layer.name, f"{out}x{out}"]
        for part in ("forward", "input-grad"):
            new, old32, old16 = c[f"new {part}"], c[f"old {part} fp32"], c[f"old {part} bf16"]
            cells += [c["regime"].get(part, "?"), f"{new:.4f}", f"{old32:.4f}", f"{old32 / new:.1f}x",
                      f"{old16 / new:.1f}x"]
        cells.append(f"{c['workspace forward']:.4f} / {c['workspace input-grad']:.4f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=tuple(triton_offline.layer_sets()), default="report")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    reports = []
    for layer, dtype in triton_offline.layer_sets()[args.set]:
        for arch in (90, 80):
            reports += triton_offline.compile_layer(layer, dtype, arch)
    lines = [
        "# Triton kernels: what is known before a GPU run",
        "",
        f"Written by `benchmarks/triton_compile_report.py --set {args.set}` on {datetime.date.today()} with Triton "
        f"{triton.__version__} and torch {torch.__version__}, without a GPU (a stand-in driver; registers and spills "
        "from Triton's own `ptxas -v`). Nothing here is a timing.",
        "",
        "## Compiler reports per kernel",
        "",
        "`loop TC dots`: tensor-core dots inside loops / all dots inside loops (the kernel-gradient kernel's other two "
        "loop dots are the exact float32 reductions over experts and examples, on FMA units). Large maps' kernel "
        "gradients: `kernel-grads/large-map` is each example's kernel gradient for all kernel positions, one implicit "
        "GEMM over its positions into a workspace (a 2-D product: wgmma on sm_90a), `kernel-grads/reduce` the "
        "reductions over groups of examples reading it (float32, FMA units). `tiles`: `G` examples "
        "per program, `BM` rows (positions) x `BN` channels per example, `BK` the reduction step, `EB` the experts "
        "padded to what `tl.dot` needs. `instruction`: the "
        "tensor-core instruction in the PTX (`wgmma` on sm_90a for the 2-D implicit GEMMs; Triton lowers the batched "
        "3-D products of the small-map kernels to `mma` on both targets). `atomics`: 0 everywhere: the backward is "
        "deterministic.",
        "",
        *_kernel_rows(reports),
        "",
        "## Expert bytes loaded per multiply-add (batch 128, 8 experts, bf16 activations)",
        "",
        "Counted from the launcher's plan (tiles, example groups G, regimes, the stride phases' valid taps), "
        "multiply-adds of the convolution only. New kernels read a bf16 copy of the experts in their layout; the "
        "old ones read the experts in their own dtype (float32 under autocast; the `old in bf16` ratio assumes "
        "bf16 experts for both). In the large-map regime the experts are read once per 16 examples by the mixing "
        "kernel, and the mixed kernels then travel through an L2-sized workspace: its bytes per multiply-add "
        "(written once, read once per row block) are the last column, 0 for the small-map regime, which has none. "
        "In the small-map regime one program's expert tile serves `G * BM` rows: the launcher takes `BM` as the "
        "whole map where it can (up to 256 rows) and then the largest `G` within 16384 float32 accumulators, so a "
        "7x7 map runs 16 examples x 64 rows and a 14x14 map 4 examples x 256 rows per program. "
        "Depthwise "
        "kernels are unchanged in structure (one example per program): only the dtype of the copy differs.",
        "",
        *_bytes_rows(),
        "",
        "## Kernel gradients of large maps: operand bytes loaded per multiply-add (bf16)",
        "",
        "Loads issued by the kernels per multiply-add of the kernel gradient (before caches), from the tiles the "
        "launcher plans. Before: one program per kernel position, `x` and `dy` tiles of `BC` input x `BO` output "
        "channels per step, the input re-read for every kernel position. Now: each example's kernel gradient for "
        "all kernel positions by one implicit GEMM with `BM` rows (kernel position, channel) x `BN` output channels, "
        "plus its float32 workspace (written once, read once by the reductions over groups of examples: 8 bytes "
        "per element, each element a sum over the example's positions). Small maps keep the kernel of before.",
        "",
        *_wgrad_rows(),
        "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {args.out} ({len(reports)} kernels)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
