"""Compile the Triton kernels for a CUDA target without a GPU, and report what the compiler made of them.

A stand-in driver reports ``GPUTarget("cuda", arch, 32)`` (:class:`StandInDriver`, installed with
``triton.runtime.driver.set_active``); ``kernel.warmup(..., grid=(1,))`` then compiles one specialisation, and the
compiled kernel carries its ``ttgir``, ``ptx`` and ``cubin`` and ``metadata.shared``. Registers and local memory
(spills) are read by the ``ptxas`` shipped in Triton's wheel (``ptxas -v``). The launches compiled are the
ones :func:`condconv.nn.ops.triton_launch.plan` makes for a layer (meta tensors stand for the real ones), so their tile
and specialisation choices are the launcher's.

Run as a module (Triton's interpreter must be off: ``TRITON_INTERPRET`` unset)::

    python -c "from condconv.nn.ops.triton_offline import write_reports; write_reports('default', 'out.json')"

The tests (``tests/test_triton_compile.py``) and ``benchmarks/triton_compile_report.py`` use it that way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

__all__ = ["LAYERS", "Layer", "StandInDriver", "tool", "ptxas", "compile_layer", "layer_sets", "SMEM_LIMIT"]

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100/H200)


@dataclass(frozen=True)
class Layer:
    """A representative layer: ``C_in -> C_out``, square kernel, stride, input size, groups, batch, experts and
    which ODConv attentions it has."""

    name: str
    cin: int
    cout: int
    k: int
    stride: int
    size: int
    groups: int = 1
    batch: int = 128
    experts: int = 8
    odconv: bool = False

    def tensors(self, dtype: torch.dtype) -> dict:
        """Meta tensors of a call in ``dtype`` (channels_last input; experts, routing and attentions in float32 as
        under autocast, except for float64)."""
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        meta = {"device": "meta"}
        b, e, k = self.batch, self.experts, self.k
        x = torch.empty(b, self.cin, self.size, self.size, dtype=dtype, **meta)
        return {"x": x.to(memory_format=torch.channels_last),
                "weight": torch.empty(e, self.cout, self.cin // self.groups, k, k, dtype=pdt, **meta),
                "routing": torch.empty(b, e, dtype=pdt, **meta),
                "bias": None,
                "spatial": torch.empty(b, k, k, dtype=pdt, **meta) if self.odconv and k > 1 else None,
                "in_scale": torch.empty(b, self.cin, dtype=pdt, **meta) if self.odconv else None,
                "out_scale": torch.empty(b, self.cout, dtype=pdt, **meta) if self.odconv else None}

    def geometry(self) -> tuple:
        p = self.k // 2
        return (self.stride, self.stride), (p, p, p, p), (1, 1), self.groups


def _resnet50() -> list[Layer]:
    out = []
    for stage, (width, size) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)], start=1):
        out += [Layer(f"r50-s{stage}-3x3", width, width, 3, 1, size),
                Layer(f"r50-s{stage}-1x1-expand", width, 4 * width, 1, 1, size),
                Layer(f"r50-s{stage}-1x1-reduce", 4 * width, width, 1, 1, size)]
    out.append(Layer("r50-s2-3x3-stride2", 128, 128, 3, 2, 56))
    return out


def _effnet_b0() -> list[Layer]:
    return [Layer("b0-dw3x3-112", 96, 96, 3, 2, 112, groups=96), Layer("b0-dw3x3-56", 144, 144, 3, 1, 56, groups=144),
            Layer("b0-dw5x5-14", 480, 480, 5, 1, 14, groups=480), Layer("b0-dw5x5-7", 1152, 1152, 5, 1, 7,
                                                                        groups=1152),
            Layer("b0-1x1-expand-14", 112, 672, 1, 1, 14), Layer("b0-1x1-project-7", 1152, 320, 1, 1, 7)]


LAYERS: dict[str, Layer] = {layer.name: layer for layer in _resnet50() + _effnet_b0() + [
    Layer("odconv-3x3-14", 256, 256, 3, 1, 14, odconv=True, experts=4),
    Layer("odconv-3x3-56", 64, 64, 3, 1, 56, odconv=True, experts=4),
    Layer("odconv-dw3x3-14", 240, 240, 3, 1, 14, groups=240, odconv=True, experts=4)]}


def layer_sets() -> dict[str, list[tuple[Layer, torch.dtype]]]:
    """The layer sets compiled, as ``(layer, dtype)`` pairs.

    - ``default`` (the default test, meant to take about a minute with a cold Triton cache): every kernel role once
      per target in 16 bits: the small-map regime with every ODConv attention (bf16, E = 4), the large-map regime
      and its mixing kernel with a stride and E = 16 (bf16), the depthwise kernels (fp16, 5x5);
    - ``report`` (``benchmarks/triton_compile_report.py``): ``default`` plus E = 8 in a 7x7 stage, exact float32
      with E = 1 and float64: E = 1, 4, 8, 16 and the four dtypes;
    - ``full`` (the slow test): every layer x E in {1, 4, 8, 16} x four dtypes.
    """
    from dataclasses import replace

    bf16, fp16 = torch.bfloat16, torch.float16
    default = [(LAYERS["odconv-3x3-14"], bf16), (replace(LAYERS["r50-s2-3x3-stride2"], experts=16), bf16),
               (replace(LAYERS["b0-dw5x5-7"], experts=4), fp16)]
    report = [(LAYERS["r50-s4-3x3"], bf16), *default, (replace(LAYERS["r50-s3-1x1-reduce"], experts=1), torch.float32),
              (LAYERS["odconv-dw3x3-14"], torch.float64)]
    full = [(replace(layer, experts=e, name=f"{layer.name}-e{e}"), dt) for layer in LAYERS.values()
            for e in (1, 4, 8, 16) for dt in (bf16, torch.float16, torch.float32, torch.float64)]
    return {"default": default, "report": report, "full": full}


# ------------------------------------------------------------------------------------------------ the stand-in


def _driver_base():
    from triton.backends.driver import DriverBase

    return DriverBase


class StandInDriver:
    """A Triton driver for compiling only: reports a CUDA target of capability ``arch``. Each capability is its own
    "device" (Triton caches the target per device)."""

    def __new__(cls, arch: int):
        from triton.backends.compiler import GPUTarget

        class _Driver(_driver_base()):
            @classmethod
            def is_active(cls):
                return False

            def map_python_to_cpp_type(self, ty):
                return ty

            def get_current_target(self):
                return GPUTarget("cuda", arch, 32)

            def get_active_torch_device(self):
                return torch.device("meta")

            def get_benchmarker(self):
                raise RuntimeError("the stand-in driver compiles only")

            def get_current_device(self):
                return arch

            def get_current_stream(self, device=None):
                return 0

        return _Driver()


def tool(name: str) -> str | None:
    """Path of a binary shipped in Triton's NVIDIA backend (``ptxas``...), or None."""
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(compiler.__file__), "bin", name)
    return path if os.access(path, os.X_OK) else None


