"""Export models with dynamic convolutions to ONNX, TorchScript or a ``torch.export`` ExportedProgram, with a
dynamic batch axis.

CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference", NeurIPS 2019,
arXiv:1904.04971), DynamicConv (Chen et al., CVPR 2020, arXiv:1912.03458) and ODConv (Li, Zhou, Yao, ICLR 2022,
arXiv:2209.07947) compute a different kernel for every example. The usual implementation folds the batch into the
groups of one convolution (``groups = B * groups``), which bakes the example batch size into an exported graph
(ONNX ``Conv.group`` is an attribute, not an input). The engine (:func:`condconv.dynamic_conv2d`) notices when it
is being traced — ``torch.jit.trace``, ``torch.onnx.export`` (both exporters), ``torch.export`` and ``torch.compile``
— and its ``'auto'`` strategy then picks ``'experts'`` (one dense convolution over all experts, then a
routing-weighted sum) or, for dense 1x1 layers, ``'bmm'`` (a batched matmul): neither depends on the batch size, so
the exported model accepts any batch. :func:`export_model` also overrides layers pinned to the batch-dependent
``'grouped'`` / ``'single'`` strategies while exporting.

The model must be in eval mode (``model.eval()``): BatchNorm would otherwise be exported with batch statistics
and dropout active. :func:`export_model` refuses a model in training mode rather than switching it silently.

Command line: ``condconv export MODEL_OR_CHECKPOINT --format onnx --verify``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from condconv.nn.functional import get_default_strategy, use_strategy
from condconv.nn.layers import DynamicConvBase, spatial_ranks
from condconv.nn.ops.context import static_batch
from condconv.utils.checks import OptionError
from condconv.utils.fileio import atomic_output, check_writable

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_EXPORTERS",
    "export_model",
    "load_exported",
    "onnx_dynamo_available",
    "onnx_file_opset",
    "onnx_opset_range",
    "verify_export",
]

logger = logging.getLogger(__name__)

#: ``format=`` values of :func:`export_model` and their default file suffix.
EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
#: ONNX exporters: ``'dynamo'`` (torch.export-based, PyTorch's default; needs the ``onnxscript`` package),
#: ``'torchscript'`` (the older tracing exporter) and ``'auto'`` (dynamo when onnxscript is installed).
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")
_BATCH_DEPENDENT = ("grouped", "single")


_LAYOUTS = {1: "(C, L)", 2: "(C, H, W)", 3: "(C, D, H, W)"}
_COUNTS = {1: "two", 2: "three", 3: "four"}


def _check_input_size(input_size, model: nn.Module | None = None) -> tuple[int, ...]:
    """``input_size`` as ints: ``(C, H, W)``, or ``(C, L)`` / ``(C, D, H, W)`` for a model of 1-D / 3-D convolutions
    (the ranks :func:`condconv.nn.layers.spatial_ranks` finds in ``model``)."""
    ranks = spatial_ranks(model) if model is not None else [2]
    layouts = " or ".join(_LAYOUTS[rank] for rank in ranks)
    try:
        size = tuple(int(s) for s in input_size)
    except TypeError:
        raise ValueError(f"input_size must be a sequence of positive ints {layouts}, got {input_size!r}") from None
    if len(size) - 1 not in ranks or min(size) < 1 or any(isinstance(s, bool) for s in input_size):
        expected = " or ".join(f"{_COUNTS[rank]} positive ints {_LAYOUTS[rank]}" for rank in ranks)
        raise ValueError(f"input_size must be {expected}, got {input_size!r}")
    return size


def _example_input(model: nn.Module, batch: int, input_size: Sequence[int], seed: int = 0) -> Tensor:
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=gen).to(device=ref.device, dtype=dtype)


def onnx_dynamo_available() -> bool:
    """Whether ``torch.onnx.export(..., dynamo=True)`` can run here (it needs the ``onnxscript`` package)."""
    return importlib.util.find_spec("onnxscript") is not None


def _batch_dependent(jit: bool) -> tuple[str, ...]:
    """Strategies a dynamic-batch graph cannot hold (``scan`` is fine for torch.export, not for torch.jit)."""
    return _BATCH_DEPENDENT + (("scan",) if jit else ())


@contextlib.contextmanager
def _export_strategy(model: nn.Module, strategy: str | None, dynamic_batch: bool, jit: bool = False):
    """Trace with batch-independent strategies (a dynamic batch) or declare the batch static (see
    :func:`condconv.nn.ops.context.static_batch`); a layer or global default pinned to a batch-dependent strategy is
    overridden to ``'auto'`` for a dynamic batch."""
    dependent = _batch_dependent(jit)
    scope = contextlib.nullcontext() if dynamic_batch else static_batch()
    if strategy is not None:
        if dynamic_batch and strategy in dependent:
            raise ValueError(f"strategy={strategy!r} depends on the batch size and cannot be exported with a dynamic "
                             f"batch{' by a torch.jit-based exporter' if strategy == 'scan' else ''}: use 'auto', "
                             "'experts' or 'bmm' (or a static batch_size)")
        with use_strategy(strategy), scope:
            yield
        return
    pinned = sorted({m.strategy for m in model.modules() if isinstance(m, DynamicConvBase)
                     and m.strategy in dependent})
    default = get_default_strategy()
    if dynamic_batch and (pinned or default in dependent):
        logger.info("exporting with strategy 'auto' instead of %s: batch-dependent strategies cannot take a dynamic "
                    "batch", ", ".join(repr(s) for s in (pinned or [default])))
        with use_strategy("auto"):
            yield
        return
    with scope:
        yield


def _quiet_call(fn, *args, **kwargs):
    """Run an exporter, sending its progress prints and known deprecation chatter to the debug log."""
    buf = io.StringIO()
    quiet = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING,
             "torch.onnx._internal.exporter._registration": logging.ERROR}  # "torchvision is not installed" x4
    chatty = [logging.getLogger(name) for name in quiet]
    levels = [log.level for log in chatty]
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.(jit|onnx).*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1 can be constant folded")
        # the engine's argument checks read shapes (fixed except the batch, which they never branch on): verified
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"condconv\.")
        for log, level in zip(chatty, quiet.values()):
            log.setLevel(max(log.getEffectiveLevel(), level))
        try:
            return fn(*args, **kwargs)
        finally:
            for log, level in zip(chatty, levels):
                log.setLevel(level)
            if buf.getvalue().strip():
                logger.debug("%s", buf.getvalue().strip())


def export_model(
    model: nn.Module,
    path: str | Path,
    format: str = "onnx",
    input_size: Sequence[int] = (3, 224, 224),
    opset: int | None = None,
    *,
    batch_size: int | None = None,
    dynamic_batch: bool | None = None,
    exporter: str = "auto",
    strategy: str | None = None,
    verify: bool = False,
    verify_batch_sizes: Sequence[int] = (1, 3, 8),
) -> Path:
    """Export ``model`` (in eval mode): any batch size by default, or a graph specialised to ``batch_size`` images.

    With a dynamic batch, every dynamic layer runs a formulation whose cost at batch 1 is one convolution with the
    mixed kernel: a batched matmul for dense 1x1 layers, and for the others (with ``torch.export`` and the dynamo
    ONNX exporter) the ``scan`` strategy, one convolution per example in an ONNX ``Scan``; the TorchScript-based
    exporters (``format='torchscript'``, ``exporter='torchscript'``) cannot hold a loop over a symbolic batch and get
    the ``experts`` formulation (``E`` x the multiply-adds) for kxk layers. With ``batch_size=1`` the graph holds a
    plain convolution with a runtime-computed weight per layer (ONNX ``Conv`` with ``W`` an input), for runtimes
    that prefer static shapes.

    Args:
        model: the model, in eval mode (BatchNorm must use its running statistics); any ``nn.Module`` taking one
            ``(B, C, H, W)`` tensor (``(B, C, L)``, ``(B, C, D, H, W)`` for 1-D, 3-D layers) and returning one tensor.
        path: output file. Suffix conventions: ``.onnx``, ``.pt`` (TorchScript), ``.pt2`` (ExportedProgram).
        format: ``'onnx'`` (default), ``'torchscript'`` (``torch.jit.trace``) or ``'exported-program'``
            (``torch.export.export`` then ``torch.export.save``).
        input_size: ``(C, H, W)`` of the example input (``(C, L)`` / ``(C, D, H, W)`` for a model of 1-D / 3-D
            convolutions); the spatial size is fixed in the exported graph.
        opset: ONNX opset (``None``: the exporter's default; 17 for the TorchScript-based exporter). It must be in
            :func:`onnx_opset_range` of the exporter (``'auto'`` takes the TorchScript-based one for opsets the dynamo
            exporter does not write), and the written file declares exactly this opset (checked when read back).
        batch_size: ``None`` (default): any batch size (traced with 2 examples). An int: the graph is fixed to that
            many images (a static batch; ``dynamic_batch=True`` instead traces with that many and keeps the axis
            dynamic, which needs at least 2).
        dynamic_batch: ``None`` (default): dynamic unless ``batch_size`` is given. ``False`` without a
            ``batch_size`` fixes the batch to 2.
        exporter: ONNX exporter, ``'dynamo'`` (``torch.onnx.export(dynamo=True)``, PyTorch's default; needs
            ``onnxscript``), ``'torchscript'`` (``dynamo=False``) or ``'auto'`` (dynamo when available).
        strategy: engine strategy to trace with (``None``: ``'auto'``, which picks export-friendly strategies
            by itself while tracing; with a dynamic batch, layers pinned to ``'grouped'``/``'single'`` are overridden).
        verify: run the exported file at ``verify_batch_sizes`` (the static batch size for a static graph) against
            the PyTorch model (onnxruntime for ONNX) and raise ``RuntimeError`` on a mismatch.
        verify_batch_sizes: batch sizes of the check of a dynamic graph. Default ``(1, 3, 8)``.

    Returns:
        The written path.

    Raises:
        ValueError: training mode, unknown format/exporter, bad sizes, a batch-dependent ``strategy``, an opset the
            exporter does not write (before any work) or that it did not write (no file is left).
        ImportError: ``exporter='dynamo'`` without onnxscript, or ``verify`` of ONNX without onnxruntime.
        RuntimeError: ``verify`` found the exported model disagreeing with PyTorch.
    """
    _check_export_args(model, format, exporter)
    size = _check_input_size(input_size, model)
    batch_size, dynamic_batch = _resolve_batch(batch_size, dynamic_batch)
    exporter = _resolve_exporter(format, exporter, opset)
    jit = format == "torchscript" or (format == "onnx" and exporter == "torchscript")
    path = Path(path)
    check_writable(path)
    x = _example_input(model, batch_size, size)
    # an ONNX file over 2 GiB keeps its weights in a side file named after it: written in place, not renamed
    large = format == "onnx" and _weight_bytes(model) > 1.5 * 2**30
    target = contextlib.nullcontext(path) if large else atomic_output(path)
    with _export_strategy(model, strategy, dynamic_batch, jit), torch.no_grad(), target as tmp:
        out = model(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"export_model supports models returning one tensor, got {type(out).__name__}")
        if format == "onnx":
            _export_onnx(model, x, tmp, opset, dynamic_batch, exporter)
            written = onnx_file_opset(tmp)
            if opset is not None and written != opset:  # the file is not kept: the request is refused
                raise OptionError("opset", f"opset {opset} was not written: the {exporter} ONNX exporter wrote "
                                  f"opset {written} (its version converter could not convert this model)"
                                  f"{_other_exporter_hint(exporter, opset)}", mentions=("exporter",))
        elif format == "torchscript":
            traced = _quiet_call(torch.jit.trace, model, (x,), check_trace=False)
            traced.save(str(tmp))
        else:
            dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            program = _quiet_call(torch.export.export, model, (x,), dynamic_shapes=dims)
            torch.export.save(program, str(tmp))
    logger.debug("exported %s to %s (%s, %.1f MB)", type(model).__name__, path, format, path.stat().st_size / 2**20)
    if verify:
        sizes = verify_batch_sizes if dynamic_batch else (batch_size,)
        verify_export(path, model, input_size=size, batch_sizes=sizes, format=format)
    return path


def _check_export_args(model: nn.Module, format: str, exporter: str) -> None:
    """The model is an ``nn.Module`` in eval mode, ``format`` and ``exporter`` are known names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {tuple(EXPORT_FORMATS)}, got {format!r}")
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"exporter must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    training = [name or "model" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"model is in training mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}"
                         "): call model.eval() before exporting, or BatchNorm would be exported with batch "
                         "statistics and dropout active")


