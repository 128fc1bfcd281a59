#!/usr/bin/env bash
# Run the resfused test suite (sets up and builds first; a no-op rebuild takes seconds).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k triton -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m pytest -q "$@"
