"""Test set-up: Triton runs through its interpreter where there is no GPU (set before
anything imports triton), seeds are fixed per test, and backends are parametrised over
what this machine can run, so every GPU test is the CPU test on another device.

On a GPU, fp32 convolutions and matmuls run in true fp32 (no TF32: the tests compare fp32
results with a float64 oracle at 1e-5, which TF32's 10-bit mantissa misses by far), and
cuBLAS gets the workspace setting that ``torch.use_deterministic_algorithms(True)``
requires (without it every matmul on a CUDA tensor raises in deterministic mode).

SIGTERM (``timeout``, a job's time limit) stops the run as Ctrl-C does, so the failures
so far are still reported and ``--junitxml`` is still written.

A crash (a signal that kills the process) must not cost the rest of a run either: with
``RESFUSED_TEST_TRACE=FILE`` each test's id is appended to FILE as it starts, so the last
line names the test that crashed, and ``RESFUSED_TEST_AFTER=ID`` deselects every test up
to and including ID in collection order, so a rerun goes on after it
(scripts/gpu_check.sh does both)."""
import os
import random
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS is first used
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

import pytest  # noqa: E402

# Two threads (CI's cores). With a GPU the CPU side is the float64 oracles (whole models
# through SGD steps): up to eight threads there, where a GPU box has the cores.
torch.set_num_threads(min(8 if torch.cuda.is_available() else 2, torch.get_num_threads()))


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
    signal.signal(signal.SIGTERM, _terminated)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


_TRACE = os.environ.get("RESFUSED_TEST_TRACE")


def pytest_runtest_logstart(nodeid, location):
    if _TRACE:
        with open(_TRACE, "a") as f:  # (closed, so written through to the OS, at once)
            f.write(nodeid + "\n")


def pytest_collection_modifyitems(config, items):
    after = os.environ.get("RESFUSED_TEST_AFTER")
    if not after:
        return
    ids = [item.nodeid for item in items]
    if after not in ids:
        raise pytest.UsageError(f"RESFUSED_TEST_AFTER={after!r} is not among the collected tests")
    cut = ids.index(after) + 1
    config.hook.pytest_deselected(items=items[:cut])
    items[:] = items[cut:]
