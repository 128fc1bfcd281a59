"""The fused convolution ops (DESIGN.md §2, Level 2): schemas under ``torch.ops.resfused``,
fake kernels and two implementations.

* ``conv_bn_fwd``: ``out = act(conv(prologue(x), w) + bias + residual)`` with, optionally,
  the batch statistics of ``out`` (the next BN's) from the conv's epilogue.
* ``conv_bn_dgrad``: the conv's input gradient; optionally fused with the backward of
  the prologue ``a = relu(y*scale + shift)``: returns ``dz`` and ``(Σdz, Σdz*x̂)``.
* ``conv_bn_wgrad``: the conv's weight gradient (fp32), the activation recomputed from
  the previous BN's input in the prologue.

``backend``: ``"triton"`` (the implicit-GEMM kernels of ``resfused.triton.conv``) or
``"eager"``, the same contract written with library convolutions and plain PyTorch (the
test oracle, and what runs where Triton cannot).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .bn_act import _fast

CONV_BACKENDS = ("triton", "eager")


def _chan(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def _cl(t: Optional[Tensor]) -> Optional[Tensor]:
    """A full-size operand in the layout the kernels index (a no-op when it already is);
    x and BN inputs are read through their strides (channel-prefix views included)."""
    return None if t is None else t.contiguous(memory_format=torch.channels_last)


def _round(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).contiguous(memory_format=torch.channels_last)


def _activation(x: Tensor, prologue: Optional[Tensor]) -> Tensor:
    """relu(x*scale + shift) rounded to x's dtype, as the prologue feeds the conv."""
    if prologue is None:
        return x
    return _round(torch.relu(x.float() * _chan(prologue[0]) + _chan(prologue[1])), x.dtype)


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """A convolution's output size along one axis (kernel k, stride s, padding p, dilation d)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_backend(backend: str) -> None:
    if backend not in CONV_BACKENDS:
        raise ValueError(f"resfused conv: unknown backend {backend!r}; choose one of {', '.join(CONV_BACKENDS)}")


# ---- eager reference ------------------------------------------------------------------------


def _eager_fwd(x, weight, stride, padding, dilation, prologue, bias, residual, relu, stats):
    y = F.conv2d(_activation(x, prologue), weight, None, stride, padding, dilation).float()
    if bias is not None:
        y = y + _chan(bias)
    if residual is not None:
        y = y + residual.float()
    if relu:
        y = torch.relu(y)
    out = _round(y, x.dtype)
    if not stats:
        return out, None
    var, mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
    return out, (mean, var)


def _eager_dgrad(grad_out, weight, input_shape, stride, padding, dilation, bn_input, affine, bn_stats):
    inp = grad_out.new_empty(input_shape).contiguous(memory_format=torch.channels_last)
    dx = torch.ops.aten.convolution_backward(grad_out, inp, weight, None, list(stride), list(padding),
                                             list(dilation), False, [0, 0], 1, [True, False, False])[0]
    dx = dx.contiguous(memory_format=torch.channels_last)
    if bn_input is None:
        return dx, None
    z = _round(bn_input.float() * _chan(affine[0]) + _chan(affine[1]), bn_input.dtype)
    dz = torch.where(z <= 0, torch.zeros_like(dx), dx)  # NaN z passes, as relu's backward
    xhat = (bn_input.float() - _chan(bn_stats[0])) * _chan(bn_stats[1])
    dzf = dz.float()
    return dz, torch.stack([dzf.sum((0, 2, 3)), (dzf * xhat).sum((0, 2, 3))]).float()  # (fp64 stats: fp32 too)


def _eager_wgrad(grad_out, x, weight_shape, stride, padding, dilation, prologue):
    # NCHW operands, and fp32 ones on the CPU: torch's CPU bf16 weight gradient returns NaN
    # from uninitialized memory for some shapes (width 1, stride 2: torch 2.14 in
    # channels_last, torch 2.11 in NCHW too). The result is fp32 either way, accumulated in
    # fp32 as on a GPU, and does not depend on the operands' layout.
    a = _activation(x, prologue).contiguous()
    g = grad_out.contiguous()
    if a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16):
        a, g = a.float(), g.float()
    w = g.new_empty(weight_shape)
    dw = torch.ops.aten.convolution_backward(g, a, w, None, list(stride), list(padding),
                                             list(dilation), False, [0, 0], 1, [False, True, False])[1]
    return dw.float().contiguous(memory_format=torch.channels_last)


# ---- the ops ----------------------------------------------------------------------------------


def _conv_bn_fwd_impl(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                      prologue: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], relu: bool,
                      stats: bool, allow_tf32: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, mean, var): out channels_last in x's dtype; mean/var (fp32, biased) of out per
    channel when ``stats``, else empty."""
    _check_backend(backend)
    if backend == "triton":
        from ..triton import conv as tconv

        out, st = tconv.conv_fwd(x, weight, stride, padding, dilation, prologue, bias, _cl(residual), relu, stats,
                                 allow_tf32)
    else:
        out, st = _eager_fwd(x, weight, stride, padding, dilation, prologue, bias, residual, relu, stats)
    if st is None:
        empty = x.new_empty((0,), dtype=torch.float32)
        return out, empty, empty.clone()
    return out, st[0], st[1]


