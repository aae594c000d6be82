"""What the engine needs to know about the calling context: tracing, autocast, autograd."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["TRACING_KINDS", "is_tracing", "tracing_kind", "static_batch", "is_exporting", "autocast_on",
           "autocast_dtype", "needs_grad"]

#: What :func:`tracing_kind` can answer (besides ``None``, eager execution).
TRACING_KINDS = ("jit", "export", "compile", "static")

_state = threading.local()


@contextlib.contextmanager
def static_batch() -> Iterator[None]:
    """Declare that the graph being traced inside the block keeps the example's batch size (a static-batch export).

    :func:`tracing_kind` then answers ``'static'``: batch-dependent strategies (``single``, ``grouped``) are allowed.
    """
    depth = getattr(_state, "static", 0)
    _state.static = depth + 1
    try:
        yield
    finally:
        _state.static = depth


def tracing_kind() -> str | None:
    """How the current call is being traced, if it is (cheap in eager mode: two flag reads).

    Returns:
        ``None`` (eager), ``'static'`` (any tracer inside :func:`static_batch`), ``'jit'`` (``torch.jit.trace`` /
        scripting, which includes the TorchScript-based ONNX exporter), ``'export'`` (``torch.export``, which includes
        the dynamo-based ONNX exporter) or ``'compile'`` (``torch.compile``).
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        kind = "jit"
    else:
        compiler = getattr(torch, "compiler", None)
        if compiler is None or not getattr(compiler, "is_compiling", lambda: False)():
            return None
        kind = "export" if getattr(compiler, "is_exporting", lambda: False)() else "compile"
    return "static" if getattr(_state, "static", 0) else kind


def is_tracing() -> bool:
    """True while the call is being traced for export or compilation (where per-example kernels hurt)."""
    return tracing_kind() is not None


def is_exporting() -> bool:
    """True while the call is traced into a file format (TorchScript and the TorchScript-based ONNX exporter,
    ``torch.export`` and the dynamo-based ONNX exporter, a static-batch export), as opposed to being compiled by
    ``torch.compile`` (which keeps custom operators such as the Triton kernels)."""
    return tracing_kind() in ("jit", "export", "static")


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast casts to on ``device_type``."""
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will record an operation on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    except RuntimeError:  # a device type without autocast (meta)
        return False
