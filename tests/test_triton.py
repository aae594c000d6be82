"""The fused Triton kernels (``condconv.nn.ops.triton_conv``) against the per-example references, forward and backward.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set below before
anything imports the kernels), which is slow: every case is tiny. With a GPU they run on CUDA tensors.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import random

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # (pytest.importorskip would import Triton: see below)
    pytest.skip("Triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    # must precede the first import of Triton in the process: Triton's own library functions (tl.sum...) are only
    # interpretable if Triton was imported under TRITON_INTERPRET=1. Importing torch._dynamo imports Triton, so in
    # a full test run another module may have done it first: the tests are then skipped (see triton_status), and
    # run with `TRITON_INTERPRET=1 pytest`.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from condconv.nn.ops import triton_conv  # noqa: E402
from condconv.nn.ops.triton_conv import triton_dynamic_conv2d, triton_status  # noqa: E402
from condconv.nn.reference import reference_odconv2d  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
_READY, _WHY = triton_status(DEVICE)
pytestmark = pytest.mark.skipif(not _READY, reason=_WHY)


@pytest.fixture(scope="module", autouse=True)
def fast_interpreter():
    """Under the interpreter: one intra-op thread, and no int32 overflow checks on every integer add and multiply.

    The interpreter checks each integer operation for overflow (compiled kernels only do so in debug mode), which
    doubles its cost; the shapes here are far too small to overflow. Reaches into Triton's interpreter internals:
    if they change, the tests still pass, only slower.
    """
    if DEVICE != "cpu":
        yield
        return
    import dataclasses

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    builder = old = None
    try:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        old = builder.options
        builder.options = dataclasses.replace(old, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):
        builder = None
    yield
    if builder is not None:
        builder.options = old
    torch.set_num_threads(threads)


@pytest.fixture
def tiles(monkeypatch):
    """``tiles(n)``: interpreter tiles of size ``n`` (4 makes tiny shapes span several blocks in every loop)."""
    def set_tiles(size: int) -> None:
        if DEVICE == "cpu":
            from condconv.nn.ops import triton_launch

            big = 64 if size >= 16 else 4 * size
            monkeypatch.setattr(triton_launch, "INTERPRETER_TILES", {"BM": big, "BN": size, "BK": size, "BP": big,
                                                                     "G": 2 if size >= 16 else 4})
    return set_tiles


# ----------------------------------------------------------------------------------------------------------------
# Cases and the oracle

def _pads(kind: str, kernel: tuple[int, int], dilation: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom): none, symmetric, or asymmetric ('same' for even kernels, one more on the
    right/bottom side otherwise)."""
    if kind == "zero":
        return (0, 0, 0, 0)
    out = []
    for k in reversed(kernel):  # width first
        total = dilation * (k - 1)
        before, after = total // 2, total - total // 2
        if kind == "sym":
            after = before = max(before, 1)
        elif before == after:
            after += 1
        out += [before, after]
    return tuple(out)  # type: ignore[return-value]