def _resolve_exporter(format: str, exporter: str, opset: int | None) -> str:
    """The ONNX exporter to use (``'auto'`` resolved), after checking that it writes ``opset`` (before any work)."""
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise TypeError(f"opset must be an int or None, got {opset!r}")
    chosen = exporter == "auto"
    if chosen:
        exporter = _auto_exporter(opset if format == "onnx" else None)
        if format == "onnx" and exporter == "torchscript":
            why = f"for opset {opset}" if onnx_dynamo_available() else \
                "pip install onnxscript for torch.onnx.export(dynamo=True)"
            logger.info("using the TorchScript-based ONNX exporter (%s)", why)
    if format == "onnx" and opset is not None:
        low, high = onnx_opset_range(exporter)
        if not low <= opset <= high:
            if chosen:
                ranges = ", ".join(f"{name} {a} to {b}" for name in ("dynamo", "torchscript")
                                   for a, b in [onnx_opset_range(name)])
                raise OptionError("opset", f"opset {opset} is outside what the ONNX exporters write here ({ranges})")
            raise OptionError("opset", f"opset {opset} is outside what the {exporter} ONNX exporter writes here ({low} "
                              f"to {high}){_other_exporter_hint(exporter, opset)}", mentions=("exporter",))
    return exporter


def onnx_opset_range(exporter: str) -> tuple[int, int]:
    """``(lowest, highest)`` ONNX opset that ``exporter`` (``'dynamo'`` or ``'torchscript'``) writes with the installed
    torch and onnx.

    The dynamo-based exporter builds its graph at the opset of its operator library (18 with torch 2.x) and converts
    it to the requested one: up to the newest opset the installed ``onnx`` knows; down-conversion fails for many
    models, and the exporter then writes opset 18 without an error, so older opsets are left to the TorchScript-based
    exporter, which writes 7 to ``torch.onnx``'s maximum (23 with torch 2.13) directly.
    """
    if exporter == "dynamo":
        try:
            from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as low
        except ImportError:  # pragma: no cover - another torch layout
            low = 18
        try:
            import onnx

            high = int(onnx.defs.onnx_opset_version())
        except ImportError:  # pragma: no cover - onnx comes with onnxscript
            high = low
        return int(low), max(int(low), high)
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as high
        from torch.onnx._constants import ONNX_MIN_OPSET as low
    except ImportError:  # pragma: no cover - another torch layout
        low, high = 7, 17
    return int(low), int(high)


