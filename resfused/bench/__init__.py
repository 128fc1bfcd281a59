"""resfused's benchmark: ``python -m resfused.bench`` (``resfused-bench``) and the shared
case definitions the pytest-benchmark suite in ``benchmarks/`` also runs.

    cases.py      the cases and presets (levels op / block / model, providers, dtypes)
    workloads.py  what each provider runs for a case (the timed and the checked call)
    runner.py     interleaved timing, memory, correctness check, the run's context
    report.py     table, JSON/CSV/markdown records, plots, --compare
"""
from .cases import LEVELS, PRESETS, PROVIDERS, Case, preset_cases, select_cases

__all__ = ["Case", "LEVELS", "PRESETS", "PROVIDERS", "preset_cases", "select_cases"]