def make_case(c: dict, seed: int = 0, dtype=F64) -> dict:
    """Tensors for a case (float64 on the CPU: the oracle's inputs) and the convolution's geometry.

    ``c`` keys: kernel, stride, padding ('zero'/'sym'/'asym'), dilation, groups ('dense', 'grouped', 'dw', 'dw2'),
    bias, spatial, in_scale, out_scale (bools), batch, fmt ('nchw', 'cl', 'strided'), optionally experts, hw.
    """
    gen = torch.Generator().manual_seed(seed)
    kh, kw = c["kernel"]
    d = c["dilation"]
    channels, out_channels, groups = {"dense": (5, 7, 1), "grouped": (6, 10, 2), "dw": (5, 5, 5),
                                      "dw2": (5, 10, 5)}[c["groups"]]
    pads = _pads(c["padding"], (kh, kw), d)
    # big enough for the dilated kernel; sizes that are not multiples of any tile
    h = max(c.get("hw", (6, 5))[0], d * (kh - 1) + 1 - pads[2] - pads[3])
    w = max(c.get("hw", (6, 5))[1], d * (kw - 1) + 1 - pads[0] - pads[1])
    b, e = c["batch"], c.get("experts", 3)

    def rand(*shape, positive=False):
        t = torch.rand(shape, generator=gen, dtype=dtype) if positive else torch.randn(shape, generator=gen,
                                                                                      dtype=dtype)
        return t + 0.5 if positive else t

    x = rand(b, channels, h, w)
    if c["fmt"] == "cl":
        x = x.to(memory_format=torch.channels_last)
    elif c["fmt"] == "strided":  # a column slice of a wider tensor: no standard memory format
        x = rand(b, channels, h, w + 3)[..., 1:1 + w]
    return {
        "x": x, "weight": rand(e, out_channels, channels // groups, kh, kw) * 0.5, "routing": rand(b, e, positive=True),
        "bias": rand(e, out_channels) if c["bias"] else None,
        "spatial": rand(b, kh, kw, positive=True) if c["spatial"] else None,
        "in_scale": rand(b, channels, positive=True) if c["in_scale"] else None,
        "out_scale": rand(b, out_channels, positive=True) if c["out_scale"] else None,
        "geometry": {"stride": (c["stride"],) * 2, "padding": pads, "dilation": (d, d), "groups": groups},
    }


TENSORS = ("x", "weight", "routing", "bias", "spatial", "in_scale", "out_scale")


def oracle(t: dict) -> torch.Tensor:
    """The ODConv reference (per-example loops of plain convolutions; its bias is mixed by the routing and added
    after the output scale, as the op's), after explicit (possibly asymmetric) zero padding."""
    g = t["geometry"]
    return reference_odconv2d(F.pad(t["x"], g["padding"]), t["weight"], t["routing"], t["spatial"], t["in_scale"],
                              t["out_scale"], t["bias"], g["stride"], 0, g["dilation"], g["groups"])


def run_op(t: dict) -> torch.Tensor:
    g = t["geometry"]
    return triton_dynamic_conv2d(t["x"], t["weight"], t["routing"], t["bias"], g["stride"], g["padding"],
                                 g["dilation"], g["groups"], spatial=t["spatial"], in_scale=t["in_scale"],
                                 out_scale=t["out_scale"])


def to_device(t: dict, dtype=None, grad: bool = True) -> dict:
    """A copy of the case's tensors on DEVICE (in ``dtype``), as autograd leaves; x keeps its strides."""
    out = {"geometry": t["geometry"]}
    for name in TENSORS:
        v = t[name]
        if v is not None:
            v = v.detach().to(device=DEVICE, dtype=dtype or v.dtype)
            if name == "x" and t["x"].dim() == 4 and not t["x"].is_contiguous():
                wide = torch.empty_strided(t["x"].shape, t["x"].stride(), dtype=v.dtype, device=DEVICE)
                v = wide.copy_(v)
            v.requires_grad_(grad)
        out[name] = v
    return out


def cpu_leaves(t: dict, names) -> dict:
    """The oracle's inputs: float64 CPU copies of the case's tensors, ``names`` requiring grad."""
    out = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    for n in names:
        out[n].requires_grad_()
    return out


def compare(c: dict, dtype=torch.float32, rtol=1e-4, seed=0) -> None:
    """Forward and every gradient (same random upstream gradient) against the float64 oracle."""
    t = make_case(c, seed)
    ref_in = cpu_leaves(t, [n for n in TENSORS if t[n] is not None])
    ref = oracle(ref_in)
    got_in = to_device(t, dtype)
    got = run_op(got_in)
    assert got.dtype == dtype and got.shape == ref.shape
    if c["fmt"] == "cl":
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.cpu().double(), ref.detach(), rtol=rtol, atol=rtol * scale)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    names = [n for n in TENSORS if t[n] is not None]
    want = torch.autograd.grad(ref, [ref_in[n] for n in names], upstream)
    have = torch.autograd.grad(got, [got_in[n] for n in names], upstream.to(DEVICE, dtype))
    for name, a, b in zip(names, have, want):
        assert a.dtype == got_in[name].dtype and a.shape == b.shape, name
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.cpu().double(), b, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")
    if c["fmt"] == "cl":
        assert have[0].is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------------
# A pairwise ("all pairs") design: every value of every factor meets every value of every other factor at least once

FACTORS: dict[str, list] = {
    "kernel": [(1, 1), (3, 3), (5, 5), (1, 3), (2, 2)],
    "groups": ["dense", "grouped", "dw", "dw2"],
    "padding": ["zero", "sym", "asym"],
    "fmt": ["nchw", "cl", "strided"],
    "stride": [1, 2],
    "dilation": [1, 2],
    "bias": [False, True],
    "spatial": [False, True],
    "in_scale": [False, True],
    "out_scale": [False, True],
    "batch": [1, 3],
    "tiles": [16, 4],  # interpreter tile size: 4 makes every loop run over several blocks
}


