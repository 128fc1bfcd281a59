"""Kept for old command lines: ``python -m benchmarks.bench`` is ``python -m resfused.bench``
(the benchmark lives in the package: resfused/bench/)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from resfused.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
