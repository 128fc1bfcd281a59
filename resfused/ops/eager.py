"""The ``eager`` backend: the four BN-activation kernels as plain PyTorch.

This module is the executable contract every other backend (``cpu``, ``cuda``,
``triton``) implements. It is also the test oracle and the last-resort backend.

Conventions shared by all backends (the op layer in ``resfused.ops.bn_act``
guarantees them before a backend kernel is called):

* ``x`` is 4-D ``[N, C, H, W]`` and either NCHW-contiguous or channels_last-
  contiguous. ``grad_out``, ``residual`` and ``out`` (when given) have the same
  shape, dtype and memory layout as ``x``.
* Per-channel tensors are contiguous ``[k, C]`` in the *accumulation dtype*:
  float64 when ``x`` is float64, float32 otherwise. Their rows:

  - ``affine``   ``[2, C]``: (scale, shift) — ``y = x * scale + shift``
  - ``stats``    ``[2, C]``: (mean, invstd) — ``x_hat = (x - mean) * invstd``
  - ``coef``     ``[4, C]``: (mean, k, mdz, p) — ``dx = (dz - mdz - (x - mean) * p) * k``

* The pre-activation is ``z = x*scale + shift + r`` where ``r`` is ``residual``
  (plain identity) or ``residual*res_scale + res_shift`` when ``res_affine`` is
  given (the downsample join: two BNs in one pass). ``relu`` selects
  ``out = relu(z)``; otherwise ``out = z``. ReLU propagates NaN as ``torch.relu``.
* Backward: ``dz = 0 if out <= 0 else grad_out`` when ``relu`` (``out`` given), or
  with the mask recomputed from ``z`` when ``out`` is None; ``dz = grad_out``
  otherwise. As relu's own backward (``threshold_backward``), a NaN ``out`` passes the
  gradient. In ``dx``, the term ``(x - mean) * p`` is 0 wherever ``p == 0`` (eval), so
  an infinite ``x`` (or running mean) there gives eager's finite gradient. Computation in
  the accumulation dtype; results cast to x's dtype.
* ``bn_act_bwd_reduce`` can also write ``dz`` (in x's dtype and layout; exact, since it
  is ``grad_out`` or 0) when ``write_dz``: the apply pass then reads ``dz`` with
  ``relu=False`` instead of ``grad_out`` and the mask's source, and for a plain
  residual ``dz`` is the residual's gradient itself (one tensor fewer read and written).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for statistics and per-channel coefficients."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chan(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _preact(x: Tensor, affine: Tensor, residual: Optional[Tensor], res_affine: Optional[Tensor]) -> Tensor:
    acc = affine.dtype
    z = x.to(acc) * _chan(affine[0]) + _chan(affine[1])
    if residual is not None:
        r = residual.to(acc)
        if res_affine is not None:
            r = r * _chan(res_affine[0]) + _chan(res_affine[1])
        z = z + r
    return z


def _grad_preact(grad_out, x, affine, residual, res_affine, out, relu) -> Tensor:
    acc = affine.dtype
    dz = grad_out.to(acc)
    if relu:
        m = out if out is not None else _preact(x, affine, residual, res_affine)
        dz = torch.where(m <= 0, torch.zeros((), dtype=acc, device=dz.device), dz)
    return dz


def bn_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance, in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        c = x.shape[1]
        nan = torch.full((c,), float("nan"), dtype=acc, device=x.device)
        return nan, nan.clone()
    var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
    return mean, var


def bn_coef(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
            unbias: float) -> Tuple[Tensor, Tensor]:
    """(affine, stats) = ((scale, shift), (mean, invstd)), each ``[2, C]``, with
    ``invstd = 1 / sqrt(var + eps)``, ``scale = weight * invstd`` (invstd without weight),
    ``shift = bias - mean * scale`` (``-mean * scale`` without bias). With running
    statistics, first ``running_mean = momentum * mean + (1 - momentum) * running_mean`` and
    ``running_var = momentum * (var * unbias) + (1 - momentum) * running_var``, in place."""
    if running_mean is not None:
        running_mean.copy_(momentum * mean + (1.0 - momentum) * running_mean)
        running_var.copy_(momentum * (var * unbias) + (1.0 - momentum) * running_var)
    invstd = 1.0 / torch.sqrt(var + eps)
    scale = invstd if weight is None else weight * invstd
    shift = -(mean * scale) if bias is None else bias - mean * scale
    return torch.stack([scale, shift]), torch.stack([mean, invstd])


def bn_act_fwd(x: Tensor, affine: Tensor, residual: Optional[Tensor], res_affine: Optional[Tensor],
               relu: bool) -> Tensor:
    z = _preact(x, affine, residual, res_affine)
    if relu:
        z = torch.relu(z)
    return _strided_like(z, x)


def bn_act_bwd_reduce(grad_out: Tensor, x: Tensor, affine: Tensor, stats: Tensor,
                      residual: Optional[Tensor], res_affine: Optional[Tensor],
                      res_stats: Optional[Tensor], out: Optional[Tensor], relu: bool,
                      write_dz: bool = False) -> Tuple[Tensor, Tensor]:
    """(sums, dz): sums has rows (sum dz, sum dz*x_hat[, sum dz*res_hat when res_stats
    is given]); dz is the masked gradient in x's dtype and layout when ``write_dz``, else
    an empty tensor."""
    dz = _grad_preact(grad_out, x, affine, residual, res_affine, out, relu)
    xhat = (x.to(dz.dtype) - _chan(stats[0])) * _chan(stats[1])
    rows = [dz.sum((0, 2, 3)), (dz * xhat).sum((0, 2, 3))]
    if res_stats is not None:
        rhat = (residual.to(dz.dtype) - _chan(res_stats[0])) * _chan(res_stats[1])
        rows.append((dz * rhat).sum((0, 2, 3)))
    dz_out = _strided_like(dz, x, copy=True) if write_dz else x.new_empty(0)
    return torch.stack(rows), dz_out


def _strided_like(t: Tensor, x: Tensor, copy: bool = False) -> Tensor:
    """``t`` in x's dtype, with x's strides where x is dense (a tensor contiguous both ways,
    [N, C, 1, 1], keeps the layout only its strides tell), else contiguous in x's layout."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        if t.stride() == x.stride():
            return t.to(x.dtype, copy=copy)
        return torch.empty_like(x).copy_(t)
    fmt = torch.contiguous_format if x.stride(1) > x.stride(3) else torch.channels_last
    return t.to(x.dtype, copy=copy).contiguous(memory_format=fmt)