conv_bn_fwd_op = torch.library.custom_op("resfused::conv_bn_fwd", mutates_args=())(_conv_bn_fwd_impl)


@conv_bn_fwd_op.register_fake
def _(x, weight, stride, padding, dilation, prologue, bias, residual, relu, stats, allow_tf32, backend):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    oh = out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = out_size(w, kw, stride[1], padding[1], dilation[1])
    out = x.new_empty((n, cout, oh, ow)).contiguous(memory_format=torch.channels_last)
    c = cout if stats else 0
    return out, x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


def _conv_bn_dgrad_impl(grad_out: Tensor, weight: Tensor, input_shape: List[int], stride: List[int],
                        padding: List[int], dilation: List[int], bn_input: Optional[Tensor],
                        affine: Optional[Tensor], bn_stats: Optional[Tensor], allow_tf32: bool,
                        backend: str) -> Tuple[Tensor, Tensor]:
    """(dx or dz, sums): sums [2, Cin] fp32 when ``bn_input`` is given, else empty."""
    _check_backend(backend)
    if backend == "triton":
        from ..triton import conv as tconv

        dx, sums = tconv.conv_dgrad(_cl(grad_out), weight, input_shape, stride, padding, dilation, bn_input, affine,
                                    bn_stats, allow_tf32)
    else:
        dx, sums = _eager_dgrad(grad_out, weight, input_shape, stride, padding, dilation, bn_input, affine, bn_stats)
    return dx, sums if sums is not None else grad_out.new_empty((0,), dtype=torch.float32)


conv_bn_dgrad_op = torch.library.custom_op("resfused::conv_bn_dgrad", mutates_args=())(_conv_bn_dgrad_impl)


@conv_bn_dgrad_op.register_fake
def _(grad_out, weight, input_shape, stride, padding, dilation, bn_input, affine, bn_stats, allow_tf32, backend):
    dx = grad_out.new_empty(list(input_shape)).contiguous(memory_format=torch.channels_last)
    sums = grad_out.new_empty((2, input_shape[1]) if bn_input is not None else (0,), dtype=torch.float32)
    return dx, sums


def _conv_bn_wgrad_impl(grad_out: Tensor, x: Tensor, weight_shape: List[int], stride: List[int],
                        padding: List[int], dilation: List[int], prologue: Optional[Tensor], allow_tf32: bool,
                        backend: str) -> Tensor:
    """dW, fp32 [Cout, Cin, KH, KW] in channels_last strides."""
    _check_backend(backend)
    if backend == "triton":
        from ..triton import conv as tconv

        return tconv.conv_wgrad(_cl(grad_out), x, weight_shape, stride, padding, dilation, prologue, allow_tf32)
    return _eager_wgrad(grad_out, x, weight_shape, stride, padding, dilation, prologue)


conv_bn_wgrad_op = torch.library.custom_op("resfused::conv_bn_wgrad", mutates_args=())(_conv_bn_wgrad_impl)


@conv_bn_wgrad_op.register_fake
def _(grad_out, x, weight_shape, stride, padding, dilation, prologue, allow_tf32, backend):
    return grad_out.new_empty(list(weight_shape), dtype=torch.float32).contiguous(memory_format=torch.channels_last)


conv_bn_fwd = _fast(conv_bn_fwd_op, _conv_bn_fwd_impl)
conv_bn_dgrad = _fast(conv_bn_dgrad_op, _conv_bn_dgrad_impl)
conv_bn_wgrad = _fast(conv_bn_wgrad_op, _conv_bn_wgrad_impl)

BY_NAME = {"conv_bn_fwd": conv_bn_fwd_op, "conv_bn_dgrad": conv_bn_dgrad_op, "conv_bn_wgrad": conv_bn_wgrad_op}

