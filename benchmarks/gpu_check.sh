#!/usr/bin/env bash
# One prepared check for a CUDA machine: the CUDA tests, the Triton kernels compiled for the GPU, then the layer and
# model benchmarks in bf16 with the 'triton' strategy beside 'auto'. Everything it measures lands in $OUT (default
# benchmarks/results/gpu): the pytest logs, CSV files and Markdown tables. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh              # everything
#     QUICK=1 bash benchmarks/gpu_check.sh      # tests and one layer table only
#
# (Written without a GPU at hand: its running time is not measured yet. The model benchmark's budget is 2 s of
# rounds per model and runtime, so the model steps should take minutes, not tens of minutes.)
#
# It installs the package (without touching the machine's torch) if `condconv` cannot be imported. A failing test
# does not stop the benchmarks: the script ends with the exit status of the first failing step.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, tee the log, remember the first failure
    local name=$1; shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
    echo "=== $name: exit $rc"
}

if ! python -c "import condconv" 2>/dev/null; then
    pip install -q --no-deps -e . && pip install -q pyyaml safetensors tqdm numpy pillow pytest
fi
python - <<'EOF' | tee "$OUT/environment.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF

# 1. correctness on the GPU: every CUDA test, then the Triton kernel and strategy tests compiled for the device
#    (conftest switches Triton's interpreter on only when no GPU is present)
step tests-cuda python -m pytest -q -m cuda tests
step tests-triton python -m pytest -q tests/test_triton.py tests/test_triton_strategy.py
#    the kernels as compiled for this very GPU: registers, spills, shared memory, tensor-core instructions (the
#    same report as benchmarks/results/triton-compile.md, which was made without a GPU), next to the timings below
step compile-report env -u TRITON_INTERPRET PYTHONPATH=src python benchmarks/triton_compile_report.py \
    --out "$OUT/triton-compile.md"

# 2. layers: bf16 autocast, 8 experts, the README's shapes; 'triton' beside 'auto' and 'bmm' (the Triton kernels
#    of issue 21: small maps in example groups, large maps through a chunk workspace; see triton_launch)
step layers condconv bench layers --device cuda --dtype bfloat16 --experts 8 --batch 32 256 \
    --strategies auto bmm triton --kinds condconv dynamic odconv --budget 1 \
    --csv "$OUT/layers.csv" --force   # the tables are in layers.log

if [ -z "${QUICK:-}" ]; then
    # 3. models: the GPU-kernel table (inference B=256, a training step B=128, bf16, channels_last), auto vs triton
    step models python benchmarks/bench_models.py --device cuda --models gpu --batch 256 --train-batch 128 \
        --strategies auto triton --rounds 5 --budget 2 --out "$OUT/models"
    # 4. batch-1 latency, eager and torch.compile
    step models-b1 python benchmarks/bench_models.py --device cuda --models gpu --batch 1 --compile \
        --strategies auto triton --rounds 5 --budget 2 --out "$OUT/models-b1"
fi
echo "results in $OUT; first failing step's status: $status"
exit $status