def _pairs(row: dict, names=None) -> set:
    """The (factor, value, factor, value) pairs of a row, factors in FACTORS order."""
    names = [n for n in FACTORS if n in (names or FACTORS)]
    return {(a, repr(row[a]), b, repr(row[b])) for a, b in itertools.combinations(names, 2)}


def interpreter_cost(row: dict) -> int:
    """Rough relative cost of a case under the interpreter (kernel positions x examples x loop blocks)."""
    kh, kw = row.get("kernel", (3, 3))
    return kh * kw * row.get("batch", 1) * (3 if row.get("tiles") == 4 else 1)


def pairwise(factors: dict[str, list], seed: int = 2, tries: int = 30, penalty: float = 0.1) -> list[dict]:
    """Greedy all-pairs covering design, deterministic for a seed.

    Each row starts from an uncovered pair and fills the other factors, in random order, with the value scoring
    best (uncovered pairs covered, less ``penalty`` times the interpreter cost); the best of ``tries`` rows is kept.
    """
    rng = random.Random(seed)
    uncovered = {(a, repr(va), b, repr(vb)) for a, b in itertools.combinations(factors, 2)
                 for va in factors[a] for vb in factors[b]}

    def new_pairs(row: dict) -> int:
        return len(_pairs(row, list(row)) & uncovered)

    rows: list[dict] = []
    while uncovered:
        a, va, b, vb = min(uncovered)
        best, best_score = None, None
        for _ in range(tries):
            row = {a: next(v for v in factors[a] if repr(v) == va), b: next(v for v in factors[b] if repr(v) == vb)}
            for name in rng.sample(list(factors), len(factors)):
                if name not in row:
                    options = rng.sample(factors[name], len(factors[name]))
                    row[name] = max(options, key=lambda v, n=name: new_pairs({**row, n: v})
                                    - penalty * interpreter_cost({**row, n: v}))
            score = new_pairs(row) - penalty * interpreter_cost(row)
            if best_score is None or score > best_score:
                best, best_score = row, score
        uncovered -= _pairs(best)
        rows.append({name: best[name] for name in factors})
    return rows


PAIRWISE = pairwise(FACTORS)


def _case_id(c: dict) -> str:
    flags = "".join(k[0] for k in ("bias", "spatial", "in_scale", "out_scale") if c[k]) or "-"
    return (f"k{c['kernel'][0]}x{c['kernel'][1]}-{c['groups']}-p{c['padding']}-s{c['stride']}-d{c['dilation']}"
            f"-{flags}-n{c['batch']}-{c['fmt']}-t{c['tiles']}")


