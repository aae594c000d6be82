"""Latency of dynamic convolution layers per execution strategy, as ratios to a static ``nn.Conv2d``.

Every configuration (layer shape, experts, batch, mode) is timed round-robin: one call of each candidate per
round, so slow drifts of the machine hit all candidates alike; the figure kept is each candidate's median, divided
by the static convolution's median from the same rounds. ``condconv bench layers`` writes the rows as CSV.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condconv.nn.functional import select_strategy
from condconv.nn.layers import LAYERS, CondConv2d, ODConv2d
from condconv.utils.fileio import atomic_output

__all__ = ["LayerShape", "BENCH_SHAPES", "BenchRow", "bench_layers", "odconv_reference_loop", "folded_baseline",
           "format_table", "geomean", "write_csv", "timed", "round_robin"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """One convolution of the benchmark: ``name`` is how tables show it."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    size: int
    groups: int = 1

    @property
    def padding(self) -> int:
        return self.kernel_size // 2


BENCH_SHAPES = (
    LayerShape("1x1 512->512 @14", 512, 512, 1, 14),
    LayerShape("1x1 1024->1024 @7", 1024, 1024, 1, 7),
    LayerShape("dw3x3 512 @14", 512, 512, 3, 14, groups=512),
    LayerShape("3x3 64->64 @56", 64, 64, 3, 56),
    LayerShape("3x3 256->256 @14", 256, 256, 3, 14),
)

STRATEGY_CANDIDATES = ("grouped", "experts", "bmm", "single", "scan", "auto")


@dataclass
class BenchRow:
    shape: str
    kind: str
    strategy: str
    resolved: str
    num_experts: int
    batch: int
    mode: str
    median_ms: float
    ratio_to_static: float
    rounds: int


def odconv_reference_loop(layer: ODConv2d, x: Tensor) -> Tensor:
    """ODConv as the per-example loop of the ODConv reference code computes it: a Python loop over the batch, the
    full four-way attention product multiplied into a kernel per example, then one convolution per example. For
    benchmarking only."""
    outs = []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        att = layer.router(xb)
        kernel = layer.weight
        if att.spatial is not None:
            kernel = kernel * att.spatial[0][None, None, None]
        if att.in_channel is not None:
            per_group = layer.in_channels // layer.groups
            idx = (torch.arange(layer.out_channels)[:, None] // (layer.out_channels // layer.groups)) * per_group \
                + torch.arange(per_group)[None, :]
            kernel = kernel * att.in_channel[0][idx][None, :, :, None, None]
        if att.out_channel is not None:
            kernel = kernel * att.out_channel[0][None, :, None, None, None]
        if att.expert is not None:
            kernel = kernel * att.expert[0][:, None, None, None, None]
        outs.append(F.conv2d(xb, kernel.sum(0), None, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs, 0)


def folded_baseline(layer: CondConv2d, x: Tensor) -> Tensor:
    """The usual batch-folded CondConv (the paper's method, as most implementations write it): mix every example's
    kernel into a fresh tensor, fold the batch into channels, one grouped convolution. For comparison."""
    batch, channels, height, width = x.shape
    kernels = torch.matmul(layer.router(x), layer.weight.reshape(layer.num_experts, -1))
    out = F.conv2d(x.reshape(1, batch * channels, height, width),
                   kernels.reshape(batch * layer.out_channels, *layer.weight.shape[2:]), None, layer.stride,
                   layer.padding, layer.dilation, batch * layer.groups)
    out = out.reshape(batch, layer.out_channels, *out.shape[-2:])
    if layer.bias is not None:
        out = out + torch.matmul(layer.router(x), layer.bias)[:, :, None, None]
    return out


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_robin(candidates: dict[str, Callable[[], object]], min_rounds: int, max_rounds: int,
                budget_s: float, timer: Callable[[Callable[[], object]], float] = timed,
                warmup: int = 1) -> tuple[dict[str, float], int]:
    """Each candidate once per round, for at least ``min_rounds`` rounds and ``budget_s`` seconds (at most
    ``max_rounds``): ``({name: median seconds}, rounds)``. ``timer(fn)`` returns one call's seconds."""
    for _ in range(warmup):  # warm-up (allocator, caches, one-time dispatch)
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name, fn in candidates.items():
            samples[name].append(timer(fn))
        rounds += 1
    return {name: statistics.median(v) for name, v in samples.items()}, rounds


def _step(module: nn.Module, x: Tensor, mode: str, call: Callable[[nn.Module, Tensor], Tensor] | None = None):
    call = call or (lambda m, inp: m(inp))

    def run() -> None:
        if mode == "forward":
            with torch.no_grad():
                call(module, x)
        else:
            module.zero_grad(set_to_none=True)
            if x.grad is not None:
                x.grad = None
            call(module, x).sum().backward()
    return run


def bench_layers(shapes: Iterable[LayerShape] = BENCH_SHAPES, experts: Iterable[int] = (4, 8),
                 batches: Iterable[int] = (1, 8, 32, 128), modes: Iterable[str] = ("forward", "train"),
                 kinds: Iterable[str] = ("condconv", "dynamic", "odconv"),
                 strategies: Iterable[str] = STRATEGY_CANDIDATES,
                 reference_loop: bool = False, min_rounds: int = 5, max_rounds: int = 50, budget_s: float = 2.0,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True) -> list[BenchRow]:
    """Time every (shape, experts, batch, mode): a static conv, CondConv2d per strategy, the other kinds on
    ``auto``, and optionally the per-example loop of the ODConv reference code. Returns one :class:`BenchRow` per
    candidate."""
    from tqdm.auto import tqdm

    shapes, experts, batches, modes = list(shapes), list(experts), list(batches), list(modes)
    kinds, strategies = list(kinds), list(strategies)
    for mode in modes:
        if mode not in ("forward", "train"):
            raise ValueError(f"modes must be 'forward' and/or 'train', got {mode!r}")
    configs = [(s, e, b, m) for s in shapes for e in experts for b in batches for m in modes]
    rows: list[BenchRow] = []
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for shape, num_experts, batch, mode in tqdm(configs, desc="bench layers", disable=not progress):
        args = (shape.in_channels, shape.out_channels, shape.kernel_size, 1, shape.padding, 1, shape.groups)
        x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device=device, dtype=dtype,
                        requires_grad=(mode == "train"))
        static = nn.Conv2d(*args).to(device, dtype)
        candidates: dict[str, Callable[[], object]] = {"static": _step(static, x, mode)}
        layers: dict[str, nn.Module] = {}
        for kind in kinds:
            cls = LAYERS[kind]
            layer = cls(*args, num_experts=num_experts).to(device, dtype)
            layers[kind] = layer
            for strategy in (strategies if kind == "condconv" else ["auto"]):
                if strategy == "single" and batch != 1:
                    continue
                layer_strategy = strategy

                def call(m, inp, s=layer_strategy):
                    m.strategy = s
                    return m(inp)
                candidates[f"{kind}:{strategy}"] = _step(layer, x, mode, call)
        if "condconv" in layers:
            candidates["folded-baseline"] = _step(layers["condconv"], x, mode, folded_baseline)
        if reference_loop and "odconv" in layers:
            candidates["odconv:reference-loop"] = _step(layers["odconv"], x, mode, odconv_reference_loop)
        synced = {name: (lambda fn=fn: (fn(), sync())) for name, fn in candidates.items()}
        medians, rounds = round_robin(synced, min_rounds, max_rounds, budget_s)
        base = medians["static"]
        resolved_auto = select_strategy(batch, shape.in_channels, shape.out_channels,
                                        (shape.kernel_size, shape.kernel_size), shape.groups, num_experts,
                                        (shape.size, shape.size), spatial=False, device=device,
                                        training=mode == "train")
        for name, median in medians.items():
            kind, _, strategy = name.partition(":")
            strategy = strategy or kind
            resolved = resolved_auto if strategy == "auto" else strategy
            rows.append(BenchRow(shape.name, kind, strategy, resolved, num_experts, batch, mode, median * 1e3,
                                 median / base, rounds))
    return rows


def write_csv(rows: list[BenchRow], path: str) -> None:
    """The rows as CSV (written atomically)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0]).keys()) if rows else ["shape"])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _column(row: BenchRow) -> str:
    return row.kind if row.kind == row.strategy else f"{row.kind}:{row.strategy}"


def format_table(rows: list[BenchRow], num_experts: int, batch: int, mode: str) -> str:
    """Markdown table of ratios to static for one (experts, batch, mode): shapes down, candidates across."""
    sel = [r for r in rows if r.num_experts == num_experts and r.batch == batch and r.mode == mode]
    if not sel:
        return ""
    shapes = list(dict.fromkeys(r.shape for r in sel))
    cols = [c for c in dict.fromkeys(_column(r) for r in sel) if c != "static"]
    lookup = {(r.shape, _column(r)): r for r in sel}
    lines = [f"| {mode}, E={num_experts}, B={batch} | static ms | " + " | ".join(cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for shape in shapes:
        cells = []
        for c in cols:
            r = lookup.get((shape, c))
            if r is None:
                cells.append("")
            else:
                cells.append(f"{r.ratio_to_static:.2f}" + (f" ({r.resolved})" if r.strategy == "auto" else ""))
        static_ms = lookup[(shape, "static")].median_ms
        lines.append(f"| {shape} | {static_ms:.2f} | " + " | ".join(cells) + " |")
    gm = []
    for c in cols:
        vals = [lookup[(s, c)].ratio_to_static for s in shapes if (s, c) in lookup]
        gm.append(f"{geomean(vals):.2f}" if len(vals) == len(shapes) else "")
    lines.append("| geometric mean | | " + " | ".join(gm) + " |")
    return "\n".join(lines)
