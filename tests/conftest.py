"""Test set-up: Triton runs through its interpreter where there is no GPU (set before
anything imports triton), seeds are fixed per test, and backends are parametrised over
what this machine can run, so every GPU test is the CPU test on another device."""
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield
