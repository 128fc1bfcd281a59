"""``BatchNormActFunction``: BatchNorm (+ residual, optionally BatchNorm'd) + activation
as one autograd node over the ops of ``resfused.ops``.

Forward (training): one statistics pass per BN, then one apply pass writing
``out = act(bn(x) [+ residual | + bn_r(residual)])``; running statistics are
updated here, exactly once per forward. Backward: one reduction pass (dbeta,
dgamma, and dgamma_r for a BN'd residual) and one apply pass (dx, dresidual).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..distributed import sync_active, sync_batch_stats, sync_grad_sums
from ..ops import bn_act as ops
from ..ops.bn_act import _compiling
from ..ops.eager import acc_dtype

#: backends whose kernels are in resfused._C, which also holds each BN's sequence of ops
#: as one composite call (csrc/composite.cpp): same ops, same order, less host time (a
#: name of its own: tests and scripts/host_time.py turn the composites off through it)
_COMPOSITE_BACKENDS = ops.NATIVE_BACKENDS


def _batched(t: Tensor) -> bool:
    """Whether t is a functorch batched tensor (a backward under vmap: ``is_grads_batched``,
    ``jacobian(vectorize=True)``), which the whole-block composites (TensorList arguments)
    have no batching rule for."""
    if _compiling():  # (a compiled backward: no batched gradients reach it here)
        return False
    functorch = getattr(torch._C, "_functorch", None)
    return any(bool(f(t)) for f in (getattr(functorch, name, None) for name in
                                    ("is_batchedtensor", "is_legacy_batchedtensor")) if f is not None)


def first_order(backward):
    """A fused node's backward, once-differentiable (``@once_differentiable`` inside): it
    refuses to run with ``create_graph=True``. Autograd's own once-differentiable error
    sits on detached aliases of the backward's outputs, so it fires only when a later
    backward happens to reach them: with a constant incoming gradient (a gradient
    penalty on ``grad(out.sum(), x, create_graph=True)``), or when the second derivative
    is taken with ``torch.autograd.grad(..., inputs=params)`` (``functional.jvp``, a
    MAML-style outer step), it is silently zero or missing."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if getattr(ctx, "triton", False) and any(g is not None and _batched(g) for g in grads):
            raise RuntimeError(
                f"resfused: {type(ctx).__name__.removesuffix('Backward')}: a backward under vmap (a batch of "
                f"gradients: jacobian(vectorize=True), is_grads_batched=True) runs on the cpu, cuda and eager "
                f"backends with the library convolutions; this forward ran Triton kernels. Run it under "
                f"resfused.use_backend('eager') and resfused.use_conv('library'), or vectorize=False.")
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"resfused: {type(ctx).__name__.removesuffix('Backward')} is once differentiable: its backward "
                f"cannot run with create_graph=True (double backward, a gradient penalty, "
                f"torch.autograd.functional.jvp/hessian) without risking a wrong second derivative (autograd "
                f"would differentiate twice a function that was marked with @once_differentiable). For higher "
                f"derivatives run torchvision's modules: resfused.revert(model), or torch.func transforms, under "
                f"which the fused modules run torchvision's ops.")
        return inner(ctx, *grads)
    return wrapper


def _composite(backend: str, x: Tensor) -> bool:
    """Whether this BN's sequence can run as one call to a composite of resfused._C: a
    native backend, x dense in its layout (the kernels' contract without the op layer's
    conversions), eager execution (torch.compile traces the registered ops)."""
    return backend in _COMPOSITE_BACKENDS and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) \
        and not _compiling()


def channel_count(x: Tensor) -> int:
    """Elements per channel, M = N*H*W."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def _plain(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.detach().to(dtype)``, skipping the calls that would change nothing (a
    per-channel vector read a few times per BN per call: the calls are its cost)."""
    if t.requires_grad:
        t = t.detach()
    return t if t.dtype == dtype else t.to(dtype)


