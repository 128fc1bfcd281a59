#!/usr/bin/env bash
# Set everything up from a clean checkout, then run the main job: the quick benchmark
# (CPU here; the GPU when one is present). Results: benchmarks/results/latest-<device>-quick.*
# (JSON, CSV, markdown, PNG plots). Extra arguments go to the benchmark (python -m resfused.bench --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m resfused.bench --quick "$@"
