"""Will a training run fit in memory? An estimate made before any weight is allocated, and the memory available.

CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971) multiplies a layer's parameters by its expert count, and the
engine mixes one kernel per example of a batch: a large expert count can ask for more memory than the machine has,
which the operating system answers by killing the process without a message. :func:`check_training_memory` refuses
such a run first, with the estimate and the limit.

The estimate is a lower bound of what training needs, so that a refusal is always right:

- parameters, their gradients, the optimizer's state (SGD with momentum: one tensor per parameter; RMSProp and
  AdamW: two) and a weight average (one) — counted on the ``meta`` device, where building a model allocates nothing;
- one batch's activations: the output of every module in one forward pass on ``meta`` tensors, plus the one mixed
  kernel per example that every dynamic layer keeps for the backward pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MemoryEstimate", "available_memory", "check_training_memory", "estimate_training_memory"]

logger = logging.getLogger(__name__)

#: Tensors of optimizer state per parameter tensor.
_OPTIMIZER_SLOTS = {"sgd": 1, "rmsprop_tf": 2, "adamw": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training process needs at least (see the module docstring for what is counted)."""

    params: int
    weights: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**29 else f"{nbytes / 2**20:.1f} MiB"


def estimate_training_memory(model_name: str, model_args: Mapping[str, Any], input_size: tuple[int, int, int],
                             batch_size: int, *, optimizer: str = "sgd", momentum: float = 0.9, ema: bool = False,
                             dtype_bytes: int = 4) -> MemoryEstimate:
    """Estimate the memory of training ``model_name`` built with ``model_args``, without allocating it.

    Args:
        model_name, model_args: as :func:`condconv.models.checkpoint.build_model` takes them.
        input_size: ``(C, H, W)`` of one image.
        batch_size: images per step (per process).
        optimizer: ``'sgd'``, ``'rmsprop_tf'`` or ``'adamw'``. Default ``'sgd'``.
        momentum: SGD keeps no state without momentum. Default 0.9.
        ema: a weight average is kept. Default False.
        dtype_bytes: bytes per value (4: float32). Default 4.
    """
    from condconv.models.checkpoint import build_model
    from condconv.nn.layers import DynamicConvBase

    with torch.device("meta"):
        model = build_model(model_name, model_args)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    slots = _OPTIMIZER_SLOTS.get(optimizer, 2)
    if optimizer == "sgd" and not momentum:
        slots = 0
    activations = 0

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal activations
        if isinstance(output, torch.Tensor):
            activations += output.numel()
        if isinstance(module, DynamicConvBase):  # one mixed kernel per example, and its gradient in backward
            activations += 2 * batch_size * module.weight[0].numel()

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, DynamicConvBase)]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model.train()
        with torch.no_grad():
            model(torch.empty((batch_size, *input_size), device="meta"))
    except Exception as exc:  # noqa: BLE001 - an estimate must not stop a run that would work: count no activations
        logger.debug("no activation estimate for %s on meta tensors: %s", model_name, exc)
        activations = 0
    finally:
        for handle in handles:
            handle.remove()
    weights = (2 * params + buffers) * dtype_bytes  # parameters and their gradients, buffers
    state = (slots + (1 if ema else 0)) * params * dtype_bytes
    return MemoryEstimate(params=params, weights=weights, optimizer=state, activations=activations * dtype_bytes)


def _cgroup_limit() -> int | None:
    """Bytes the cgroup (v2, else v1) of this process may still use, if it is limited."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = Path("/sys/fs/cgroup", usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(int(limit) - int(usage), 0) if usage.isdigit() else int(limit)
    return None


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str] | None:
    """``(bytes, where)``: the memory a new allocation can use on ``device`` (CUDA: free memory of the GPU; CPU:
    ``MemAvailable`` of ``/proc/meminfo``, or the cgroup's limit if lower). ``None`` when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = (int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo")
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_limit()
    if cgroup is not None and (found is None or cgroup < found[0]):
        found = (cgroup, "the memory limit of this process's cgroup")
    return found


def check_training_memory(estimate: MemoryEstimate, device: torch.device | str = "cpu", processes: int = 1,
                          what: str = "the model") -> None:
    """Refuse a run whose estimate exceeds the memory available (``processes`` training processes share a CPU).

    Raises:
        MemoryError: with the estimate, its parts and the limit.
    """
    device = torch.device(device)
    found = available_memory(device)
    if found is None:
        return
    limit, where = found
    shares = processes if device.type == "cpu" else 1
    need = estimate.total * shares
    if need > limit:
        per = f" x {shares} processes" if shares > 1 else ""
        raise MemoryError(
            f"{what} would not fit in memory: training it needs at least {_size(need)} ({estimate.params:,} "
            f"parameters: {_size(estimate.weights)} weights and gradients, {_size(estimate.optimizer)} optimizer "
            f"state and weight average, {_size(estimate.activations)} activations of one batch{per}), {_size(limit)} "
            f"available ({where}): use fewer experts, a smaller width or a smaller batch")


def local_processes() -> int:
    """Training processes on this machine (``torchrun`` sets ``LOCAL_WORLD_SIZE``)."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1