def bn_coefficients(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    training: bool, momentum: float, eps: float, backend: str,
                    batch_stats: Optional[Tuple[Tensor, Tensor]] = None,
                    group: Optional[Any] = None, batch_count: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel ``affine = (scale, shift)`` and ``stats = (mean, invstd)`` of one BN,
    updating the running statistics in training (exactly once; never on an empty batch).

    ``batch_stats``: precomputed batch ``(mean, biased var)`` of x in the accumulation
    dtype (the dense block's statistics cache); x is then read only for its shape.
    ``group``: a process group to synchronize the batch statistics over (training only;
    ``batch_stats`` are then taken as already synchronized, over ``batch_count`` values
    per channel)."""
    if batch_stats is None and not sync_active(group, training) and _composite(backend, x):
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            return torch.ops.resfused_C.bn_stats_coef.default(x, weight, bias, running_mean, running_var, training,
                                                              momentum, eps)
    acc = acc_dtype(x.dtype)
    count = channel_count(x)
    w = None if weight is None else _plain(weight, acc)
    b = None if bias is None else _plain(bias, acc)
    if not training:
        return ops.bn_coef(_plain(running_mean, acc), _plain(running_var, acc), w, b, None, None, 0.0, eps, 1,
                           backend)
    if batch_stats is not None:
        mean, var = batch_stats
        count = count if batch_count is None else batch_count
    else:
        mean, var = ops.bn_stats(x, backend)
        if sync_active(group, training):
            mean, var, count = sync_batch_stats(mean, var, count, group)
    update = running_mean is not None and count > 0
    with torch.no_grad():
        return ops.bn_coef(mean, var, w, b, running_mean if update else None, running_var if update else None,
                           momentum, eps, count, backend)


def _grad_coefficients(stats: Tensor, affine: Tensor, sum_dz: Tensor, sum_dz_xhat: Tensor,
                       training: bool, count: int) -> Tensor:
    """``coef = (mean, k, mdz, p)`` such that ``dx = (dz - mdz - (x - mean)*p) * k``."""
    mean, scale = stats[0], affine[0]
    if not training:  # running statistics are constants: dx = dz * scale
        zero = torch.zeros_like(mean)
        return torch.stack([mean, scale, zero, zero])
    coef = torch.stack([mean, scale, sum_dz, sum_dz_xhat])
    coef[3].mul_(stats[1])
    coef[2:].div_(max(count, 1))  # (an integer: kept symbolic under torch.compile)
    return coef


def grad_coefficients(stats: Tensor, affine: Tensor, sums: Tensor, row: int, training: bool, count: int,
                      backend: str) -> Tensor:
    """``_grad_coefficients`` of the BN whose Σdz*x̂ is row ``row`` of ``sums`` (row 0: Σdz):
    one op, ``resfused_C.bn_grad_coef`` (one launch on a GPU), on the cpu and cuda
    backends in eager execution; the three tensor ops otherwise."""
    if backend in _COMPOSITE_BACKENDS and not _compiling():
        return torch.ops.resfused_C.bn_grad_coef.default(stats.contiguous(), affine.contiguous(), sums.contiguous(),
                                                         row, training, count)
    return _grad_coefficients(stats, affine, sums[0], sums[row], training, count)


def bn_act_backward(grad_out: Tensor, x: Tensor, out: Optional[Tensor], affine: Tensor, stats: Tensor,
                    training: bool, relu: bool, backend: str, *, need_dx: bool, need_sums: bool,
                    plain_residual_grad: bool = False, residual: Optional[Tensor] = None,
                    res_affine: Optional[Tensor] = None, res_stats: Optional[Tensor] = None,
                    res_training: bool = False, group: Optional[Any] = None, acc: Optional[Tensor] = None):
    """Backward of ``out = act(bn(x) [+ residual | + bn_r(residual)])``: one reduction pass
    (when ``need_sums``) and one apply pass (when a gradient is wanted).

    ``residual``/``res_affine``/``res_stats`` describe a BN'd residual; a plain residual
    only asks for its gradient (``plain_residual_grad``). ``out`` gives the relu mask; when
    it is None the mask is recomputed from x. Returns ``(dx, dres, sums)`` where the rows of
    ``sums`` are (dbeta, dgamma[, dgamma_r]) in the accumulation dtype: this rank's share
    when ``group`` synchronizes the statistics (the input gradient then uses the sums of
    the whole distributed batch, as ``nn.SyncBatchNorm``).

    ``acc`` (no residual): dx is added into acc in place, by the apply pass itself where
    acc has x's strides (``ops.bn_act_bwd_apply_acc``), and returned as None.
    """
    if acc is not None and (residual is not None or plain_residual_grad):
        raise ValueError("bn_act_backward: acc is for the input gradient of a BN without residual")
    res_bn = res_stats is not None
    sync = sync_active(group, training or (res_bn and res_training))
    if acc is None and not sync and _composite(backend, x):
        return torch.ops.resfused_C.bn_act_bwd.default(grad_out, x, out, affine, stats, residual, res_affine,
                                                       res_stats, training, res_training, relu, need_dx, need_sums,
                                                       plain_residual_grad)
    count = channel_count(x)

    def coef_sums(sums: Tensor) -> Tuple[Tensor, int]:
        return sync_grad_sums(sums, count, group) if sync else (sums, count)
    if need_sums and plain_residual_grad and relu and out is not None:
        # The plain-residual join: the reduction pass (reading grad_out, x, out) also
        # writes dz, which is the residual's gradient; the apply pass then reads only dz
        # and x. 5 tensor reads + 2 writes instead of 6 + 2.
        sums, dz = ops.bn_act_bwd_reduce(grad_out, x, affine, stats, None, None, None, out, True, True, backend)
        dx = None
        if need_dx:
            g_sums, g_count = coef_sums(sums)
            coef = grad_coefficients(stats, affine, g_sums, 1, training, g_count, backend)
            dx, _ = ops.bn_act_bwd_apply(dz, x, affine, coef, None, None, None, None, False, backend)
        return dx, dz, sums
    if need_sums:
        sums, _ = ops.bn_act_bwd_reduce(grad_out, x, affine, stats, residual, res_affine, res_stats, out, relu,
                                        False, backend)
    else:
        sums = torch.zeros((3 if res_bn else 2, x.shape[1]), dtype=affine.dtype, device=x.device)
    dx = dres = None
    if need_dx or plain_residual_grad or res_bn:
        g_sums, g_count = coef_sums(sums)
        coef = grad_coefficients(stats, affine, g_sums, 1, training, g_count, backend)
        res_coef = grad_coefficients(res_stats, res_affine, g_sums, 2, res_training, g_count, backend) \
            if res_bn else None
        # A plain residual only asks the apply pass for dres = dz; its values would be
        # read for the relu mask alone, which then comes from `out`, so grad_out stands in.
        res_arg = residual if res_bn else (grad_out if plain_residual_grad else None)
        if relu and out is None and res_arg is not None and not res_bn:
            raise ValueError("bn_act_backward: a plain residual needs `out` for the relu mask")
        if acc is not None and not _batched(acc):
            if need_dx:
                ops.bn_act_bwd_apply_acc(acc, grad_out, x, affine, coef, out, relu, backend)
            return None, None, sums
        if acc is not None:  # a batch of gradients (vmap): the apply pass, then the add
            if need_dx:
                acc.add_(ops.bn_act_bwd_apply(grad_out, x, affine, coef, None, None, None, out, relu, backend)[0])
            return None, None, sums
        dx, dres = ops.bn_act_bwd_apply(grad_out, x, affine, coef, res_arg, res_affine, res_coef, out, relu,
                                        backend)
        dx = dx if need_dx else None
        dres = dres if res_arg is not None else None
    return dx, dres, sums


class BatchNormActFunction(torch.autograd.Function):
    """out = act(bn(x) + r), r = residual, or bn_r(residual) when ``res_bn`` is set.

    Tensors are positional (autograd tracks only those); settings follow them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var,
                residual, res_weight, res_bias, res_running_mean, res_running_var,
                training: bool, momentum: float, eps: float,
                res_bn: bool, res_training: bool, res_momentum: float, res_eps: float,
                relu: bool, backend: str, group=None):
        backend = ops.resolve(backend, x)
        affine, stats = bn_coefficients(x, weight, bias, running_mean, running_var,
                                        training, momentum, eps, backend, group=group)
        res_affine = res_stats = None
        if res_bn:
            res_affine, res_stats = bn_coefficients(residual, res_weight, res_bias, res_running_mean,
                                                    res_running_var, res_training, res_momentum, res_eps, backend,
                                                    group=group)
        out = ops.bn_act_fwd(x, affine, residual, res_affine, relu, backend)

        ctx.settings = (training, res_training, res_bn, relu, backend)
        ctx.triton = backend == "triton"  # (see first_order)
        ctx.group = group
        ctx.has_residual = residual is not None
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (weight, bias, res_weight, res_bias))
        # The relu mask comes from `out`; the residual is needed only when it is BN'd.
        saved_out = out if relu else None
        saved_res = residual if res_bn else None
        ctx.save_for_backward(x, saved_res, saved_out, affine, stats, res_affine, res_stats)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        training, res_training, res_bn, relu, backend = ctx.settings
        x, residual, out, affine, stats, res_affine, res_stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_w = needs[1] or needs[2]
        need_res_w = res_bn and (needs[6] or needs[7])
        need_sums = training or need_w or (res_bn and (res_training or need_res_w))

        dx, dres, sums = bn_act_backward(
            grad_out, x, out, affine, stats, training, relu, backend, need_dx=needs[0], need_sums=need_sums,
            plain_residual_grad=ctx.has_residual and not res_bn and needs[5], residual=residual,
            res_affine=res_affine, res_stats=res_stats, res_training=res_training, group=ctx.group)
        if not needs[5]:
            dres = None

        w_dtype, b_dtype, rw_dtype, rb_dtype = ctx.param_dtypes
        dw = sums[1].to(w_dtype) if needs[1] else None
        db = sums[0].to(b_dtype) if needs[2] else None
        drw = sums[2].to(rw_dtype) if needs[6] else None
        drb = (sums[0].clone() if needs[2] else sums[0]).to(rb_dtype) if needs[7] else None  # not db's tensor
        return (dx, dw, db, None, None, dres, drw, drb, None, None,
                None, None, None, None, None, None, None, None, None, None)


