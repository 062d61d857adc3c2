#!/usr/bin/env bash
# Every check that needs a GPU, in one run (at most 5 minutes, so a cold start, one run and a rerun
# fit in a 15-minute device budget):
#   1. the Triton kernels compiled for real against the torch / float64 paths (fused solver step,
#      KDE denoiser, GITS cost matrix) and CUDA-graph capture of the fused sampler;
#   2. the GPU benchmarks, as pytest-benchmark JSON: <out>/{fused_step,gits,kde}_cuda.json, to set
#      beside the roofline table that `python -m geosample.kernels.compile_check` prints.
# GEOSAMPLE_STRICT_TRITON=1: a kernel that fails on the device is an error here, never a silent fallback.
# <out> is $OUT when set (the device tool's return folder), else benchmarks/results/; the whole log
# goes to <out>/gpu_check.log.  Exit status: 2 without a CUDA device, 1 if any step failed.
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GEOSAMPLE_STRICT_TRITON=1
py="${PYTHON:-python3}"
status=0

step() {  # step SECONDS COMMAND...: run with a time limit, note a failure and go on
    local limit=$1; shift
    echo "== $*"
    timeout "$limit" "$@" || { echo "!! failed (exit $?): $*"; status=1; }
}

bench() {  # bench SECONDS NAME SELECTION: one benchmark file's GPU cases at full size
    step "$1" env GEOSAMPLE_BENCH_FULL=1 "$py" -m pytest -q -p no:cacheprovider "benchmarks/bench_$2.py" -k "$3" \
        --benchmark-enable --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.1 \
        --benchmark-json "$out/$2_cuda.json"
}

checks() {
    date -u
    "$py" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)" || return 2
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
    # the limits add up to 270 s (plus start-up): the whole script stays within 5 minutes
    step 120 "$py" -m pytest -q -p no:cacheprovider -rs tests/test_fused_step.py tests/test_kde_triton.py \
        tests/test_gits_triton.py
    bench 45 fused_step cuda
    bench 30 gits gpu
    bench 75 kde gpu
    date -u
    return $status
}

checks 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
