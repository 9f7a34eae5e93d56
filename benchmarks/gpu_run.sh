#!/usr/bin/env bash
# The one GPU session script: the Triton kernel and CUDA-graph tests compiled for real, the full-FLUX
# forward benchmark, `bitflux bench` on the demo pipeline (eager and as CUDA graphs), the per-layer GEMM
# benchmark, the small-M kernels' parameter sweep, then torch.compile runs. Each part has its own time
# limit and failures do not stop the next part; every part writes its results as it goes (the sweep after
# every row), so a run stopped by the device's 10-minute limit returns what it measured. --quick (~8
# minutes before the torch.compile parts: 474 s on an H200 with Triton 3.6, 2026-11-27, gpu_flux's 7 models
# in 96 s; the compiled runs only use what is left of a 10-minute call; limits sum to 1230 s): every
# strategy's and tile config's test, the exactness and CUDA-graph
# subset, gpu_flux with 3 timed forwards (the warm-up measures each layer shape's strategies; fp8 on tq1
# codes, fp8 with q/k/v not fused and bf16 with them fused too), the two benches, gpu_linear on 4 layers x M
# in {1, 16, 4096}, the sweep (a16, fp8, fp8 on tq1 codes), the demo bench and the full-size bf16 and fp8
# forwards with torch.compile.
#
#   OUT=results bash benchmarks/gpu_run.sh [--quick | --layers]   (from the repository root)
#
# --layers (~7 minutes on an H200, limits sum to 630 s): after a kernel change, what a layer shows: the quick test
# subset, gpu_linear --quick, gpu_linear with per-channel scales at 4096 tokens, the operands at one token
# (gpu_operands), then the small-M sweep, without the full forward, the benches or torch.compile.
#
# The Triton kernels launch with programmatic dependent launch on sm_90 (docs/GPU_KERNELS.md); the sweep times
# each default without it too. Should its compiled tests fail, BITFLUX_TRITON_PDL=0 in front runs all without.
#
# The device has no network: wheels in .whl/ are installed first (diffusers for gpu_flux, pytest-xdist to
# compile the tests' kernels in parallel), fetched beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata pytest-xdist execnet
#
# Files written to $OUT (8, what the device tool returns at most): run.log, pytest.txt, gpu_flux.{json,md}
# (not with --layers), gpu_linear.{json,md}, gpu_small_m.{json,md}. gpu_flux.md names the
# strategy chosen per layer shape.
set -u
QUICK=""
LAYERS=""
[ "${1:-}" = "--quick" ] && QUICK=1
[ "${1:-}" = "--layers" ] && QUICK=1 && LAYERS=1
OUT=${OUT:-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/run.log"
cd "$(dirname "$0")/.."

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
        || echo "wheel install failed (see above)" >> "$LOG"
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}  # shared by the three parts
# The Triton backend's strategy choices and the demo's ternary pipeline: outside $OUT, whose files come back.
export BITFLUX_CACHE=/tmp/bitflux-cache
# Without a GPU (rehearsing the script on a CPU) the benchmarks run tiny shapes in Triton's interpreter.
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    unset TRITON_INTERPRET
    DRY=""
else
    export TRITON_INTERPRET=1
    DRY="--dry-run"
fi

part() {  # part NAME SECONDS OUTFILE COMMAND...: run with a limit, log its status, never abort the script
    local name=$1 limit=$2 outfile=$3
    shift 3
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" >> "$outfile" 2>&1
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - start))s" | tee -a "$LOG"
}

pipeline_bench() {  # `bitflux bench` on the embedded demo pipeline, eager and as CUDA graphs (GPU only)
    [ -n "$DRY" ] && return
    part bench 60 "$LOG" python -m bitflux.cli bench --device cuda --steps 8 --no-cuda-graph
    part bench-graph 60 "$LOG" python -m bitflux.cli bench --device cuda --steps 8
}

