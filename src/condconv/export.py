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
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from condconv.fileio import atomic_output, check_writable
from condconv.functional import get_default_strategy, use_strategy
from condconv.layers import DynamicConvBase

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_EXPORTERS",
    "export_model",
    "load_exported",
    "onnx_dynamo_available",
    "verify_export",
]

logger = logging.getLogger(__name__)

#: ``format=`` values of :func:`export_model` and their default file suffix.
EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
#: ONNX exporters: ``'dynamo'`` (torch.export-based, PyTorch's default; needs the ``onnxscript`` package),
#: ``'torchscript'`` (the older tracing exporter) and ``'auto'`` (dynamo when onnxscript is installed).
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")
_BATCH_DEPENDENT = ("grouped", "single")


def _check_input_size(input_size) -> tuple[int, ...]:
    try:
        size = tuple(int(s) for s in input_size)
    except TypeError:
        raise ValueError(f"input_size must be a sequence of positive ints (C, H, W), got {input_size!r}") from None
    if len(size) != 3 or min(size) < 1 or any(isinstance(s, bool) for s in input_size):
        raise ValueError(f"input_size must be three positive ints (C, H, W), got {input_size!r}")
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


@contextlib.contextmanager
def _export_strategy(model: nn.Module, strategy: str | None, dynamic_batch: bool):
    """Force a batch-independent strategy while exporting if a layer or the default pins a batch-dependent one."""
    if strategy is not None:
        if dynamic_batch and strategy in _BATCH_DEPENDENT:
            raise ValueError(f"strategy={strategy!r} depends on the batch size and cannot be exported with a dynamic "
                             f"batch: use 'auto', 'experts' or 'bmm' (or dynamic_batch=False)")
        with use_strategy(strategy):
            yield
        return
    pinned = sorted({m.strategy for m in model.modules() if isinstance(m, DynamicConvBase)
                     and m.strategy in _BATCH_DEPENDENT})
    default = get_default_strategy()
    if dynamic_batch and (pinned or default in _BATCH_DEPENDENT):
        logger.info("exporting with strategy 'auto' instead of %s: batch-dependent strategies cannot take a dynamic "
                    "batch", ", ".join(repr(s) for s in (pinned or [default])))
        with use_strategy("auto"):
            yield
        return
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
    batch_size: int = 2,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    strategy: str | None = None,
    verify: bool = False,
    verify_batch_sizes: Sequence[int] = (1, 3, 8),
) -> Path:
    """Export ``model`` (in eval mode) so that it accepts any batch size.

    Args:
        model: the model, in eval mode (BatchNorm must use its running statistics); any ``nn.Module`` taking one
            ``(B, C, H, W)`` tensor and returning one tensor.
        path: output file. Suffix conventions: ``.onnx``, ``.pt`` (TorchScript), ``.pt2`` (ExportedProgram).
        format: ``'onnx'`` (default), ``'torchscript'`` (``torch.jit.trace``) or ``'exported-program'``
            (``torch.export.export`` then ``torch.export.save``).
        input_size: ``(C, H, W)`` of the example input; the spatial size is fixed in the exported graph.
        opset: ONNX opset (``None``: the exporter's default; 17 for the TorchScript-based exporter).
        batch_size: batch of the example input used for tracing (>= 2: ``torch.export`` specialises size 1).
        dynamic_batch: mark the batch axis dynamic (default). ``False`` fixes it to ``batch_size``.
        exporter: ONNX exporter, ``'dynamo'`` (``torch.onnx.export(dynamo=True)``, PyTorch's default; needs
            ``onnxscript``), ``'torchscript'`` (``dynamo=False``) or ``'auto'`` (dynamo when available).
        strategy: engine strategy to trace with (``None``: ``'auto'``, which picks export-friendly strategies
            by itself while tracing; layers pinned to ``'grouped'``/``'single'`` are overridden).
        verify: run the exported file at ``verify_batch_sizes`` against the PyTorch model (onnxruntime for ONNX)
            and raise ``RuntimeError`` on a mismatch.
        verify_batch_sizes: batch sizes of the check. Default ``(1, 3, 8)``.

    Returns:
        The written path.

    Raises:
        ValueError: training mode, unknown format/exporter, bad sizes, a batch-dependent ``strategy``.
        ImportError: ``exporter='dynamo'`` without onnxscript, or ``verify`` of ONNX without onnxruntime.
        RuntimeError: ``verify`` found the exported model disagreeing with PyTorch.
    """
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
    size = _check_input_size(input_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if dynamic_batch and batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 with dynamic_batch (size 1 is specialised), got {batch_size}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ValueError(f"opset must be an int >= 7 or None, got {opset!r}")
    path = Path(path)
    check_writable(path)
    x = _example_input(model, batch_size, size)
    # an ONNX file over 2 GiB keeps its weights in a side file named after it: written in place, not renamed
    large = format == "onnx" and _weight_bytes(model) > 1.5 * 2**30
    target = contextlib.nullcontext(path) if large else atomic_output(path)
    with _export_strategy(model, strategy, dynamic_batch), torch.no_grad(), target as tmp:
        out = model(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"export_model supports models returning one tensor, got {type(out).__name__}")
        if format == "onnx":
            _export_onnx(model, x, tmp, opset, dynamic_batch, exporter)
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


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _export_onnx(model: nn.Module, x: Tensor, path: Path, opset: int | None, dynamic_batch: bool,
                 exporter: str) -> None:
    if exporter == "auto":
        exporter = "dynamo" if onnx_dynamo_available() else "torchscript"
        if exporter == "torchscript":
            logger.info("onnxscript is not installed: using the TorchScript-based ONNX exporter "
                        "(pip install onnxscript for torch.onnx.export(dynamo=True))")
    names = {"input_names": ["input"], "output_names": ["output"]}
    if exporter == "dynamo":
        if not onnx_dynamo_available():
            raise ImportError("exporter='dynamo' needs the onnxscript package (pip install onnxscript)")
        large = _weight_bytes(model) > 1.5 * 2**30
        dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        program = _quiet_call(torch.onnx.export, model, (x,), dynamo=True, dynamic_shapes=dims, opset_version=opset,
                              external_data=large, verbose=False, **names)
        program.save(str(path), external_data=large)
    else:
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        _quiet_call(torch.onnx.export, model, (x,), str(path), dynamo=False, dynamic_axes=axes,
                    opset_version=opset or 17, do_constant_folding=True, **names)


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
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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
    size = _check_input_size(input_size)
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
