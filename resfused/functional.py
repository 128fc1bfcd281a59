"""Functional API: fused BatchNorm (+ residual) + activation.

``batch_norm_act`` has exactly the semantics of ``F.batch_norm`` followed by
``+ residual`` and ReLU; ``dual_batch_norm_act`` is the downsample join
``act(bn_a(x) + bn_b(residual))`` in one pass. Arguments are checked before
anything is computed or written: a call that raises leaves every running
statistic untouched.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from .autograd.bn_act import BatchNormActFunction
from .ops.bn_act import _compiling

ACTIVATIONS = ("relu", "identity")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_activation(activation: str) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation == "relu"


def bn_dtype_allowed(dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """F.batch_norm's rule for BN parameters and running statistics: the input's dtype,
    or float32 for a float16/bfloat16 input."""
    return dtype == x_dtype or (dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16))


def check_bn_input(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                   prefix: str = "", name: str = "x", synced: bool = False) -> None:
    """Every check of one BN's arguments, raised before anything runs. ``synced``: batch
    statistics over a process group, whose merged count is checked once gathered."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{prefix}{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{prefix}{name} must be 4-D [N, C, H, W], got {x.dim()}-D input of shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{prefix}{name} must be a floating-point tensor (float32, float64, float16, bfloat16), "
                        f"got {x.dtype}")
    c = x.shape[1]
    for arg, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                   ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"{prefix}{arg} is on {t.device} but {name} is on {x.device}; "
                               f"move both to the same device")
        if t.dim() != 1 or t.numel() != c:
            raise ValueError(f"{prefix}{arg} must have one value per channel of {name} ({c}), "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{prefix}{arg} must be floating point, got {t.dtype}")
        if not bn_dtype_allowed(t.dtype, x.dtype):
            raise TypeError(f"{prefix}{arg} dtype {t.dtype} does not match {name} dtype {x.dtype} (BN parameters "
                            f"and running statistics take {name}'s dtype, or float32 when {name} is float16 or "
                            f"bfloat16)")
    check_not_inference(prefix.rstrip(": ") or "batch_norm_act", x, weight, bias)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{prefix}running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{prefix}running_mean and running_var are required when training=False")
    if training and not synced:
        size_prods = x.shape[0] * x.shape[2] * x.shape[3]
        if size_prods == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def check_not_inference(name: str, x: Tensor, *params: Optional[Tensor]) -> None:
    """An inference tensor cannot be saved for backward: raised before anything moves when
    gradients would be recorded (a parameter requires grad, grad mode on)."""
    if _compiling():  # (torch.compile cannot trace is_inference(); its graphs never see inference tensors)
        return
    if x.is_inference() and torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        raise RuntimeError(f"{name}: the input is an inference tensor (made under torch.inference_mode()), which "
                           f"cannot be saved for backward; call the module under torch.inference_mode() or "
                           f"torch.no_grad(), or give it a tensor made outside inference mode (x.clone())")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:  # (numpy scalars too)
        raise TypeError(f"{name} must be a number, got {value!r}")


def check_eps(name: str, eps, batch_stats: bool) -> None:
    """A BN's eps as ``F.batch_norm`` takes it: a number, positive where the BN normalises
    with batch statistics (training), non-negative where it uses running statistics."""
    _check_number(name, eps)
    if batch_stats and eps <= 0:
        raise ValueError(f"{name} must be positive when normalising with batch statistics (training), got {eps!r}")
    if eps < 0:
        raise ValueError(f"{name} must be non-negative, got {eps!r}")


def _check_bn_tuple(name: str, value) -> Sequence[Optional[Tensor]]:
    if not isinstance(value, (tuple, list)) or len(value) != 4:
        raise TypeError(f"{name} must be (running_mean, running_var, weight, bias), each a Tensor or None; got "
                        f"{type(value).__name__}" + (f" of length {len(value)}" if isinstance(value, (tuple, list))
                                                     else ""))
    return value


def check_residual(x: Tensor, residual: Tensor, optional: bool = True) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor{' or None' if optional else ''}, got {type(residual).__name__}")
    if residual.device != x.device:
        raise RuntimeError(f"residual is on {residual.device} but x is on {x.device}; move both to the same device")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual dtype {residual.dtype} does not match x dtype {x.dtype}")
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} does not match x shape {tuple(x.shape)}")


def batch_norm_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None,
                   activation: str = "relu", backend: str = "auto", sync_group=None) -> Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``.

    Training uses batch statistics (biased variance to normalise, unbiased into
    ``running_var``) and updates the running statistics in place, when given;
    eval uses the running statistics. ``activation`` is ``"relu"`` or ``"identity"``.
    ``backend`` is ``"auto"`` (see ``resfused.use_backend``) or a backend name.
    ``sync_group``: a ``torch.distributed`` process group to synchronize the batch
    statistics over, as ``nn.SyncBatchNorm`` (training only; None: this process's batch).
    """
    relu = _check_activation(activation)
    _check_number("momentum", momentum)
    check_eps("eps", eps, training)
    check_bn_input(x, running_mean, running_var, weight, bias, training, synced=sync_group is not None)
    if residual is not None:
        check_residual(x, residual)
    return apply_checked(x, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu, backend,
                         sync_group)


def apply_checked(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor],
                  bias: Optional[Tensor], training: bool, momentum: float, eps: float, residual: Optional[Tensor],
                  relu: bool, backend: str, sync_group=None) -> Tensor:
    """``batch_norm_act`` after its checks (``relu``: the activation, checked), for a caller
    that has run them itself (``BatchNormAct2d``, before its batch counter moves)."""
    return BatchNormActFunction.apply(x, weight, bias, running_mean, running_var,
                                      residual, None, None, None, None,
                                      training, momentum, eps, False, training, momentum, eps, relu, backend,
                                      sync_group)


def dual_batch_norm_act(x: Tensor, residual: Tensor, bn_x: Sequence[Optional[Tensor]],
                        bn_residual: Sequence[Optional[Tensor]], training: bool = False,
                        momentum: float = 0.1, eps: float = 1e-5, residual_momentum: Optional[float] = None,
                        residual_eps: Optional[float] = None, activation: str = "relu",
                        backend: str = "auto") -> Tensor:
    """The downsample join ``act(bn_a(x) + bn_b(residual))`` in one apply pass.

    ``bn_x`` and ``bn_residual`` are ``(running_mean, running_var, weight, bias)``
    of each BN; ``residual_momentum``/``residual_eps`` default to ``momentum``/``eps``.
    """
    relu = _check_activation(activation)
    rm, rv, w, b = _check_bn_tuple("bn_x", bn_x)
    rrm, rrv, rw, rb = _check_bn_tuple("bn_residual", bn_residual)
    rmom = momentum if residual_momentum is None else residual_momentum
    reps = eps if residual_eps is None else residual_eps
    for arg, value in (("momentum", momentum), ("residual_momentum", rmom)):
        _check_number(arg, value)
    check_eps("eps", eps, training)
    check_eps("residual_eps", reps, training)
    check_bn_input(x, rm, rv, w, b, training, prefix="bn_x: ")
    check_residual(x, residual, optional=False)
    check_bn_input(residual, rrm, rrv, rw, rb, training, prefix="bn_residual: ", name="residual")
    return BatchNormActFunction.apply(x, w, b, rm, rv, residual, rw, rb, rrm, rrv,
                                      training, momentum, eps, True, training, rmom, reps, relu, backend)
