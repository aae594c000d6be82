"""Where and how a run executes: device, mixed precision, processes (``torchrun``), random state, global settings.

Everything that touches process-wide state lives here and is scoped: :func:`run_settings` applies a run's seeds
and backend switches (deterministic algorithms, cuDNN benchmark, TF32, ``CUBLAS_WORKSPACE_CONFIG``) and restores
what it changed when the run ends, so a library call leaves the process as it found it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DistInfo",
    "AMP_CHOICES",
    "all_gather_object",
    "all_reduce_sum",
    "amp_dtype",
    "autocast",
    "barrier",
    "broadcast_object",
    "device_kind",
    "distributed",
    "get_rng_state",
    "is_main_process",
    "resolve_device",
    "run_settings",
    "set_rng_state",
    "to_channels_last",
    "unwrap",
]

logger = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` job (one process: rank 0 of 1).

    Attributes:
        rank: global rank. world_size: processes. local_rank: rank on this node (the CUDA device index).
        initialized_here: whether :func:`distributed` created the process group (and so destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Whether this process is rank 0 (of an initialised process group, else of ``torchrun``'s ``RANK``, else 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def distributed(kind: str) -> Iterator[DistInfo]:
    """The process group of a ``torchrun`` job for the duration of the block (gloo on CPU, nccl on CUDA).

    Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) this yields a one-process :class:`DistInfo`. A group that
    already exists is used and left alone; one created here is destroyed at the end.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistInfo()
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        yield DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
        return
    if kind == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", timeout=_dt.timedelta(minutes=30))
    try:
        yield DistInfo(dist.get_rank(), dist.get_world_size(), local, True)
    finally:
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``values`` over the processes (in place; a no-op for one process)."""
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every process (a no-op for one process)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# device and precision
# ----------------------------------------------------------------------------------------------------------------
def device_kind(spec: str) -> str:
    """``'cuda'`` or ``'cpu'``: the kind of device ``spec`` (``'auto'``, ``'cpu'``, ``'cuda[:N]'``) names."""
    spec = str(spec).lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if spec.startswith("cuda") else "cpu"


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """The device named by ``spec`` (``'auto'``: CUDA if available; ``'cuda'``: this process's local GPU).

    Raises:
        ValueError: an unknown device or CUDA without a GPU.
    """
    text = str(spec).lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {spec!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {spec!r}")
    return dev


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (:data:`AMP_CHOICES`): ``'auto'`` is bf16 (fp16 without bf16) on CUDA, none on
    the CPU."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``'s kind, or a no-op context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert the model's 4-D parameters to channels_last (``Module.to`` rejects the 5-D expert banks)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------------------------------------------
# random state and global settings
# ----------------------------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """The random states of torch (CPU and CUDA), numpy and Python, as tensors, numbers and lists (a checkpoint
    holding them loads with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(rng: Mapping[str, Any]) -> None:
    """Restore states saved by :func:`get_rng_state`."""
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        cuda_states = list(rng["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has %d CUDA RNG states, this machine %d devices: not restored",
                           len(cuda_states), torch.cuda.device_count())
    n = rng["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = rng["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _backend_settings() -> dict[str, Any]:
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def _restore_backend_settings(saved: Mapping[str, Any]) -> None:
    torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["deterministic_warn_only"])
    torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
    torch.backends.cuda.matmul.allow_tf32 = saved["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
    if saved["cublas_workspace"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved["cublas_workspace"]


@contextlib.contextmanager
def run_settings(seed: int, *, device: torch.device, deterministic: bool = False) -> Iterator[None]:
    """A run's process-wide settings for the duration of the block, restored afterwards.

    Seeds Python, numpy and torch with ``seed``; with ``deterministic``, asks PyTorch for deterministic algorithms
    (and sets ``CUBLAS_WORKSPACE_CONFIG``, which cuBLAS needs for them); on CUDA, enables cuDNN benchmarking
    (unless deterministic) and TF32 matmuls. On exit the random states and every switch are put back as they were.
    """
    saved_rng, saved_backend = get_rng_state(), _backend_settings()
    try:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = not deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield
    finally:
        _restore_backend_settings(saved_backend)
        set_rng_state(saved_rng)
