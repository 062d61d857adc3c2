#!/usr/bin/env bash
# Performance regression check, run by hand on a quiet machine (never in CI: timings are not test
# assertions).  Times the pytest-benchmark suites in benchmarks/ and compares every benchmark with
# this machine's saved baseline; exits nonzero when a mean is more than 25% slower.
#
#   bash benchmarks/regress.sh --save      # record this machine's baseline (replaces the old one)
#   bash benchmarks/regress.sh             # compare with it (pytest-benchmark's compare table)
#   bash benchmarks/regress.sh -k kde      # further arguments go to pytest
#
# Baselines: benchmarks/results/baselines/<machine>/<platform>-<python>/0001_baseline.json, where
# <machine> is $GEOSAMPLE_BENCH_MACHINE or the CPU model and core count.  The threshold is
# $GEOSAMPLE_REGRESS_FAIL (default mean:25%, any --benchmark-compare-fail expression).  The suites
# time ./geosample, so build the extension in place first (pip install -e . --no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."

machine_id() {
    python -c 'import os, platform, re
model = platform.processor() or platform.machine()
try:
    model = next(line.split(":", 1)[1] for line in open("/proc/cpuinfo") if line.startswith("model name"))
except (OSError, StopIteration):
    pass
model = re.sub(r"\((r|tm)\)", "", model.lower())
print(re.sub(r"[^a-z0-9]+", "-", model).strip("-") + f"-{os.cpu_count()}cpu")'
}
storage="benchmarks/results/baselines/${GEOSAMPLE_BENCH_MACHINE:-$(machine_id)}"

python -c "import geosample as gs, os, sys
print('geosample', gs.__version__, 'from', gs.__file__, '| C++ extension:', gs.has_cpp(), '| baseline:', '$storage')
sys.exit(0 if gs.has_cpp() or os.environ.get('GEOSAMPLE_NO_CPP') else 'no geosample._C: pip install -e . --no-build-isolation')"

run=(python -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable --benchmark-only
     --benchmark-storage="file://$storage" --benchmark-columns=min,mean,stddev,rounds --benchmark-sort=name)
if [[ "${1:-}" == "--save" ]]; then
    shift
    rm -f "$storage"/*/*_baseline.json
    exec "${run[@]}" --benchmark-save=baseline "$@"
fi
if ! compgen -G "$storage/*/*_baseline.json" >/dev/null; then
    echo "no baseline for this machine in $storage: record one with bash benchmarks/regress.sh --save" >&2
    exit 2
fi
exec "${run[@]}" --benchmark-compare --benchmark-compare-fail="${GEOSAMPLE_REGRESS_FAIL:-mean:25%}" "$@"