def _auto_exporter(opset: int | None) -> str:
    """``exporter='auto'``: dynamo when onnxscript is installed and it writes ``opset``, else TorchScript-based."""
    if not onnx_dynamo_available():
        return "torchscript"
    low, high = onnx_opset_range("dynamo")
    if opset is None or low <= opset <= high:
        return "dynamo"
    ts_low, ts_high = onnx_opset_range("torchscript")
    return "torchscript" if ts_low <= opset <= ts_high else "dynamo"


def _other_exporter_hint(exporter: str, opset: int) -> str:
    other = "torchscript" if exporter == "dynamo" else "dynamo"
    low, high = onnx_opset_range(other)
    if low <= opset <= high and (other == "torchscript" or onnx_dynamo_available()):
        return f": use exporter {other} ({low} to {high}), or another opset"
    return ": choose an opset in that range"


def onnx_file_opset(path: str | Path) -> int:
    """The default-domain (``ai.onnx``) opset an ONNX file declares (its weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    versions = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    if not versions:
        raise ValueError(f"ONNX file {path} declares no ai.onnx opset")
    return int(versions[0])


def _resolve_batch(batch_size: int | None, dynamic_batch: bool | None) -> tuple[int, bool]:
    """``(batch of the example input, whether the batch axis is dynamic)`` from :func:`export_model`'s options."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    if dynamic_batch is not None and not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be None or a bool, got {dynamic_batch!r}")
    if dynamic_batch is None:
        dynamic_batch = batch_size is None
    if batch_size is None:
        batch_size = 2
    if dynamic_batch and batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 to trace a dynamic batch (torch.export specialises size 1), got "
                         f"{batch_size}: leave dynamic_batch unset for a graph of exactly {batch_size} image")
    return batch_size, dynamic_batch


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _export_onnx(model: nn.Module, x: Tensor, path: Path, opset: int | None, dynamic_batch: bool,
                 exporter: str) -> None:
    names = {"input_names": ["input"], "output_names": ["output"]}
    if exporter == "dynamo":
        if not onnx_dynamo_available():
            raise ImportError("exporter='dynamo' needs the onnxscript package (pip install onnxscript)")
        large = _weight_bytes(model) > 1.5 * 2**30
        dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        light = "optimize" in inspect.signature(torch.onnx.export).parameters
        extra = {"optimize": False} if light else {}
        program = _quiet_call(torch.onnx.export, model, (x,), dynamo=True, dynamic_shapes=dims, opset_version=opset,
                              external_data=large, verbose=False, **names, **extra)
        if light:
            _fold_constants(program.model)
        program.save(str(path), external_data=large)
    else:
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        _quiet_call(torch.onnx.export, model, (x,), str(path), dynamo=False, dynamic_axes=axes,
                    opset_version=opset or 17, do_constant_folding=True, **names)


