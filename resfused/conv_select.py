"""Which convolutions a fused block runs: the library's (cuDNN / oneDNN, with the fused
elementwise kernels around them) or resfused's Triton implicit-GEMM convolutions with
BatchNorm fused into their prologue and epilogue (``resfused.triton.conv``).

``use_conv("triton" | "library" | "auto")`` (context manager) or ``RESFUSED_CONV`` force
a choice. ``"auto"`` (the default) uses the library convolutions except on a CUDA
device where the block can run the Triton ones; there the first call of each block
shape times both paths (forward + backward, on copies: no running statistic changes)
and keeps the faster. Choices are cached per shape, dtype, device and versions, in
memory and in ``$RESFUSED_CACHE_DIR/conv_choice.json`` (default
``~/.cache/resfused``), so a later process starts with them. ``RESFUSED_CONV_AUTOTUNE=0``
turns timing off (auto then means the library, unless the cache says otherwise). While
``torch.compile`` traces, only the cache is consulted.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from ._backend import forcing, on_device

CONV_CHOICES = ("auto", "triton", "library")

_state = threading.local()
_lock = threading.Lock()
_memory: Dict[str, Dict] = {}
_loaded = {"path": None}


@contextlib.contextmanager
def use_conv(name: Optional[str]) -> Iterator[None]:
    """Force the convolutions of fused blocks inside the ``with`` block: ``"triton"``
    (raises where they cannot run, saying why), ``"library"``, or ``"auto"``/``None``
    (choose per shape)."""
    if name is not None and name not in CONV_CHOICES:
        raise ValueError(f"use_conv: unknown choice {name!r}; choose one of {', '.join(CONV_CHOICES)}")
    with forcing(_state, name):
        yield


def forced_conv() -> str:
    """The conv choice in force now: ``use_conv``'s, else ``RESFUSED_CONV``'s, else "auto"."""
    name = getattr(_state, "forced", None)
    if name is None:
        name = os.environ.get("RESFUSED_CONV") or "auto"
        if name not in CONV_CHOICES:
            raise ValueError(f"RESFUSED_CONV={name!r} is not a conv choice; choose one of {', '.join(CONV_CHOICES)}")
    return name


def cache_path() -> str:
    root = os.environ.get("RESFUSED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "resfused")
    return os.path.join(root, "conv_choice.json")


def _load() -> None:
    path = cache_path()
    if _loaded["path"] == path:
        return
    if _loaded["path"] is not None:  # another cache directory: its own choices only
        _memory.clear()
    _loaded["path"] = path
    try:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            _memory.update({k: v for k, v in data.items() if isinstance(v, dict) and v.get("choice") in
                            ("triton", "library")})
    except FileNotFoundError:
        pass
    except Exception as exc:  # a corrupt cache is ignored, not fatal
        warnings.warn(f"resfused: ignoring the conv choice cache {path}: {exc}")


def _save() -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_memory, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"resfused: could not write the conv choice cache {path}: {exc}")


@functools.lru_cache(maxsize=None)
def versions_key(device: torch.device) -> str:
    """Device name and torch/triton versions: the part of a cache key that marks where the
    timing was made (computed once per device; every auto-mode call on CUDA asks for it)."""
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|torch {torch.__version__}|triton {tv}"


def cached(key: str) -> Optional[str]:
    with _lock:
        _load()
        entry = _memory.get(key)
    return None if entry is None else entry["choice"]


def cached_any_size(key: str) -> Optional[str]:
    """The choice recorded for ``key`` at every input size seen, when they agree (None when
    none is recorded or they differ): ``key`` has ``|x*`` where a full key has the
    input's shape (``|x(N, C, H, W)``)."""
    with _lock:
        _load()
        found = {v["choice"] for k, v in _memory.items() if re.sub(r"\|x\([^)]*\)", "|x*", k, count=1) == key}
    return found.pop() if len(found) == 1 else None


def clear_cache(memory_only: bool = False) -> None:
    """Forget every cached choice and delete the cache file; with ``memory_only`` keep the
    file, which the next lookup reads again (as a new process would)."""
    with _lock:
        _memory.clear()
        _loaded["path"] = None
        if not memory_only:
            with contextlib.suppress(FileNotFoundError):
                os.remove(cache_path())


def autotune_enabled() -> bool:
    return os.environ.get("RESFUSED_CONV_AUTOTUNE", "1") not in ("0", "", "false", "no")


def _time_ms(fn: Callable[[], None], device: torch.device, reps: int = 5) -> float:
    fn()  # warm-up (compiles Triton kernels, cuDNN picks algorithms)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        import time

        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def _isolated(device: torch.device) -> Iterator[None]:
    """What the timing runs must not touch: the random streams (dropout draws in the
    runs) and the caller's saved-tensor hooks (activation checkpointing, offloading)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


def choose(key: str, device: torch.device, runs: Dict[str, Callable[[], None]]) -> str:
    """The cached choice for ``key``; on a miss, time each of ``runs`` (median of 5
    after a warm-up, random streams and saved-tensor hooks left as they were), cache the
    fastest and return it. A candidate that raises is skipped; a choice made while one
    raised (out of memory, say) is kept for this process only, not written to the file.
    While a CUDA graph is being captured nothing is timed ("library" unless cached)."""
    hit = cached(key)
    if hit is not None:
        return hit
    with on_device(device):  # events, capture state and Triton launches on device's stream
        if not autotune_enabled() or _capturing(device):
            return "library"
        times, errors = _time_candidates(device, runs)
    if not times:
        return "library"
    best = min(times, key=times.get)
    with _lock:
        _memory[key] = {"choice": best, "ms": times, **({"errors": errors} if errors else {})}
        if not errors:
            _save()
    return best


def _time_candidates(device: torch.device, runs: Dict[str, Callable[[], None]]
                     ) -> Tuple[Dict[str, float], Dict[str, str]]:
    """(times in ms, errors) of the candidates that ran and of those that raised."""
    times: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    with _isolated(device):
        for name, fn in runs.items():
            try:
                times[name] = _time_ms(fn, device)
            except Exception as exc:  # e.g. out of memory: that candidate loses
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    return times, errors


def entries() -> Dict[str, Dict]:
    """A copy of the cached choices: key -> {"choice", "ms", ...}."""
    with _lock:
        _load()
        return {k: dict(v) for k, v in _memory.items()}