def _apply_coef(dz: Tensor, x: Tensor, coef: Tensor) -> Tensor:
    mean, k, mdz, p = coef[0], coef[1], coef[2], coef[3]
    x_term = (x.to(dz.dtype) - _chan(mean)) * _chan(p)
    x_term = torch.where(_chan(p) == 0, torch.zeros((), dtype=dz.dtype, device=dz.device), x_term)
    return (dz - _chan(mdz) - x_term) * _chan(k)


def bn_act_bwd_apply(grad_out: Tensor, x: Tensor, affine: Tensor, coef: Tensor,
                     residual: Optional[Tensor], res_affine: Optional[Tensor],
                     res_coef: Optional[Tensor], out: Optional[Tensor], relu: bool) -> Tuple[Tensor, Tensor]:
    """Returns (dx, dres). dres is ``dz`` for a plain residual, the BN input
    gradient for a residual with ``res_coef``, and an empty tensor without residual."""
    dz = _grad_preact(grad_out, x, affine, residual, res_affine, out, relu)
    dx = _strided_like(_apply_coef(dz, x, coef), x)
    if residual is None:
        dres = x.new_empty(0)
    elif res_coef is None:
        dres = _strided_like(dz, x, copy=True)  # never an alias of grad_out
    else:
        dres = _strided_like(_apply_coef(dz, residual, res_coef), x)
    return dx, dres


def bn_act_bwd_apply_acc(acc: Tensor, grad_out: Tensor, x: Tensor, affine: Tensor, coef: Tensor,
                         out: Optional[Tensor], relu: bool) -> None:
    """``acc += dx`` in place, dx being ``bn_act_bwd_apply``'s (no residual), added in the
    accumulation dtype and rounded once into acc."""
    dz = _grad_preact(grad_out, x, affine, None, None, out, relu)
    acc.copy_(acc.to(dz.dtype) + _apply_coef(dz, x, coef))
