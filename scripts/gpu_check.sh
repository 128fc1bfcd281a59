#!/usr/bin/env bash
# The GPU check: on a machine with a GPU (no network needed, nothing is pip-installed) build
# the CUDA extension (for this GPU's arch only), run the quick GPU benchmark and the whole test suite on the GPU, and
# leave everything in OUTDIR: logs, the benchmark's JSON/CSV/markdown (and PNG plots when
# matplotlib is installed there), test results as JUnit XML.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Everything fits in GPU_CHECK_BUDGET_S seconds (default 470, under 8 minutes): the build
# first (on an H200: 119 s), then the tests that run on the GPU (up to 300 s, keeping 130 s:
# on the H200 2186 of their 2265 cases ran in 230 s), the quick benchmark (the project's main
# job: up to 120 s; 85 s on the H200), the Triton conv kernel report (up to 60 s), a host
# profile of the fused calls (scripts/profile_host.py, up to 40 s), densenet121's fp32 error
# per tensor (scripts/model_error.py, up to 40 s), the torch.compile tests, then, while time is left, up to 2 x 60 s of the cuda BN kernel tests
# under compute-sanitizer memcheck and racecheck, the CPU tests (CI runs those in full) and,
# if at least 120 s remain, torch.compile of torchvision's resnet50 training step beside
# resfused (compiling takes about a minute). A step that runs out of time is stopped with
# SIGTERM; the benchmark then writes what it measured as *-incomplete.* ("complete":
# false), pytest the failures so far and its JUnit XML (and its -v log names each test as
# it ends, in case pytest is killed before its report). Offline: RESFUSED_NO_INSTALL=1 (no
# pip call); a CUDA build that fails is retried without the CUDA kernels
# (RESFUSED_SKIP_CUDA_BUILD=1) so the rest still runs.
#
# GPU_CHECK_STEPS picks steps (comma-separated; default all, in this order): tests, bench,
# conv, conv-sweep, profile, model-error, compile-tests, sanitizer, cpu-tests, compile-bench. The build always runs
# (a no-op when the extension is already built), so a second call on a machine still warm
# can spend its budget on what the first did not reach, e.g.
#   GPU_CHECK_STEPS=compile-bench,profile GPU_CHECK_BUDGET_S=280 bash scripts/gpu_check.sh OUTDIR2
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
export RESFUSED_NO_INSTALL=${RESFUSED_NO_INSTALL:-1}   # the GPU machine is offline: no pip calls
BUDGET=${GPU_CHECK_BUDGET_S:-470}
STEPS=",${GPU_CHECK_STEPS:-tests,bench,conv,conv-sweep,profile,model-error,compile-tests,sanitizer,cpu-tests,compile-bench},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
t0=$(date +%s)
status=0
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
cap() { local want=$1 have; have=$(left); (( have - ${2:-0} < want )) && want=$(( have - ${2:-0} )); echo $(( want > 0 ? want : 0 )); }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# Build the CUDA kernels for this GPU's arch only (half the compile of the default two):
# the check's minutes are better spent measuring. TORCH_CUDA_ARCH_LIST set by the caller wins.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  [[ "$cc" =~ ^[0-9]+\.[0-9]+$ ]] && export TORCH_CUDA_ARCH_LIST="$cc"
fi
echo "CUDA archs to build: ${TORCH_CUDA_ARCH_LIST:-the default}"
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
git status --porcelain --untracked-files=no > "$OUT/git-status.txt" 2>/dev/null || true
if ! bash scripts/setup.sh > "$OUT/setup.log" 2>&1; then
  echo "setup/build failed (see setup.log, build.log)"; tail -n 40 "$OUT/setup.log"; status=1
  cp build.log "$OUT/build.log" 2>/dev/null || true
  # A CUDA toolkit that torch rejects (another major version, an unsupported host compiler)
  # must not cost the whole check: build the CPU kernels only and go on with the triton
  # and eager backends on the GPU.
  export RESFUSED_SKIP_CUDA_BUILD=1
  echo "retrying with RESFUSED_SKIP_CUDA_BUILD=1 (no resfused[cuda] in this check)"
  bash scripts/setup.sh > "$OUT/setup-cpu-only.log" 2>&1 \
    || { echo "setup failed again (see setup-cpu-only.log)"; tail -n 40 "$OUT/setup-cpu-only.log"; exit 1; }
  cp build.log "$OUT/build-cpu-only.log" 2>/dev/null || true
else
  cp build.log "$OUT/build.log" 2>/dev/null || true
fi
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -m resfused.info --json > "$OUT/info.json" 2>&1 || status=1

