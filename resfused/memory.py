"""Deterministic memory measure (DESIGN.md §6): bytes of the distinct storages autograd
saves for backward during a forward, parameters excluded, on any device."""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch
from torch import nn


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Run ``fn()`` (a training forward) and return the bytes of the distinct storages that
    autograd saved for backward, leaving out the storages of ``exclude`` (e.g. parameters).
    The forward's outputs are dropped before returning."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def model_saved_bytes(model: nn.Module, x: torch.Tensor, exclude_parameters: bool = True) -> int:
    """``saved_bytes`` of ``model(x)`` in its current mode, parameters and buffers excluded."""
    exclude = list(model.parameters()) + list(model.buffers()) if exclude_parameters else []
    return saved_bytes(lambda: model(x), exclude)


__all__ = ["saved_bytes", "model_saved_bytes"]
