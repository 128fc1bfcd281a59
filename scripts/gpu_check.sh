#!/usr/bin/env bash
# The GPU check: on a machine with a GPU (no network needed) build the CUDA extension,
# run the whole test suite on the GPU, run the quick GPU benchmark, and write logs and
# JSON into OUTDIR. Usage: bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
status=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
bash scripts/setup.sh > "$OUT/setup.log" 2>&1 || { echo "setup/build failed (see setup.log)"; tail -n 40 "$OUT/setup.log"; exit 1; }
cp build.log "$OUT/build.log" 2>/dev/null || true
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -m resfused.info --json > "$OUT/info.json" 2>&1 || status=1
timeout 300 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -n 25 "$OUT/tests.log"
echo "tests: $(( $(date +%s) - t0 )) s"
timeout 180 "$PY" -m benchmarks.bench --quick --compile --device cuda --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.log"
echo "total: $(( $(date +%s) - t0 )) s, status $status"
exit $status