# 1. The test suite: every case that runs on the GPU (test ids name the device, e.g.
#    "cuda-cuda", "triton-cuda") but the torch.compile ones, which run after the benchmark
#    (tracing is CPU-bound: minutes; a budget that runs out should cut those, not the
#    kernels' tests); the CPU cases CI also runs come last, while the budget lasts.
#    SIGTERM from timeout stops pytest like Ctrl-C (tests/conftest.py): the failures so far
#    are listed and the JUnit XML is written. --durations: where the time went, for next time.
#    -v: one line per test as it ends, so a run cut short still names its failures.
gpu_tests() {  # name, -k expression, minimum seconds worth starting, seconds to keep for what follows
  # A test that crashes the process (a signal, not a failure) is recorded in crashes-NAME.txt
  # and the run goes on after it (tests/conftest.py: RESFUSED_TEST_TRACE / _AFTER), up to 3
  # times, in tests-NAME.log, tests-NAME-2.log, ...
  local t rc part=1 log xml after="" trace="$OUT/trace-$1.txt"
  : > "$trace"
  while :; do
    log="$OUT/tests-$1.log"; xml="$OUT/tests-$1.xml"
    (( part > 1 )) && { log="$OUT/tests-$1-$part.log"; xml="$OUT/tests-$1-$part.xml"; }
    t=$(cap 300 "$4")
    if (( t < $3 )); then
      echo "tests ($1, part $part) skipped: $t s left of the ${BUDGET} s budget" | tee "$log"; status=1; return
    fi
    RESFUSED_TEST_TRACE="$trace" RESFUSED_TEST_AFTER="$after" timeout -k 15 "$t" "$PY" -X faulthandler -m pytest \
      -v -rf -p no:cacheprovider -k "$2" --durations=25 --junitxml="$xml" > "$log" 2>&1
    rc=$?
    (( rc != 0 )) && status=1
    grep -E "(FAILED|ERROR)" "$log" | tail -n 40; tail -n 30 "$log"
    # 124/137: timeout's own exit; above 128 otherwise: killed by a signal (139: SIGSEGV)
    if (( rc > 128 && rc != 137 && part < 4 )) && [ -s "$trace" ]; then
      after=$(tail -n 1 "$trace")
      echo "CRASH (exit status $rc) in $after" | tee -a "$OUT/crashes-$1.txt"
      part=$(( part + 1 ))
    else
      return
    fi
  done
}
want tests && gpu_tests gpu "cuda and not test_compile and not test_cuda_sim" 30 130  # (the simulator: CPU work, CI runs it)
echo "gpu tests: $(( $(date +%s) - t0 )) s"

# 2. The quick GPU benchmark (every level, every provider that runs there but torch.compile).
t=$(cap 120 30)
if ! want bench; then
  echo "benchmark: not among GPU_CHECK_STEPS"
elif (( t >= 45 )); then
  timeout -k 15 "$t" "$PY" -m resfused.bench --quick --device cuda --out "$OUT" --name bench-cuda-quick \
    --max-time $(( t - 30 )) > "$OUT/bench.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && { echo "benchmark exit status $rc (see bench.log)"; status=1; }
  cat "$OUT/bench.log"
else
  echo "benchmark skipped: $t s left of the ${BUDGET} s budget" | tee "$OUT/bench.log"; status=1
fi
echo "benchmark: $(( $(date +%s) - t0 )) s"

# 2b. The Triton convolution kernels against the library path at ResNet-50's conv shapes
#     (bf16, batch 128): achieved TFLOP/s and GB/s against the measured ceilings.
t=$(cap 60 10)
if ! want conv; then
  echo "conv kernel report: not among GPU_CHECK_STEPS"
elif (( t >= 30 )); then
  timeout -k 10 "$t" "$PY" -m resfused.bench.conv --device cuda --dtype bf16 --batch 128 --reps 10 --out "$OUT" \
    > "$OUT/bench-conv.log" 2>&1 || { echo "conv kernel report: exit status $? (see bench-conv.log)"; status=1; }
  tail -n 45 "$OUT/bench-conv.log"
else
  echo "conv kernel report skipped: $t s left of the ${BUDGET} s budget" | tee "$OUT/bench-conv.log"
fi


# 2b'. The Triton forward conv per fused mode and tile config at stage1.conv1 and stage3.conv2 (what its
#      time is spent on: scripts/conv_sweep.py; up to 60 s, most of it compiling).
t=$(cap 60 10)
if want conv-sweep && (( t >= 30 )); then
  timeout -k 5 "$t" "$PY" scripts/conv_sweep.py --shape stage1.conv1 --shape stage3.conv2 --tiles 3 \
    > "$OUT/conv-sweep.txt" 2>&1 || echo "conv sweep: exit status $? (see conv-sweep.txt)"
  cat "$OUT/conv-sweep.txt"
