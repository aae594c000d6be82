"""Whole-model latency of dynamic-convolution models against their static twins, per runtime and strategy.

Each model of the zoo (CondConv, Yang et al., NeurIPS 2019, arXiv:1904.04971; DynamicConv, Chen et al., CVPR 2020,
arXiv:1912.03458; ODConv, Li et al., ICLR 2022, arXiv:2209.07947) is built twice from the same seed: with its dynamic
layers, and as the *static twin* (``conv='static'``, the same architecture with plain convolutions). Candidates are
timed round-robin, one call each per round, and the figure kept is each candidate's median divided by the static
twin's median **from the same rounds** of the same runtime.

Runtimes: ``eager`` PyTorch (fp32 on the CPU; bf16 autocast, channels_last and CUDA-event timing on CUDA), ``compile``
(``torch.compile``, ``mode='reduce-overhead'`` on CUDA) and ``onnxruntime`` (one thread, the file written by
:func:`condconv.export_model` with its dynamic batch; ``onnxruntime-b1`` the static batch-1 graph; ``onnxruntime-int8``
both models through :func:`~condconv.deploy.quantize.quantize_onnx`).
Modes: ``inference`` (no autograd) and ``train`` (one SGD step: forward, cross-entropy, backward, update). ``mixing
floor`` rows time only what no formulation can avoid at that batch size, reading every expert bank once (``routing @
experts`` per dynamic layer); their ratio, ``(static + mixing) / static``, is the best a dynamic model can reach in
that runtime.

``condconv bench models`` is the command line; ``benchmarks/bench_models.py`` writes CSV + Markdown.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condconv.bench.layers import round_robin, timed
from condconv.models import create_model
from condconv.models.macs import count_macs
from condconv.nn.functional import STRATEGIES, use_strategy
from condconv.nn.layers import DYNAMIC_KINDS, DynamicConvBase
from condconv.utils.checks import positive_int

__all__ = ["ModelSpec", "MODEL_SETS", "ModelRow", "resolve_models", "bench_models", "format_model_table",
           "MODES", "RUNTIMES"]

MODES = ("inference", "train")
RUNTIMES = ("eager", "compile", "onnxruntime")


@dataclass(frozen=True)
class ModelSpec:
    """A zoo model with dynamic convolutions: ``create_model(model, conv=conv, num_experts=num_experts,
    dynamic_blocks=dynamic_blocks)``; its static twin is ``create_model(model)``.

    Written ``MODEL:CONV:EXPERTS[:BLOCKS]`` on the command line, e.g. ``resnet50:odconv:4:all``.
    """

    model: str
    conv: str
    num_experts: int
    dynamic_blocks: str | int | None = None

    @property
    def label(self) -> str:
        blocks = "" if self.dynamic_blocks is None else f" blocks={self.dynamic_blocks}"
        return f"{self.model} {self.conv}-{self.num_experts}{blocks}"

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        parts = text.split(":")
        if len(parts) not in (3, 4) or parts[1] not in DYNAMIC_KINDS or not parts[2].isdigit() or int(parts[2]) < 1:
            raise ValueError(f"a model is written MODEL:CONV:EXPERTS[:BLOCKS] with CONV one of {DYNAMIC_KINDS} and "
                             f"EXPERTS a positive int (e.g. resnet50:odconv:4:all), got {text!r}")
        blocks: str | int | None = None
        if len(parts) == 4:
            blocks = int(parts[3]) if parts[3].isdigit() else parts[3]
        return cls(parts[0], parts[1], int(parts[2]), blocks)

    def build(self, num_classes: int = 1000, seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
        """``(static twin, dynamic model)``, each initialised from ``seed`` (``kwargs``: more builder arguments)."""
        with _seeded(seed):
            static = create_model(self.model, num_classes=num_classes, **kwargs)
        with _seeded(seed):
            dynamic = create_model(self.model, num_classes=num_classes, conv=self.conv, num_experts=self.num_experts,
                                   dynamic_blocks=self.dynamic_blocks, **kwargs)
        return static, dynamic


#: Named model lists: ``cpu`` is the deployment table (batch-1 latency on a CPU), ``gpu`` the GPU-kernel table.
MODEL_SETS: dict[str, tuple[ModelSpec, ...]] = {
    "cpu": (ModelSpec("efficientnet_b0", "condconv", 8), ModelSpec("mobilenet_v1", "condconv", 8),
            ModelSpec("mobilenet_v2", "condconv", 8), ModelSpec("resnet50", "condconv", 8),
            ModelSpec("mobilenet_v1", "dynamic", 4), ModelSpec("resnet18", "odconv", 4)),
    "gpu": (ModelSpec("efficientnet_b0", "condconv", 8), ModelSpec("resnet50", "condconv", 8),
            ModelSpec("mobilenet_v2", "dynamic", 4, "all"), ModelSpec("mobilenet_v2", "odconv", 4, "all"),
            ModelSpec("resnet50", "odconv", 4, "all")),
}


def resolve_models(items: Iterable[str | ModelSpec]) -> list[ModelSpec]:
    """Model specs from set names (:data:`MODEL_SETS`), ``MODEL:CONV:EXPERTS[:BLOCKS]`` strings or specs."""
    out: list[ModelSpec] = []
    for item in items:
        if isinstance(item, ModelSpec):
            out.append(item)
        elif item in MODEL_SETS:
            out.extend(MODEL_SETS[item])
        else:
            out.append(ModelSpec.parse(item))
    if not out:
        raise ValueError(f"no models given: name a set ({', '.join(MODEL_SETS)}) or MODEL:CONV:EXPERTS[:BLOCKS]")
    return out


@dataclass
class ModelRow:
    """One timed candidate. ``ratio`` is ``median_ms`` over the static twin's median in the same rounds and runtime
    (for ``mixing floor`` rows: ``(static + mixing) / static``). ``peak_mib``: peak memory allocated during one call
    on CUDA (NaN on the CPU, where it is not measured)."""

    model: str
    mac_ratio: float
    device: str
    precision: str
    mode: str
    batch: int
    runtime: str
    candidate: str
    median_ms: float
    ratio: float
    peak_mib: float
    rounds: int


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds of one call: CUDA events on CUDA (the device time between two markers), else wall clock."""
    if device.type != "cuda":
        return timed

    def cuda_timed(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return cuda_timed


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _strategy(name: str):
    return contextlib.nullcontext() if name == "auto" else use_strategy(name)


def _inference_step(model: nn.Module, x: Tensor, device: torch.device, strategy: str = "auto"):
    def run() -> None:
        with torch.inference_mode(), _autocast(device), _strategy(strategy):
            model(x)
    return run


def _train_step(model: nn.Module, x: Tensor, labels: Tensor, device: torch.device, strategy: str = "auto"):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device), _strategy(strategy):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()
    return run