class BatchNormReluPoolFunction(torch.autograd.Function):
    """``out = max_pool2d(relu(bn(x)))`` (dilation 1, floor) as one node: a ResNet's stem
    after its first convolution. Saves x, the pooling indices and the per-channel vectors,
    not ``relu(bn(x))`` (eager keeps it for the pooling's backward and the ReLU's): backward
    routes the gradient to the maxima as aten's pooling backward does, then runs the
    BN-ReLU backward with the ReLU mask recomputed from x."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float,
                kernel_size, stride, padding, backend: str):
        backend = ops.resolve(backend, x)
        affine, stats = bn_coefficients(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                        backend)
        out, indices = ops.bn_relu_maxpool(x, affine, list(kernel_size), list(stride), list(padding), backend)
        ctx.settings = (training, backend, list(kernel_size), list(stride), list(padding))
        ctx.triton = backend == "triton"  # (see first_order)
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(x, indices, affine, stats)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        training, backend, kernel_size, stride, padding = ctx.settings
        x, indices, affine, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_a = torch.ops.aten.max_pool2d_with_indices_backward.default(
            grad_out.contiguous(memory_format=ops.memory_format_of(x)), x, kernel_size, stride, padding, [1, 1],
            False, indices)
        dx, _, sums = bn_act_backward(grad_a, x, None, affine, stats, training, True, backend, need_dx=needs[0],
                                      need_sums=training or needs[1] or needs[2])
        w_dtype, b_dtype = ctx.param_dtypes
        dw = sums[1].to(w_dtype) if needs[1] else None
        db = sums[0].to(b_dtype) if needs[2] else None
        return dx if needs[0] else None, dw, db, None, None, None, None, None, None, None, None, None