fi

# 2c. Where the fused calls' time goes (host or GPU): torch.profiler tables of the join,
#     BN-ReLU and Bottleneck cases beside eager (about 10 s on the H200).
t=$(cap 40 10)
if want profile && (( t >= 20 )); then
  timeout -k 5 "$t" "$PY" scripts/profile_host.py --device cuda > "$OUT/profile-host.txt" 2>&1 \
    || echo "host profile: exit status $? (see profile-host.txt)"
  grep -E "^(===|#)" "$OUT/profile-host.txt"
fi

# 2d. densenet121's fp32 error against the float64 oracle per tensor, eager beside the
#     cuda and triton backends (scripts/model_error.py; about 20 s).
t=$(cap 40 10)
if want model-error && (( t >= 20 )); then
  timeout -k 5 "$t" "$PY" scripts/model_error.py --model densenet121 --device cuda --backends eager,cuda,triton \
    > "$OUT/model-error.txt" 2>&1 || echo "model error report: exit status $? (see model-error.txt)"
  sed -n 1,6p "$OUT/model-error.txt"
fi

# 3. The torch.compile tests on the GPU.
want compile-tests && gpu_tests gpu-compile "cuda and test_compile" 30 10

# 3b. The CUDA kernels' memory accesses under compute-sanitizer (memcheck, then racecheck
#     on their shared-memory reductions): a few BN kernel tests on the cuda backend, the
#     prefix views first, up to 60 s each, when the toolkit has the tool. Without torch's
#     caching allocator every tensor is its own allocation, so memcheck sees an overread
#     past a tensor (inside a cached segment it would not).
SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || true)
for tool in memcheck racecheck; do
  want sanitizer || break
  t=$(cap 60 130)
  if [ -n "$SAN" ] && (( t >= 30 )); then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$t" "$SAN" --tool "$tool" --error-exitcode 99 \
      --target-processes all "$PY" -m pytest -q -p no:cacheprovider -x \
      tests/test_bn_act.py::test_channel_prefix_views tests/test_bn_act.py::test_apply_accumulates_into_a_prefix \
      tests/test_bn_act.py::test_reduce_writes_dz \
      tests/test_bn_act.py::test_other_dtypes_match_oracle -k "cuda-cuda" \
      > "$OUT/sanitizer-$tool.log" 2>&1
    rc=$?
    case $rc in
      0) echo "compute-sanitizer $tool: clean" ;;
      124|137) echo "compute-sanitizer $tool: NOT VERIFIED, stopped at its time limit (see sanitizer-$tool.log for what ran)" ;;
      *) echo "compute-sanitizer $tool: exit status $rc (see sanitizer-$tool.log)"; status=1 ;;
    esac
    tail -n 15 "$OUT/sanitizer-$tool.log"
  else
    echo "compute-sanitizer $tool skipped (${SAN:-no compute-sanitizer}; $t s left)" | tee "$OUT/sanitizer-$tool.log"
  fi
done
t=$(cap 300 130)
if want cpu-tests && (( t >= 60 )); then
  timeout -k 15 "$t" "$PY" -m pytest -q -p no:cacheprovider -k "not cuda" --junitxml="$OUT/tests-cpu.xml" \
    > "$OUT/tests-cpu.log" 2>&1 || echo "cpu tests: stopped or failed (see tests-cpu.log; CI runs them in full)"
  tail -n 5 "$OUT/tests-cpu.log"
fi
echo "tests: $(( $(date +%s) - t0 )) s"

# 4. torch.compile of torchvision's resnet50 training step (bf16 autocast, channels_last,
#    batch 128) beside eager, resfused (library convs, and the Triton convs) and torch.compile
#    of resfused's model (no Python between its fused ops), when the budget allows.
t=$(cap 200 10)
if ! want compile-bench; then
  echo "torch.compile comparison: not among GPU_CHECK_STEPS"
elif (( t >= 120 )); then
  timeout -k 15 "$t" "$PY" -m resfused.bench --quick --device cuda --out "$OUT" --name bench-cuda-compile \
    --level model --case resnet50 --mode train_step \
    --provider "eager_cl,compile,resfused[cuda],resfused[compile],resfused[tconv]" \
    --max-time $(( t - 20 )) > "$OUT/bench-compile.log" 2>&1 || status=1
  tail -n 30 "$OUT/bench-compile.log"
else
  echo "torch.compile comparison skipped: $t s left of the ${BUDGET} s budget" | tee "$OUT/bench-compile.log"
fi
echo "total: $(( $(date +%s) - t0 )) s, status $status"
exit $status