def _fold_constants(model) -> None:
    """A light stand-in for the dynamo exporter's optimiser (whose pattern rewrites took two thirds of the export
    time of a model with dozens of dynamic layers, for no measured speed-up in onnxruntime): fold constants, with
    the reshapes and transposes of weights folded whatever their size, so that a weight reaches its ``MatMul`` as an
    initializer (which onnxruntime's quantization tools need), and drop unused nodes."""
    import onnxscript.optimizer as optimizer

    def weights_only(node) -> bool | None:
        if node.op_type in ("Reshape", "Transpose") and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].const_value is not None:
            return True
        return None

    optimizer.fold_constants(model, should_fold=weights_only)
    optimizer.remove_unused_nodes(model)


def load_exported(path: str | Path, format: str | None = None):
    """Load an exported file as a callable ``f(x: Tensor) -> Tensor`` (ONNX through onnxruntime on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if format is None:
        format = next((f for f, suffix in EXPORT_FORMATS.items() if path.suffix == suffix), None)
        if format is None:
            raise ValueError(f"cannot tell the format of {path} from its suffix: pass format= "
                             f"{tuple(EXPORT_FORMATS)}")
    if format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("running ONNX models needs onnxruntime (pip install 'condconv[onnx]')") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # not the exporter's unused-initializer notices
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: Tensor) -> Tensor:
            return torch.from_numpy(np.asarray(session.run(None, {name: x.detach().cpu().numpy()})[0]))

        return run_onnx
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated.*")
            return torch.jit.load(str(path), map_location="cpu")
    if format == "exported-program":
        return torch.export.load(str(path)).module()
    raise ValueError(f"format must be one of {tuple(EXPORT_FORMATS)}, got {format!r}")


def verify_export(path: str | Path, model: nn.Module, input_size: Sequence[int] = (3, 224, 224),
                  batch_sizes: Sequence[int] = (1, 3, 8), *, format: str | None = None, rtol: float = 1e-4,
                  atol: float = 1e-4) -> dict[int, float]:
    """Compare an exported file with ``model`` at several batch sizes.

    Returns:
        ``{batch size: max |exported - pytorch|}``.

    Raises:
        RuntimeError: a difference above ``atol + rtol * max|pytorch output|`` (the message lists all sizes).
    """
    size = _check_input_size(input_size, model)
    run = load_exported(path, format)
    errors: dict[int, float] = {}
    bad = []
    for i, batch in enumerate(batch_sizes):
        x = _example_input(model, int(batch), size, seed=100 + i)
        with torch.no_grad(), _export_strategy(model, None, True):  # the reference must run at every batch size
            ref = model(x).float().cpu()
            got = run(x.cpu() if format == "onnx" or Path(path).suffix == ".onnx" else x)
        got = got.float().cpu()
        if got.shape != ref.shape:
            raise RuntimeError(f"{path}: batch {batch} gave shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        err = float((got - ref).abs().max()) if ref.numel() else 0.0
        errors[int(batch)] = err
        if not err <= atol + rtol * float(ref.abs().max() if ref.numel() else 0):
            bad.append(batch)
    summary = ", ".join(f"batch {b}: {e:.2e}" for b, e in errors.items())
    if bad:
        raise RuntimeError(f"{path} disagrees with the PyTorch model (max |difference| {summary})")
    logger.debug("verified %s against PyTorch: %s", path, summary)
    return errors
