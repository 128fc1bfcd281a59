"""Synchronized batch statistics across processes, with ``nn.SyncBatchNorm``'s semantics.

Forward: each rank's per-channel (count, mean, biased var) are all-gathered and merged
(Chan et al.'s parallel update, in float64), so every rank normalises with the statistics
of the whole distributed batch and updates its running statistics with them (unbiased
with the total count). Backward: the per-channel sums (sum dz, sum dz*x_hat) are
all-reduced for the input gradient; the weight and bias gradients stay local, as
``nn.SyncBatchNorm`` returns them (``DistributedDataParallel`` then averages them).

Every collective first exchanges the channel count, so ranks that disagree on the shape
raise on every rank instead of hanging in a mismatched collective.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(process_group: Any) -> Any:
    """The process group a synchronized BN uses: ``None`` means the default (WORLD) group.
    Raises a clear error when torch.distributed is unusable or the argument is not a group."""
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("sync_bn: torch.distributed is not available in this build of torch")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"sync_bn: process_group must be a torch.distributed.ProcessGroup (or None for the "
                        f"default group), got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("sync_bn: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group(...) before a training forward")
    return dist.group.WORLD if process_group is None else process_group


def _check_ready(group: Any) -> int:
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError("sync_bn: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group(...) before a training forward")
    return dist.get_world_size(group)


def _check_same_channels(c: int, device: torch.device, group: Any, world: int) -> None:
    dist = _dist()
    mine = torch.tensor([c], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    counts = [int(t) for t in every]
    if len(set(counts)) != 1:
        raise RuntimeError(f"sync_bn: ranks disagree on the channel count of a synchronized BatchNorm "
                           f"(channels per rank: {counts})")


def _check_more_than_one(total: int) -> None:
    if total == 1:
        raise ValueError("Expected more than 1 value per channel when training, got 1 value per channel over "
                         "the whole process group")


def sync_batch_stats(mean: Tensor, var: Tensor, count: int, group: Any) -> Tuple[Tensor, Tensor, int]:
    """Merge each rank's (count, mean, biased var) into the statistics of the whole batch.
    Returns (mean, var, total count), mean/var in the input's dtype."""
    world = _check_ready(group)
    if world == 1:
        _check_more_than_one(count)
        return mean, var, count
    dist = _dist()
    c = mean.numel()
    _check_same_channels(c, mean.device, group, world)
    n = float(count)
    m = mean.double() if count > 0 else torch.zeros(c, dtype=torch.float64, device=mean.device)
    m2 = var.double() * n if count > 0 else torch.zeros(c, dtype=torch.float64, device=mean.device)
    mine = torch.cat([m.new_full((1,), n), m, m2])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    parts = torch.stack(every)  # [world, 1 + 2C]
    ns, means, m2s = parts[:, :1], parts[:, 1:1 + c], parts[:, 1 + c:]
    total = float(ns.sum())
    _check_more_than_one(int(total))  # every rank sees the same total: all raise, none waits
    if total == 0:
        nan = torch.full_like(mean, float("nan"))
        return nan, nan.clone(), 0
    g_mean = (ns * means).sum(0) / total
    g_m2 = (m2s + ns * (means - g_mean) ** 2).sum(0)
    return g_mean.to(mean.dtype), (g_m2 / total).to(var.dtype), int(total)


def sync_grad_sums(sums: Tensor, count: int, group: Any) -> Tuple[Tensor, int]:
    """All-reduce the backward sums ([k, C]: sum dz, sum dz*x_hat, ...) and the element
    count: the input gradient's coefficients over the whole batch."""
    world = _check_ready(group)
    if world == 1:
        return sums, count
    dist = _dist()
    _check_same_channels(sums.shape[1], sums.device, group, world)
    flat = torch.cat([sums.double().flatten(), sums.new_full((1,), float(count), dtype=torch.float64)])
    dist.all_reduce(flat, group=group)
    return flat[:-1].view(sums.shape).to(sums.dtype), int(flat[-1])


def sync_active(group: Optional[Any], training: bool) -> bool:
    """Statistics are synchronized only when they are batch statistics (training)."""
    return group is not None and training
