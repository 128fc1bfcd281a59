#!/usr/bin/env bash
# Set everything up from a clean checkout, then run the main job: the quick benchmark
# (CPU here; the GPU when one is present). Results: benchmarks/results/latest-<device>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m benchmarks.bench --quick "$@"
