"""Shared fixtures for the engine and layer tests, and the global state every test starts from."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on before
# anything imports Triton (torch._dynamo does): here, before the test modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode

import condconv.nn.functional as functional


class _ConvLog(TorchDispatchMode):
    """Records the forward convolutions (input shape, weight shape, groups) dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.convs: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            shapes = (tuple(int(n) for n in args[0].shape), tuple(int(n) for n in args[1].shape))
            self.convs.append((*shapes, int(args[8])))
        return func(*args, **(kwargs or {}))


def strategy_used(fn, batch: int, experts: int, out_channels: int, groups: int) -> str:
    """Run ``fn()`` (one dynamic convolution, plus routers if any) and name the strategy it executed.

    Identified from the operations it dispatches, by the engine's definition of each strategy rather than by its
    internal function names: ``experts`` is one convolution of the whole batch with ``E * C_out`` stacked kernels;
    ``grouped`` one convolution of a batch of 1 with ``batch * groups`` groups; ``single`` a plain convolution of a
    batch of 1 with ``C_out`` kernels; ``scan`` one such convolution per example of a bigger batch; ``bmm`` no
    convolution at all (matrix multiplies, after im2col for kxk). Use ``batch > 1`` and ``experts > 1`` where the
    distinction matters.
    """
    with _ConvLog() as log:
        fn()
    if not log.convs:
        return "bmm"
    kinds = set()
    for in_shape, w_shape, conv_groups in log.convs:
        if w_shape[0] == experts * out_channels and in_shape[0] == batch and conv_groups == groups and experts > 1:
            kinds.add("experts")
        elif in_shape[0] == 1 and batch > 1 and conv_groups == batch * groups:
            kinds.add("grouped")
        elif in_shape[0] == batch == 1 and w_shape[0] == out_channels and conv_groups == groups:
            kinds.add("single")
        elif in_shape[0] == 1 < batch == len(log.convs) and w_shape[0] == out_channels and conv_groups == groups:
            kinds.add("scan")
        else:
            kinds.add(f"unknown{(in_shape, w_shape, conv_groups)}")
    assert len(kinds) == 1, f"could not tell the strategy from the convolutions {log.convs}"
    return kinds.pop()


# "bmm-unfused": the 'bmm' strategy with the CPU custom-autograd path (FUSED_CPU) switched off
ALL_PATHS = ("grouped", "experts", "bmm", "bmm-unfused", "single", "scan", "auto")
MULTI_PATHS = ("grouped", "experts", "bmm", "bmm-unfused", "scan", "auto")


def _select_path(name: str, monkeypatch) -> str:
    if name == "bmm-unfused":
        monkeypatch.setattr(functional, "FUSED_CPU", False)
        return "bmm"
    return name


@pytest.fixture(params=ALL_PATHS)
def strategy(request, monkeypatch):
    """Every strategy (and execution path); 'single' must be given a batch of one."""
    return _select_path(request.param, monkeypatch)


@pytest.fixture(params=MULTI_PATHS)
def multi_strategy(request, monkeypatch):
    """Every strategy that takes any batch size (and execution path)."""
    return _select_path(request.param, monkeypatch)


@pytest.fixture
def spy():
    """:func:`strategy_used`, as a fixture."""
    return strategy_used


@pytest.fixture
def cli_error(capsys):
    """``cli_error(command)``: the one line ``condconv COMMAND`` printed on stderr (and nothing else there: no
    traceback, no second error line)."""

    def read(command: str) -> str:
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        errors = [line for line in err if line.startswith(f"condconv {command}: error: ")]
        assert len(errors) == 1, err
        assert not any(line.startswith("Traceback") for line in err), err
        return errors[0]

    return read


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-shape tests: one intra-op thread (on a busy 2-core machine, thread hand-offs cost more than the maths)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clean_strategy():
    """Seed torch and make sure no test leaks a global strategy (default or :func:`use_strategy`) to the next."""
    torch.manual_seed(0)
    functional.set_default_strategy("auto")
    yield
    functional.set_default_strategy("auto")
    stack = getattr(functional._state, "stack", None)
    leaked = list(stack) if stack else []
    if stack:
        stack.clear()
    assert not leaked, f"use_strategy left active: {leaked}"


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The whole suite runs with one intra-op thread, whichever tests are selected and in whatever order.

    Float results depend on the thread count (summation order), and so do torch.compile's guards (a changed count
    recompiles). The suite used to run single-threaded only from the moment ``condconv bench --threads 1``, run
    in-process by tests/test_bench.py, changed the count for the rest of the process; a run of a subset ran with
    all cores. Subprocesses started by the tests set ``OMP_NUM_THREADS=1`` for the same reason.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _same_global_state_for_every_test(_one_intra_op_thread):
    """Every test starts from the same global state, whatever ran before it: seeded random generators (inputs drawn
    without a generator would otherwise depend on which tests ran first) and one intra-op thread (put back if a
    test changed it, as ``condconv bench --threads N`` does for the whole process)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