def test_pairwise_design_covers_every_pair():
    covered = set().union(*(_pairs(c) for c in PAIRWISE))
    for a, b in itertools.combinations(FACTORS, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            assert (a, repr(va), b, repr(vb)) in covered
    assert len(PAIRWISE) <= 30


@pytest.mark.parametrize("case", PAIRWISE, ids=_case_id)
def test_matches_reference_float32(case, tiles):
    tiles(case["tiles"])
    compare(case, torch.float32, rtol=1e-4)


HAND_MADE = [
    # a stride larger than the input: some stride phases of the input gradient are empty
    {"kernel": (1, 1), "groups": "grouped", "padding": "asym", "stride": 2, "dilation": 1, "hw": (3, 1)},
    {"kernel": (3, 3), "groups": "dw2", "padding": "zero", "stride": 2, "dilation": 1, "hw": (3, 4)},
    # more experts than the unrolled mixing takes (the mixing loops)
    {"kernel": (3, 3), "groups": "dense", "padding": "sym", "stride": 1, "dilation": 1, "experts": 9, "hw": (4, 5)},
    {"kernel": (3, 3), "groups": "dw", "padding": "asym", "stride": 2, "dilation": 1, "experts": 9, "hw": (5, 4)},
]
HAND_MADE = [{"bias": True, "spatial": True, "in_scale": True, "out_scale": True, "batch": 2, "fmt": "nchw", **c}
             for c in HAND_MADE]


@pytest.mark.parametrize("case", HAND_MADE, ids=lambda c: _case_id({**c, "tiles": 16}))
def test_matches_reference_edge_cases(case):
    compare(case, torch.float32, rtol=1e-4)


@pytest.mark.parametrize("case", [c for c in PAIRWISE if interpreter_cost(c) <= 9][::3], ids=_case_id)
def test_matches_reference_float64(case, tiles):
    tiles(case["tiles"])
    compare(case, F64, rtol=1e-10)


def _random_cases(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{**{k: rng.choice(v) for k, v in FACTORS.items()}, "experts": rng.randint(1, 4),
             "hw": (rng.randint(1, 9), rng.randint(1, 9))} for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("case", _random_cases(40), ids=_case_id)
def test_random_cases_float64(case, tiles):
    """Random combinations beyond the pairs (sizes down to 1x1, several experts), in float64."""
    tiles(case["tiles"])
    compare(case, F64, rtol=1e-10, seed=7)


# ----------------------------------------------------------------------------------------------------------------
# gradcheck, low precision, compile, autograd contracts


@pytest.mark.parametrize("groups", ["dense", "dw2"])
def test_gradcheck_float64(groups):
    c = {"kernel": (2, 3), "groups": groups, "padding": "asym", "stride": 2, "dilation": 1, "bias": True,
         "spatial": True, "in_scale": True, "out_scale": True, "batch": 2, "fmt": "cl", "experts": 2, "hw": (4, 4)}
    t = to_device(make_case(c))
    names = [n for n in TENSORS if t[n] is not None]

    def fn(*tensors):
        return run_op({**t, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, [t[n] for n in names], fast_mode=True)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_and_backward(dtype, weight_dtype):
    c = {"kernel": (3, 3), "groups": "dense", "padding": "sym", "stride": 1, "dilation": 1, "bias": True,
         "spatial": True, "in_scale": True, "out_scale": True, "batch": 2, "fmt": "nchw"}
    t = make_case(c)
    ref = oracle(t)
    low = to_device(t, dtype, grad=True)
    for name in ("weight", "routing", "bias", "spatial", "in_scale", "out_scale"):  # as under autocast
        low[name] = low[name].detach().to(weight_dtype).requires_grad_()
    y = run_op(low)
    assert y.dtype == dtype
    torch.testing.assert_close(y.cpu().double(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    y.float().square().sum().backward()
    assert low["x"].grad.dtype == dtype and low["weight"].grad.dtype == weight_dtype
    for name in TENSORS:
        assert torch.isfinite(low[name].grad.float()).all(), name


def test_torch_compile_fullgraph_dynamic():
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    c = {"kernel": (3, 3), "groups": "dense", "padding": "sym", "stride": 1, "dilation": 1, "bias": True,
         "spatial": False, "in_scale": True, "out_scale": True, "fmt": "nchw", "hw": (5, 4)}

    def loss(x, weight, routing, bias, in_scale, out_scale):
        y = triton_dynamic_conv2d(x, weight, routing, bias, 1, 1, in_scale=in_scale, out_scale=out_scale)
        return (y * y).mean()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (2, 3):
        t = to_device(make_case({**c, "batch": batch}, seed=batch), torch.float32)
        args = [t[n] for n in ("x", "weight", "routing", "bias", "in_scale", "out_scale")]
        got = compiled(*args)
        got_grads = torch.autograd.grad(got, args)
        want = loss(*args)
        want_grads = torch.autograd.grad(want, args)
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b)
    assert counters["stats"]["unique_graphs"] == 1  # the second batch size did not recompile
    torch.compiler.reset()


def test_only_requested_gradients():
    c = {"kernel": (3, 3), "groups": "grouped", "padding": "sym", "stride": 1, "dilation": 1, "bias": True,
         "spatial": True, "in_scale": True, "out_scale": True, "batch": 2, "fmt": "nchw", "hw": (4, 4)}
    t = make_case(c)
    for wanted in (["x"], ["routing", "out_scale"], ["weight", "spatial"], ["bias", "in_scale"]):
        got_in = to_device(t, grad=False)
        for n in wanted:
            got_in[n].requires_grad_()
        got = run_op(got_in)
        grads = torch.autograd.grad(got.square().sum(), [got_in[n] for n in wanted])
        ref_in = cpu_leaves(t, wanted)
        want = torch.autograd.grad(oracle(ref_in).square().sum(), [ref_in[n] for n in wanted])
        for a, b in zip(grads, want):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


def test_empty_batch():
    c = {"kernel": (3, 3), "groups": "dense", "padding": "sym", "stride": 1, "dilation": 1, "bias": True,
         "spatial": True, "in_scale": True, "out_scale": True, "batch": 0, "fmt": "nchw", "hw": (4, 4)}
    t = to_device(make_case(c))
    y = run_op(t)
    assert y.shape == (0, 7, 4, 4)
    grads = torch.autograd.grad(y.sum(), [t[n] for n in TENSORS])
    assert all(g.abs().sum() == 0 for g in grads)


def test_double_backward_raises():
    c = {"kernel": (1, 1), "groups": "dense", "padding": "zero", "stride": 1, "dilation": 1, "bias": False,
         "spatial": False, "in_scale": False, "out_scale": False, "batch": 1, "fmt": "nchw", "hw": (2, 2)}
    t = to_device(make_case(c))
    (gx,) = torch.autograd.grad(run_op(t).square().sum(), [t["x"]], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# ----------------------------------------------------------------------------------------------------------------
# Argument checks and status


def _good_args() -> dict:
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    return {"x": x, "weight": torch.randn(3, 6, 2, 3, 3, device=DEVICE), "routing": torch.rand(2, 3, device=DEVICE),
            "bias": None, "stride": 1, "padding": 1, "dilation": 1, "groups": 2}


BAD = [
    ({"x": [1.0]}, TypeError, "x must be a torch.Tensor"),
    ({"routing": None}, TypeError, "routing must be a torch.Tensor"),
    ({"bias": "no"}, TypeError, "bias must be a torch.Tensor or None"),
    ({"x": torch.ones(2, 4, 5, 5, dtype=torch.int32)}, TypeError, "x must be float16"),
    ({"x": torch.randn(4, 5, 5)}, ValueError, "x must be 4-D"),
    ({"weight": torch.randn(6, 2, 3, 3)}, ValueError, "weight must be 5-D"),
    ({"groups": 4}, ValueError, "divisible by groups"),
    ({"groups": 0}, ValueError, "groups must be a positive int"),
    ({"x": torch.randn(2, 6, 5, 5)}, ValueError, "x has 6 channels, expected 4"),
    ({"routing": torch.rand(2, 4)}, ValueError, r"routing must have shape \(batch, num_experts\)"),
    ({"bias": torch.randn(3, 5)}, ValueError, r"bias must have shape \(num_experts, out_channels\)"),
    ({"spatial": torch.rand(2, 3, 2)}, ValueError, r"spatial must have shape \(batch, kh, kw\)"),
    ({"in_scale": torch.rand(2, 6)}, ValueError, r"in_scale must have shape \(batch, in_channels\)"),
    ({"out_scale": torch.rand(2, 4)}, ValueError, r"out_scale must have shape \(batch, out_channels\)"),
    ({"stride": 0}, ValueError, "stride must be positive"),
    ({"dilation": (1, 2, 3)}, TypeError, "dilation must be an int or a pair"),
    ({"padding": (1, 1, 1)}, TypeError, "padding must be an int, a pair"),
    ({"padding": -1}, ValueError, "padding must be non-negative"),
    ({"dilation": 4, "padding": 0}, ValueError, "too small"),
]


@pytest.mark.parametrize("change, error, match", BAD, ids=[m[:24] for _, _, m in BAD])
def test_bad_arguments(change, error, match):
    args = {**_good_args(), **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()}}
    with pytest.raises(error, match=match):
        triton_dynamic_conv2d(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_device_mismatch():
    args = _good_args()
    args["routing"] = args["routing"].cpu()
    with pytest.raises(ValueError, match="routing is on cpu"):
        triton_dynamic_conv2d(**args)


def test_status(monkeypatch):
    assert triton_status(DEVICE) == (True, _WHY)
    monkeypatch.setattr(triton_conv.importlib.util, "find_spec", lambda name: None)
    assert "pip install triton" in triton_status()[1]
    monkeypatch.undo()
    monkeypatch.delattr(torch.library, "custom_op")
    ok, why = triton_status()
    assert not ok and "torch >= 2.4" in why
    monkeypatch.undo()
    monkeypatch.setattr(triton_conv, "_loaded_launch", lambda: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = triton_status("cpu")
    assert not ok and "TRITON_INTERPRET=1" in why


# ----------------------------------------------------------------------------------------------------------------
# On a GPU: a moderately large layer in bfloat16 and float32 against a float64 oracle built from torch's own conv


def _grouped_oracle(t: dict) -> torch.Tensor:
    """The op through one grouped convolution of mixed per-example kernels (float64, any device)."""
    x, w, r, g = t["x"], t["weight"], t["routing"], t["geometry"]
    b, experts = r.shape
    kernels = (r @ w.reshape(experts, -1)).reshape(b, *w.shape[1:])
    if t["spatial"] is not None:
        kernels = kernels * t["spatial"][:, None, None]
    if t["in_scale"] is not None:
        x = x * t["in_scale"][:, :, None, None]
    x = F.pad(x, g["padding"])
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernels.reshape(-1, *kernels.shape[2:]), None, g["stride"], 0,
                 g["dilation"], b * g["groups"])
    y = y.reshape(b, w.shape[1], *y.shape[2:])
    if t["out_scale"] is not None:
        y = y * t["out_scale"][:, :, None, None]
    if t["bias"] is not None:
        y = y + (r @ t["bias"])[:, :, None, None]
    return y


def check_layer(layer: str, dtype: torch.dtype, rtol: float, size: int, batch: int, width: int) -> None:
    """A layer with every option (stride 2, channels_last input) against :func:`_grouped_oracle` in float64 on
    DEVICE, forward and every gradient. ``width`` scales the channel counts."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    channels, out_channels, groups = {"dense": (3 * width, 5 * width, 1), "grouped": (3 * width, 4 * width, 4),
                                      "dw": (3 * width, 6 * width, 3 * width)}[layer]
    e, k = 4, 3

    def rand(*shape, positive=False):
        f = torch.rand if positive else torch.randn
        return f(shape, generator=gen, device=DEVICE, dtype=F64) + (0.5 if positive else 0.0)

    t = {"x": rand(batch, channels, size, size).to(memory_format=torch.channels_last),
         "weight": rand(e, out_channels, channels // groups, k, k) / (channels // groups * k * k) ** 0.5,
         "routing": rand(batch, e, positive=True), "bias": rand(e, out_channels),
         "spatial": rand(batch, k, k, positive=True), "in_scale": rand(batch, channels, positive=True),
         "out_scale": rand(batch, out_channels, positive=True),
         "geometry": {"stride": (2, 2), "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": groups}}
    for name in TENSORS:
        t[name].requires_grad_()
    ref = _grouped_oracle(t)
    low = {n: (t[n].detach().to(dtype).requires_grad_() if n in TENSORS else t[n]) for n in t}
    y = run_op(low)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    upstream = torch.randn(ref.shape, generator=gen, device=DEVICE, dtype=F64)
    want = torch.autograd.grad(ref, [t[n] for n in TENSORS], upstream)
    have = torch.autograd.grad(y, [low[n] for n in TENSORS], upstream.to(dtype))
    for name, a, w in zip(TENSORS, have, want):
        torch.testing.assert_close(a.double(), w, rtol=rtol, atol=rtol * w.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_grouped_oracle_check_small():
    """The GPU test's code path (its oracle included) on a small dense layer."""
    check_layer("dense", torch.float32, 1e-4, size=5, batch=2, width=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("layer", ["dense", "grouped", "dw"])
def test_cuda_large(layer, dtype, rtol):
    check_layer(layer, dtype, rtol, size=28, batch=8, width=32)


# ----------------------------------------------------------------------------------------------------------------
# Regimes and the defects of issue 21: large maps, example groups, many experts, determinism, device, offsets


@pytest.fixture
def regime(monkeypatch):
    """``regime(name, workspace_bytes)``: force the dense kernels' regime ('group' or 'panel') and the large-map
    workspace size (a tiny one splits the batch into chunks of one example)."""
    def force(name: str, workspace: int = 1 << 20) -> None:
        from condconv.nn.ops import triton_launch

        monkeypatch.setattr(triton_launch, "FORCE_REGIME", name)
        monkeypatch.setattr(triton_launch, "WORKSPACE_BYTES", workspace)
    return force


REGIME_CASES = [
    {"kernel": (3, 3), "groups": "dense", "padding": "asym", "stride": 2, "dilation": 1, "bias": True,
     "spatial": True, "in_scale": True, "out_scale": True, "batch": 3, "fmt": "cl", "hw": (6, 5)},
    {"kernel": (2, 3), "groups": "grouped", "padding": "sym", "stride": 1, "dilation": 2, "bias": False,
     "spatial": True, "in_scale": False, "out_scale": True, "batch": 2, "fmt": "strided", "hw": (5, 6)},
    {"kernel": (1, 1), "groups": "dense", "padding": "zero", "stride": 2, "dilation": 1, "bias": True,
     "spatial": False, "in_scale": True, "out_scale": False, "batch": 3, "fmt": "nchw", "hw": (3, 1)},
]


@pytest.mark.parametrize("workspace", [1, 1 << 20], ids=["chunks-of-1", "one-chunk"])
@pytest.mark.parametrize("case", REGIME_CASES, ids=lambda c: _case_id({**c, "tiles": 16}))
def test_large_map_regime_matches_reference(case, workspace, regime):
    """The large-map regime (mixed kernels of a chunk in a workspace, then one implicit GEMM per example)."""
    regime("panel", workspace)
    compare(case, torch.float32, rtol=1e-4)


def test_large_map_regime_plans_the_kernel_gradient_through_a_workspace(regime):
    """Large maps: the kernel gradients are one implicit GEMM per example into a workspace (all kernel positions in
    one launch) and then the reductions over groups of examples, chunk by chunk; small maps keep one kernel."""
    from condconv.nn.ops import triton_launch

    x, w, r = torch.randn(3, 4, 6, 5), torch.randn(2, 6, 4, 3, 3), torch.rand(3, 2)
    regime("panel", 1)
    roles = [launch.role for launch in triton_launch.plan(x, w, r, None, None, None, None, (1, 1), (1, 1, 1, 1),
                                                          (1, 1), 1) if launch.role.startswith("kernel-grads")]
    assert roles == ["kernel-grads/large-map", "kernel-grads/reduce"] * 3
    regime("group")
    roles = [launch.role for launch in triton_launch.plan(x, w, r, None, None, None, None, (1, 1), (1, 1, 1, 1),
                                                          (1, 1), 1) if launch.role.startswith("kernel-grads")]
    assert roles == ["kernel-grads/dense"]


def test_large_map_regime_float64(regime):
    regime("panel", 1)
    compare(REGIME_CASES[0], F64, rtol=1e-10)


@pytest.mark.parametrize("group, batch", [(4, 5), (4, 3), (1, 2)], ids=["G4-B5", "G4-B3", "G1-B2"])
@pytest.mark.parametrize("experts", [9, 16])
def test_example_groups_and_many_experts(group, batch, experts, monkeypatch, regime):
    """Small-map regime with groups of G examples that do not divide the batch (the last group is partial, or G
    exceeds the batch), and more experts than the old unrolled mixing took (one 3-D load, no loop)."""
    from condconv.nn.ops import triton_launch

    regime("group")
    monkeypatch.setattr(triton_launch, "INTERPRETER_TILES", {**triton_launch.INTERPRETER_TILES, "G": group,
                                                             "BN": 4, "BK": 4, "BM": 16})
    c = {"kernel": (3, 3), "groups": "grouped", "padding": "sym", "stride": 2, "dilation": 1, "bias": True,
         "spatial": True, "in_scale": True, "out_scale": True, "batch": batch, "fmt": "nchw", "experts": experts,
         "hw": (5, 4)}
    compare(c, torch.float32, rtol=1e-4)


@pytest.mark.parametrize("groups, panel", [("dense", False), ("dw2", False), ("dense", True)],
                         ids=["dense", "dw2", "dense-large-map"])
def test_deterministic_backward(groups, panel, regime):
    """Under torch.use_deterministic_algorithms(True) the op runs (no error) and two backward passes agree bit for
    bit and with the reference (also in the large-map regime, whose kernel gradients go through a workspace in
    chunks of one example). (The kernels have no atomics at all: tests/test_triton_compile.py checks their PTX,
    which is what makes this hold on a GPU too.)"""
    if panel:
        regime("panel", 1)
    c = {"kernel": (3, 3), "groups": groups, "padding": "sym", "stride": 1, "dilation": 1, "bias": True,
         "spatial": True, "in_scale": True, "out_scale": True, "batch": 3, "fmt": "nchw", "hw": (4, 4)}
    t = make_case(c)
    names = [n for n in TENSORS if t[n] is not None]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            got_in = to_device(t, torch.float32)
            y = run_op(got_in)
            runs.append(torch.autograd.grad(y.square().sum(), [got_in[n] for n in names]))
    finally:
        torch.use_deterministic_algorithms(before)
    ref_in = cpu_leaves(t, names)
    want = torch.autograd.grad(oracle(ref_in).square().sum(), [ref_in[n] for n in names])
    for name, a, b, w in zip(names, *runs, want):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a.cpu().double(), w, rtol=1e-4, atol=1e-4 * max(1.0, w.abs().max().item()))


def test_launches_run_under_the_inputs_device(monkeypatch):
    """Every launch (forward and backward) runs inside the device guard of the input's device."""
    from condconv.nn.ops import triton_launch

    entered = []
    real_guard = triton_launch._device_guard

    def recording_guard(device):
        entered.append(device)
        return real_guard(device)

    kernels_seen = []
    real_run = triton_launch._run

    def run(launches, device):
        kernels_seen.extend(launch.role for launch in launches)
        real_run(launches, device)

    monkeypatch.setattr(triton_launch, "_device_guard", recording_guard)
    monkeypatch.setattr(triton_launch, "_run", run)
    c = {"kernel": (3, 3), "groups": "dense", "padding": "sym", "stride": 1, "dilation": 1, "bias": True,
         "spatial": False, "in_scale": False, "out_scale": False, "batch": 2, "fmt": "nchw", "hw": (4, 4)}
    t = to_device(make_case(c), torch.float32)
    y = run_op(t)
    torch.autograd.grad(y.sum(), [t["x"], t["weight"]])
    assert {"forward/small-map", "input-grad/small-map", "kernel-grads/dense"} <= set(kernels_seen)
    assert len(entered) == 3 and all(d == t["x"].device for d in entered)


def test_device_guard_selects_the_inputs_cuda_device(monkeypatch):
    """For a CUDA input on device 1 the guard is torch.cuda.device(that device) (a stand-in: no GPU needed)."""
    from condconv.nn.ops import triton_launch

    chosen = []

    class StandIn:
        def __init__(self, device):
            chosen.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", StandIn)
    with triton_launch._device_guard(torch.device("cuda", 1)):
        pass
    assert chosen == [torch.device("cuda", 1)]
    with triton_launch._device_guard(torch.device("cpu")):
        pass
    assert chosen == [torch.device("cuda", 1)]


def test_offsets_that_would_overflow_32_bits_are_refused():
    """Every tensor a launch touches is checked: per example for batched tensors, whole for the rest; strided
    views count by their strides, not their element count."""
    from condconv.nn.ops import triton_launch

    meta = {"device": "meta"}
    x = torch.empty(64, 64, 56, 56, **meta)
    triton_launch.check_offsets({"x": x}, ("x",))
    wide = torch.empty_strided((2, 4, 8, 8), (2**32, 2**30, 8, 1), **meta)  # a view far apart within an example
    with pytest.raises(ValueError, match=r"grad_x spans \d+ elements per example"):
        triton_launch.check_offsets({"grad_x": wide}, ("grad_x",))
    triton_launch.check_offsets({"y": torch.empty_strided((2, 4, 8, 8), (2**31, 64, 8, 1), **meta)}, ("y",))
    with pytest.raises(ValueError, match="partial W spans"):
        triton_launch.check_offsets({"partial W": torch.empty(2**31 + 1, **meta)}, ())
    # the launcher checks outputs too: a layer whose output per example exceeds 2**31 elements is refused
    xb = torch.empty(1, 1, 2**16, 2**15 + 1, dtype=torch.bfloat16, **meta)
    w = torch.empty(1, 1, 1, 1, 1, **meta)
    with pytest.raises(ValueError, match="x spans"):
        triton_launch.plan(xb, w, torch.empty(1, 1, **meta), None, None, None, None, (1, 1), (0, 0, 0, 0), (1, 1), 1)


def test_expert_bank_cache(monkeypatch):
    """With the cache on, an unchanged weight reuses its bank; an in-place update (version bump) rebuilds it."""
    from condconv.nn.ops import triton_launch

    monkeypatch.setattr(triton_launch, "CACHE_BANK", True)
    monkeypatch.setattr(triton_launch, "_BANKS", type(triton_launch._BANKS)())
    w = torch.randn(3, 4, 2, 3, 3, device=DEVICE)
    first = triton_launch._bank(w, torch.float32, False, 1)
    assert triton_launch._bank(w, torch.float32, False, 1) is first
    assert triton_launch._bank(w, torch.float32, True, 1) is not first
    with torch.no_grad():
        w.mul_(2)
    again = triton_launch._bank(w, torch.float32, False, 1)
    assert again is not first
    torch.testing.assert_close(again, 2 * first)
