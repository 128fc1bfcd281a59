"""Backend availability and per-call choice.

Backends: ``cuda`` (the C++/CUDA kernels of ``resfused._C``), ``triton``,
``cpu`` (the C++ CPU kernels of ``resfused._C``) and ``eager`` (plain PyTorch).
The choice is made per call from the tensor's device and what is available:
CUDA tensor -> cuda if built, else triton; CPU tensor -> cpu if built, else
eager. ``use_backend(name)`` or ``RESFUSED_BACKEND=name`` forces one; a forced
backend that cannot run raises with the reason and the fix, never falls back.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import Iterator, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "eager")

_BUILD_FIX = ("build it with `python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`) "
              "from the repository root; see README.md, 'Build options'")

# dtypes each backend's kernels are written for
SUPPORTED_DTYPES = {
    "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "eager": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}

_state = threading.local()


@functools.lru_cache(maxsize=None)
def load_extension() -> Tuple[Optional[object], str]:
    """Import ``resfused._C`` once. Returns (module or None, reason it is missing)."""
    try:
        mod = importlib.import_module("resfused._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        return None, f"resfused._C could not be imported ({type(exc).__name__}: {exc})"
    return mod, ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton could not be imported ({type(exc).__name__}: {exc}); install triton >= 3.2"
    return ""


def on_device(device: torch.device):
    """A context making ``device`` the current CUDA device where it is a CUDA device that
    is not already current (a no-op context otherwise). Triton launches its kernels, and
    CUDA events record, on the current device's stream: a tensor on ``cuda:1`` while
    ``cuda:0`` is current needs this around them (the C++ kernels guard themselves)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def unavailable_reason(name: str, device: torch.device) -> str:
    """Empty string when backend ``name`` can run on ``device``; else why not and how to fix it."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    dev = device.type
    if name == "eager":
        return ""
    if name == "cpu":
        if dev != "cpu":
            return f"the cpu backend runs CPU tensors only, got a {dev} tensor"
        ext, why = load_extension()
        return "" if ext is not None else f"{why}; {_BUILD_FIX}"
    if name == "cuda":
        if dev != "cuda":
            return f"the cuda backend runs CUDA tensors only, got a {dev} tensor"
        ext, why = load_extension()
        if ext is None:
            return f"{why}; {_BUILD_FIX}"
        if not getattr(ext, "with_cuda", False):
            return ("resfused._C was built without CUDA kernels (torch was a CPU build, no CUDA toolkit was found, "
                    f"or RESFUSED_SKIP_CUDA_BUILD=1); install a CUDA build of torch and a CUDA toolkit, then {_BUILD_FIX}")
        return ""
    # triton
    why = _triton_import_error()
    if why:
        return why
    if dev == "cuda":
        return ""
    if dev == "cpu" and triton_interpreting():
        return ""
    return (f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, set before "
            f"importing resfused), got a {dev} tensor")


def forced_backend() -> Optional[str]:
    name = getattr(_state, "forced", None)
    if name is None:
        name = os.environ.get("RESFUSED_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"RESFUSED_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda" if not unavailable_reason("cuda", device) else "triton"
    if device.type == "cpu" and not unavailable_reason("cpu", device):
        return "cpu"
    return "eager"


def select_backend(device: torch.device) -> str:
    """The backend a call on ``device`` uses now; raises if a forced one cannot run."""
    name = forced_backend()
    if name is None:
        return default_backend(device)
    why = unavailable_reason(name, device)
    if why:
        raise RuntimeError(f"resfused backend {name!r} was forced but cannot run here: {why}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for calls made inside the block (``None`` restores automatic choice).

    >>> with resfused.use_backend("eager"):
    ...     y = resfused.functional.batch_norm_act(x, rm, rv, w, b, training=True)
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    with forcing(_state, name):
        yield


@contextlib.contextmanager
def forcing(state: threading.local, name: Optional[str]) -> Iterator[None]:
    """Set ``state.forced`` to ``name`` for the ``with`` block (this thread), then restore it."""
    prev = getattr(state, "forced", None)
    state.forced = name
    try:
        yield
    finally:
        state.forced = prev