def _mixing_floor(dynamic: nn.Module, batch: int, device: torch.device):
    """What every formulation must do at this batch size: read each expert bank once (``routing @ experts``)."""
    banks = [m.weight.detach().reshape(m.num_experts, -1) for m in dynamic.modules() if isinstance(m, DynamicConvBase)]
    routing = {e: torch.rand(batch, e, device=device, dtype=banks[0].dtype) for e in {b.shape[0] for b in banks}}

    def run() -> None:
        with torch.inference_mode():
            for bank in banks:
                torch.matmul(routing[bank.shape[0]], bank)
    return run


def _prepare(model: nn.Module, device: torch.device, train: bool) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.train(train)


def _eager_rows(spec_args, static, dynamic, mode, batch, strategies, floor, compile_, rounds, budget) -> list[tuple]:
    """(runtime, candidate, seconds, peak MiB, rounds) of the PyTorch runtimes for one model, mode and batch."""
    device, input_size, num_classes = spec_args
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *input_size, generator=gen).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    train = mode == "train"
    models = {"static": _prepare(static, device, train), "dynamic": _prepare(dynamic, device, train)}
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    candidates: dict[str, Callable[[], object]] = {}
    for name in ["static", *strategies]:
        model = models["static" if name == "static" else "dynamic"]
        candidates[name] = _train_step(model, x, labels, device, "auto" if name == "static" else name) if train \
            else _inference_step(model, x, device, "auto" if name == "static" else name)
    if floor and not train:
        candidates["mixing floor"] = _mixing_floor(models["dynamic"], batch, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians, count = round_robin(candidates, rounds, 10_000, budget, timer=_timer(device), warmup=2)
    peaks = {name: _peak_mib(fn, device) for name, fn in candidates.items()}
    sync()
    rows = [("eager", name, medians[name], peaks[name], count) for name in candidates]
    if compile_ and not train:
        rows += _compiled_rows(models, x, device, rounds, budget)
    return rows


def _compiled_rows(models: dict[str, nn.Module], x: Tensor, device: torch.device, rounds: int,
                   budget: float) -> list[tuple]:
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    compiled = {name: torch.compile(m, mode=mode, dynamic=False) for name, m in models.items()}
    candidates = {("static" if name == "static" else "auto"): _inference_step(m, x, device)
                  for name, m in compiled.items()}
    medians, count = round_robin(candidates, rounds, 10_000, budget, timer=_timer(device), warmup=3)
    return [(f"compile ({mode})", name, medians[name], math.nan, count) for name in candidates]


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_mixing_floor(dynamic: nn.Module, batch: int, folder: Path, threads: int):
    """The expert banks' ``routing @ experts`` as an ONNX graph of MatMuls (the floor of any exported formulation)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = [m for m in dynamic.modules() if isinstance(m, DynamicConvBase)]
    inits, nodes, outputs = [], [], []
    for i, m in enumerate(layers):
        bank = m.weight.detach().float().reshape(m.num_experts, -1).cpu().numpy()
        inits.append(numpy_helper.from_array(bank, f"experts{i}"))
        nodes.append(helper.make_node("MatMul", [f"routing{m.num_experts}", f"experts{i}"], [f"kernel{i}"]))
        outputs.append(helper.make_tensor_value_info(f"kernel{i}", TensorProto.FLOAT, None))
    counts = sorted({m.num_experts for m in layers})
    inputs = [helper.make_tensor_value_info(f"routing{e}", TensorProto.FLOAT, [batch, e]) for e in counts]
    graph = helper.make_graph(nodes, "mixing", inputs, outputs, inits)
    path = folder / "mixing.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    session = _ort_session(path, threads)
    feed = {f"routing{e}": np.random.rand(batch, e).astype(np.float32) for e in counts}
    return lambda: session.run(None, feed)


def _onnx_rows(static, dynamic, batch, input_size, threads, int8, floor, rounds, budget) -> list[tuple]:
    """onnxruntime rows: the dynamic-batch exports, the static batch-1 graph, optionally int8, and the floor."""
    import numpy as np

    from condconv.deploy.export import export_model
    from condconv.deploy.quantize import quantize_onnx

    static, dynamic = static.cpu().eval(), dynamic.cpu().eval()
    x = np.random.default_rng(batch).standard_normal((batch, *input_size), dtype=np.float32)
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {"static": export_model(static, folder / "static.onnx", input_size=input_size),
                 "auto": export_model(dynamic, folder / "dynamic.onnx", input_size=input_size)}
        runs = {name: _ort_runner(path, x, threads) for name, path in files.items()}
        if batch == 1:
            b1 = export_model(dynamic, folder / "dynamic-b1.onnx", input_size=input_size, batch_size=1)
            runs["auto, batch-1 graph"] = _ort_runner(b1, x, threads)
        if floor:
            runs["mixing floor"] = _ort_mixing_floor(dynamic, batch, folder, threads)
        medians, count = round_robin(runs, rounds, 10_000, budget, warmup=2)
        rows += [("onnxruntime", name, medians[name], math.nan, count) for name in runs]
        if int8:
            quantized = {name: quantize_onnx(path, folder / f"{name}-int8.onnx") for name, path in files.items()}
            runs = {name: _ort_runner(path, x, threads) for name, path in quantized.items()}
            medians, count = round_robin(runs, rounds, 10_000, budget, warmup=2)
            rows += [("onnxruntime-int8", name, medians[name], math.nan, count) for name in runs]
    return rows


def _ort_runner(path: Path, x, threads: int):
    session = _ort_session(path, threads)
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def _to_rows(spec: ModelSpec, mac_ratio: float, device: torch.device, mode: str, batch: int,
             timed: list[tuple]) -> list[ModelRow]:
    precision = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32"
    base = {runtime: seconds for runtime, name, seconds, _, _ in timed if name == "static"}
    rows = []
    for runtime, name, seconds, peak, count in timed:
        static = base.get(runtime, math.nan)
        ratio = (static + seconds) / static if name == "mixing floor" else seconds / static
        rows.append(ModelRow(spec.label, mac_ratio, str(device), "fp32" if runtime.startswith("onnx") else precision,
                             mode, batch, runtime, name, seconds * 1e3, ratio, peak, count))
    return rows


def bench_models(
    models: Iterable[str | ModelSpec] = ("cpu",),
    *,
    device: str | torch.device = "cpu",
    batch_sizes: Sequence[int] = (1,),
    train_batch_sizes: Sequence[int] = (),
    strategies: Sequence[str] = ("auto",),
    onnx: bool = False,
    int8: bool = False,
    compile: bool = False,
    floor: bool = True,
    input_size: Sequence[int] = (3, 224, 224),
    num_classes: int = 1000,
    model_kwargs: dict | None = None,
    onnx_threads: int = 1,
    min_rounds: int = 5,
    budget_s: float = 3.0,
    progress: bool = True,
) -> list[ModelRow]:
    """Time every model's static twin and dynamic model (each strategy) per batch size; see the module docstring.

    Args:
        models: set names of :data:`MODEL_SETS`, ``MODEL:CONV:EXPERTS[:BLOCKS]`` strings or :class:`ModelSpec`.
        device: ``'cpu'`` or a CUDA device.
        batch_sizes: inference batch sizes. Default ``(1,)``.
        train_batch_sizes: batch sizes of a timed SGD training step (none by default).
        strategies: engine strategies of the dynamic model, each a candidate (``'auto'`` first by default).
        onnx: also time onnxruntime (CPU, ``onnx_threads`` threads) on the exported files (inference only).
        int8: with ``onnx``: also the int8 files of :func:`condconv.deploy.quantize.quantize_onnx`.
        compile: also ``torch.compile`` (``mode='reduce-overhead'`` on CUDA) of the static and ``auto`` models.
        floor: add the ``mixing floor`` rows (inference).
        input_size: ``(C, H, W)``. Default ``(3, 224, 224)``.
        num_classes, model_kwargs: classifier outputs and further ``create_model`` arguments (e.g. ``width_mult``).
        onnx_threads: onnxruntime's intra-op threads. Default 1.
        min_rounds, budget_s: at least this many rounds and seconds per (model, mode, batch, runtime).

    Returns:
        One :class:`ModelRow` per candidate.
    """
    from tqdm.auto import tqdm

    specs = resolve_models(models)
    device = torch.device(device)
    strategies = _check_options(batch_sizes, train_batch_sizes, strategies, input_size, min_rounds, budget_s)
    if int8 and not onnx:
        raise ValueError("int8=True needs onnx=True (it times onnxruntime's quantized models)")
    model_kwargs = dict(model_kwargs or {})
    num_classes = model_kwargs.pop("num_classes", num_classes)
    configs = [(s, "inference", b) for s in specs for b in batch_sizes]
    configs += [(s, "train", b) for s in specs for b in train_batch_sizes]
    rows: list[ModelRow] = []
    cache: dict[ModelSpec, tuple] = {}
    for spec, mode, batch in tqdm(configs, desc="bench models", disable=not progress):
        if spec not in cache:
            static, dynamic = spec.build(num_classes, **model_kwargs)
            ratio = count_macs(dynamic, tuple(input_size)).macs / count_macs(static, tuple(input_size)).macs
            cache = {spec: (static, dynamic, ratio)}  # one model pair in memory at a time
        static, dynamic, mac_ratio = cache[spec]
        timed = _eager_rows((device, tuple(input_size), num_classes), static, dynamic, mode, batch, strategies,
                            floor, compile, min_rounds, budget_s)
        if onnx and mode == "inference":
            timed += _onnx_rows(static, dynamic, batch, tuple(input_size), onnx_threads, int8, floor, min_rounds,
                                budget_s)
        rows += _to_rows(spec, mac_ratio, device, mode, batch, timed)
    return rows


def _check_options(batch_sizes, train_batch_sizes, strategies, input_size, min_rounds, budget_s) -> list[str]:
    for name, values in (("batch_sizes", batch_sizes), ("train_batch_sizes", train_batch_sizes)):
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
            raise ValueError(f"{name} must be positive ints, got {list(values)!r}")
    if not batch_sizes and not train_batch_sizes:
        raise ValueError("give at least one inference or training batch size")
    strategies = list(dict.fromkeys(strategies))
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"strategies must be a non-empty list of {STRATEGIES}, got {list(strategies)!r}")
    if len(tuple(input_size)) != 3 or any(not isinstance(s, int) or s < 1 for s in input_size):
        raise ValueError(f"input_size must be three positive ints (C, H, W), got {input_size!r}")
    positive_int(min_rounds, "min_rounds")
    if not isinstance(budget_s, (int, float)) or not budget_s >= 0:
        raise ValueError(f"budget_s must be a non-negative number, got {budget_s!r}")
    return strategies


def format_model_table(rows: list[ModelRow], mode: str, batch: int) -> str:
    """Markdown: models down; the MAC ratio, then per runtime its static twin's median (ms) and every candidate's
    ratio to it, each with its peak memory where measured (CUDA)."""
    sel = [r for r in rows if r.mode == mode and r.batch == batch]
    if not sel:
        return ""
    models = list(dict.fromkeys(r.model for r in sel))
    runtimes = list(dict.fromkeys(r.runtime for r in sel))
    cols = [(rt, c) for rt in runtimes for c in dict.fromkeys(r.candidate for r in sel if r.runtime == rt)]
    lookup = {(r.model, r.runtime, r.candidate): r for r in sel}
    header = [f"{mode}, B={batch}", "MAC ratio"]
    header += [f"{rt} static ms" if c == "static" else (c if rt == "eager" else f"{rt}: {c}") for rt, c in cols]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for model in models:
        cells = [model, f"{next(r.mac_ratio for r in sel if r.model == model):.3f}"]
        for rt, c in cols:
            row = lookup.get((model, rt, c))
            if row is None:
                cells.append("")
                continue
            cell = f"{row.median_ms:.1f}" if c == "static" else f"{row.ratio:.2f}"
            cells.append(cell if math.isnan(row.peak_mib) else f"{cell} ({row.peak_mib:,.0f} MiB)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
