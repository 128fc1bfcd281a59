"""pytest-benchmark suite over the cases of ``python -m resfused.bench`` (resfused/bench/cases.py).

    pytest benchmarks/ --benchmark-only                              # toy shapes (preset "tiny")
    RESFUSED_BENCH_PRESET=quick pytest benchmarks/ --benchmark-only -k "join and resfused"
    RESFUSED_BENCH_DEVICE=cuda RESFUSED_BENCH_PRESET=full pytest benchmarks/ --benchmark-only

One test per (case, provider) that the CLI would run by default. Each first checks the
provider's result against the case's eager baseline (the CLI's check and tolerances), then
times the call with pytest-benchmark; tests are grouped by case so providers line up. The
main test command does not collect this directory (pytest.ini: testpaths = tests).
"""
from __future__ import annotations

import os

import pytest
import torch

from resfused.bench.cases import PROVIDERS, baseline_provider, select_cases
from resfused.bench.runner import available_cores, case_providers, check_outputs, mismatch_message, sync
from resfused.bench.workloads import make_instance, make_shared

PRESET = os.environ.get("RESFUSED_BENCH_PRESET", "tiny")
DEVICE = torch.device(os.environ.get("RESFUSED_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cpu":
    torch.set_num_threads(available_cores())

CASES = [c for c in select_cases(PRESET, DEVICE.type) if c.timed]
PARAMS = [pytest.param(case, provider, id=f"{case.key}-{provider}")
          for case in CASES for provider in case_providers(case, PROVIDERS, DEVICE, PRESET, [])[0]]

_baselines: dict = {}


def _baseline(case):
    """(shared inputs, baseline outputs, fp32 reference or None) of a case, computed once."""
    if case.key not in _baselines:
        shared = make_shared(case, DEVICE)
        base = make_instance(case, baseline_provider(case), shared, DEVICE).check()
        ref = make_instance(case, "eager", shared, DEVICE, reference=True).check() if case.dtype != "fp32" else None
        _baselines[case.key] = (shared, base, ref)
    return _baselines[case.key]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_case(benchmark, case, provider):
    shared, base_out, ref = _baseline(case)
    inst = make_instance(case, provider, shared, DEVICE)
    base = baseline_provider(case)
    if provider != base:
        verdict = check_outputs(case, {base: base_out, provider: inst.check()}, base, ref)[provider]
        assert verdict["ok"], mismatch_message(case, provider, verdict)

    def call():
        inst.run()
        sync(DEVICE)

    benchmark.group = case.label
    benchmark.extra_info.update({"case": case.key, "provider": provider, "dtype": case.dtype,
                                 "memory_format": case.memory_format, "batch": case.batch, "device": str(DEVICE)})
    benchmark.pedantic(call, warmup_rounds=max(case.warmup - 1, 0), rounds=max(case.reps, 3), iterations=1)