def ptxas(arch: int) -> str | None:
    """The ptxas Triton itself uses for ``sm_{arch}`` (its wheel ships two), or None."""
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return None
    try:
        try:
            path = compiler.get_ptxas(arch).path
        except TypeError:  # older Triton: one ptxas
            path = compiler.get_ptxas().path
    except (AttributeError, RuntimeError):
        path = tool("ptxas")
    return path if path and os.access(path, os.X_OK) else None


def _resources(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes of the kernel, from ``ptxas -v`` (Triton's own ptxas)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    try:
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        text = subprocess.run([ptxas(arch), "-v", f"--gpu-name={gpu}", fh.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(fh.name)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(re.search(r"Used (\d+) registers", text).group(1)),
            "stack": int(re.search(r"(\d+) bytes stack frame", text).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def _tensor_core_dots_in_loops(ttgir: str) -> tuple[int, int]:
    """``(dots on tensor cores inside an scf.for, dots inside an scf.for)`` in a TTGIR listing."""
    open_loops: list[int] = []
    in_loop = tc_in_loop = 0
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        while open_loops and stripped.startswith("}") and indent <= open_loops[-1]:
            open_loops.pop()
            break
        if "scf.for" in stripped and stripped.endswith("{"):
            open_loops.append(indent)
        elif open_loops and re.search(r"\b(tt\.dot|ttng\.warp_group_dot)\b", stripped):
            in_loop += 1
            if "warp_group_dot" in stripped or "#mma" in stripped:
                tc_in_loop += 1
    return tc_in_loop, in_loop


def compile_launch(launch, arch: int) -> dict:
    """Compile one planned launch for ``sm_{arch}`` (the stand-in driver must be active) and report on it."""
    args = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in launch.args)
    compiled = launch.kernel.warmup(*args, grid=(1,), **launch.kwargs)
    ptx = compiled.asm["ptx"]
    tc, dots = _tensor_core_dots_in_loops(compiled.asm["ttgir"])
    kind = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "fma")
    return {"role": launch.role, "kernel": launch.kernel.__name__ if hasattr(launch.kernel, "__name__")
            else launch.kernel.fn.__name__, "arch": arch, "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages, "shared": compiled.metadata.shared,
            "shared_limit": SMEM_LIMIT[arch], **_resources(ptx, arch), "instruction": kind,
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
            "loop_dots": dots, "loop_tensor_core_dots": tc,
            "atomics": len(re.findall(r"\b(atom|red)\.", ptx)),
            "tiles": {k: v for k, v in launch.kwargs.items() if k in ("G", "BM", "BN", "BK", "BO", "BC", "BP",
                                                                     "BLOCK", "EB")}}


def compile_layer(layer: Layer, dtype: torch.dtype, arch: int) -> list[dict]:
    """Every distinct kernel launch of ``layer`` (forward and full backward), compiled for ``sm_{arch}``."""
    from triton.runtime import driver

    from condconv.nn.ops import triton_launch

    t = layer.tensors(dtype)
    stride, padding, dilation, groups = layer.geometry()
    target = triton_launch.Target(SMEM_LIMIT[arch], 132 if arch == 90 else 108)
    launches = triton_launch.plan(t["x"], t["weight"], t["routing"], t["bias"], t["spatial"], t["in_scale"],
                                  t["out_scale"], stride, padding, dilation, groups, target)
    previous = getattr(driver, "_active", None)
    driver.set_active(StandInDriver(arch))
    try:
        seen, out = set(), []
        for launch in launches:
            if launch.role in seen:  # the chunks of the large-map regime repeat one specialisation
                continue
            seen.add(launch.role)
            out.append({"layer": layer.name, "dtype": str(dtype).removeprefix("torch."), "experts": layer.experts,
                        **compile_launch(launch, arch)})
        return out
    finally:
        driver._active = previous


def write_reports(which: str, path: str, archs: tuple[int, ...] | str = (90, 80)) -> list[dict]:
    """Compile the layer set ``which`` (a key of :func:`layer_sets`) for ``archs`` (capabilities, or a string of
    them separated by commas, e.g. ``"90,80"``) and write the reports to ``path`` (a JSON list). Run it with
    Triton's interpreter off (a fresh process: the interpreter does not compile).

    Raises:
        ValueError: an unknown set or architecture, or TRITON_INTERPRET is set.
    """
    sets = layer_sets()
    if which not in sets:
        raise ValueError(f"which must be one of {sorted(sets)}, got {which!r}")
    archs = tuple(int(a) for a in (archs.split(",") if isinstance(archs, str) else archs))
    unknown = [a for a in archs if a not in SMEM_LIMIT]
    if unknown:
        raise ValueError(f"archs must be among {sorted(SMEM_LIMIT)}, got {unknown}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ValueError("unset TRITON_INTERPRET: the interpreter does not compile")
    reports = []
    for layer, dtype in sets[which]:
        for arch in archs:
            reports += compile_layer(layer, dtype, arch)
    with open(path, "w") as fh:
        json.dump(reports, fh, indent=1)
    return reports
