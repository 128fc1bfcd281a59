#!/usr/bin/env bash
# Set up resfused from a clean checkout and build its extension in place.
#   * Installs torch/torchvision (pinned, CUDA 13.0 build) when torch is missing, and the
#     test tools (pytest, hypothesis, ninja) when missing. On a machine with torch
#     already installed and no network (the GPU machine), nothing is installed.
#   * Tries the benchmark's optional tools (matplotlib for its plots, tqdm for its progress
#     bar); without them it prints why the plots are skipped and shows text progress.
#   * Builds resfused._C (CPU kernels always; CUDA kernels when torch is a CUDA build and
#     a toolkit is found). ninja makes a rebuild with no source change take seconds.
# Knobs: PYTHON, TORCH_CUDA_ARCH_LIST, RESFUSED_SKIP_CUDA_BUILD, MAX_JOBS, CUDA_HOME,
# RESFUSED_NO_INSTALL=1 (a machine known to be offline: try no pip install at all; a pip
# call there can wait on DNS and connection timeouts before it fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NO_INSTALL=${RESFUSED_NO_INSTALL:-0}
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --retries 0 --timeout 10)

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

if ! have torch && [ "$NO_INSTALL" = 1 ]; then
  echo "[setup] torch is not installed and RESFUSED_NO_INSTALL=1" >&2
  exit 1
fi
if ! have torch; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
  "$PY" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
missing=()
have torchvision || missing+=("torchvision")
have ninja || missing+=("ninja")
have pytest || missing+=("pytest")
have hypothesis || missing+=("hypothesis")
have onnx || missing+=("onnx")          # the ONNX export tests (skipped without onnx + onnxscript)
have onnxscript || missing+=("onnxscript")
if [ ${#missing[@]} -gt 0 ] && [ "$NO_INSTALL" = 1 ]; then
  offline=1
  have pytest || { echo "[setup] pytest is required (RESFUSED_NO_INSTALL=1: nothing is installed)" >&2; exit 1; }
  echo "[setup] RESFUSED_NO_INSTALL=1: not installing ${missing[*]}; continuing without" >&2
elif [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing ${missing[*]}"
  # Short timeouts: on a machine without network this fails fast instead of retrying.
  if ! "${PIP[@]}" "${missing[@]}"; then
    offline=1
    # Offline machines (the GPU machine) may lack optional test tools; only pytest is required.
    have pytest || { echo "[setup] pytest is required and could not be installed" >&2; exit 1; }
    echo "[setup] warning: could not install ${missing[*]}; continuing without" >&2
  fi
fi

offline=${offline:-0}
optional=()
have matplotlib || optional+=("matplotlib")
have tqdm || optional+=("tqdm")
if [ ${#optional[@]} -gt 0 ] && [ "$offline" = 0 ]; then
  echo "[setup] installing optional benchmark tools: ${optional[*]}"
  "${PIP[@]}" "${optional[@]}" \
    || echo "[setup] note: could not install ${optional[*]}; the benchmark runs without (no plots, text progress)" >&2
fi

echo "[setup] building resfused._C"
start=$(date +%s)
"$PY" setup.py build_ext --inplace > build.log 2>&1 || { tail -n 60 build.log >&2; echo "[setup] build failed; full log in build.log" >&2; exit 1; }
grep -E "^\[resfused setup\]" build.log || true
echo "[setup] build finished in $(( $(date +%s) - start )) s"
"$PY" -m resfused.info