compiled() {  # torch.compile, last: it only uses what time is left. The demo bench, then the full-size
    # forward in fp8 then bf16 (its tables go to run.log; $OUT already holds the 8 files the device returns)
    [ -n "$DRY" ] && return
    part bench-compile 90 "$LOG" python -m bitflux.cli bench --device cuda --steps 8 --compile
    part gpu_flux-compile 240 "$LOG" python benchmarks/gpu_flux.py --compile --modes fp8 bf16 --warmup 1 --iters 3 \
        --out /tmp/gpu_flux_compiled
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" 2>&1
    python -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
} >> "$LOG"

# Correctness first, with one config per regime (BITFLUX_TRITON_AUTOTUNE=0: each config is a compile);
# gpu_linear.py checks the tuned configs' outputs at the real shapes. xdist, if present, compiles in parallel.
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
if [ -n "$QUICK" ]; then
    part pytest 120 "$OUT/pytest.txt" env BITFLUX_TRITON_AUTOTUNE=0 python -m pytest tests/test_kernels_triton.py tests/test_graphs.py \
        tests/test_streaming.py \
        -k "strateg or choose or exact or integer or quantize or tile_config or graph or signature or replay or whole_steps or alpha or gpu or expand or nan or programmatic or a8_with_bias" -q --tb=short -rfE $XDIST -p no:cacheprovider
    part pytest-calibrate 45 "$OUT/pytest.txt" python -m pytest tests/test_calibrate.py -k gpu -q --tb=short -rfE -p no:cacheprovider
    [ -z "$LAYERS" ] && part gpu_flux 330 "$LOG" python benchmarks/gpu_flux.py --out "$OUT" $DRY --warmup 1 --iters 3
    [ -z "$LAYERS" ] && pipeline_bench
    part gpu_linear 150 "$LOG" python benchmarks/gpu_linear.py --out "$OUT" ${DRY:---quick}
    # per-channel scales at 4096 tokens (a16 on cuBLAS takes them in its transient): its table in run.log
    [ -n "$LAYERS" ] && part gpu_linear-channel 90 "$LOG" python benchmarks/gpu_linear.py --out /tmp/linear_channel \
        --channel ${DRY:---quick --tokens 4096} && cat /tmp/linear_channel/gpu_linear.md >> "$LOG"
    # one token: the quantizer with up to 16 warps, its tables in run.log (its own launch was ~a third of a8's
    # dp4a call there; dp4a1 does without it)
    [ -n "$LAYERS" ] && part gpu_operands-1 45 "$LOG" python benchmarks/gpu_operands.py --out /tmp/operands_m1 \
        --tokens 1 $DRY
    # the sweep last: cut short by the call's limit, it keeps the rows it measured
    part gpu_small_m 180 "$LOG" python benchmarks/gpu_small_m.py --out "$OUT" $DRY \
        --modes a16 fp8 a8
    [ -z "$LAYERS" ] && compiled
else
    part pytest 120 "$OUT/pytest.txt" env BITFLUX_TRITON_AUTOTUNE=0 python -m pytest tests/test_kernels_triton.py tests/test_graphs.py \
        tests/test_streaming.py -v --tb=short -rfE --durations=5 $XDIST -p no:cacheprovider
    part gpu_flux 240 "$LOG" python benchmarks/gpu_flux.py --out "$OUT" $DRY ${DRY:+--warmup 1 --iters 1}
    pipeline_bench
    part gpu_linear 150 "$LOG" python benchmarks/gpu_linear.py --out "$OUT" $DRY
    part gpu_small_m 180 "$LOG" python benchmarks/gpu_small_m.py --out "$OUT" $DRY
    compiled
fi
echo "done in ${SECONDS}s" | tee -a "$LOG"
tail -4 "$OUT/pytest.txt"
cat "$OUT/gpu_flux.md" "$OUT/gpu_linear.md" "$OUT/gpu_small_m.md" "$OUT/gpu_operands.md" 2>/dev/null || true  # each run writes some of them
