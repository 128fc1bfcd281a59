"""``DenseBlockFunction``: a whole DenseNet dense block as one autograd node, and
``TransitionFunction``: a DenseNet transition (BN → ReLU → 1x1 conv → avg pool).

Dense block (DESIGN.md §3, Pleiss et al.):

* **Shared feature storage.** One buffer ``[N, C0 + L·k, H, W]`` in the input's memory
  format; the input is copied in once, layer l writes its k new channels into its slice
  and reads channels ``[0, C_l)``. The buffer *is* the block output (torchvision's
  ``torch.cat`` order), so no concatenation is ever made.
* **norm1 + relu1 of the prefix** runs through the fused BN-ReLU kernel and is never
  saved; backward recomputes it. A channel prefix is a strided view of the buffer (in
  NCHW and in channels_last alike). The kernels read that view in place
  (``ops.PREFIX_VIEW_BACKENDS``, ``ops.reads_as_is``): the cpu and triton ones always, the
  cuda ones in NCHW (H*W > 1) and in channels_last with C a multiple of 16 bytes. Otherwise
  (the eager backend, say) each layer first gathers its prefix into one scratch buffer
  shared by all layers of the block (allocated once per forward and once per backward,
  sized for the widest prefix gathered): one extra read/write of the prefix per layer,
  forward and backward. The kernel's output
  ``relu(bn1(prefix))`` is a transient the op allocates (the ops have no ``out=``
  variant), released as soon as conv1 has read it.
* **Statistics cache.** Each channel's batch (mean, biased var) is computed once, when the
  channel is written (``ops.bn_stats`` on the input, then on each layer's new features),
  and every later layer's norm1 reuses it through ``bn_coefficients(batch_stats=...)``;
  each BN still updates its own running statistics, exactly once per forward.
* **Bottleneck** ``norm2 → relu2 → conv2`` uses the fused BN-ReLU; ``relu2`` is recomputed
  from the saved pre-BN ``y1`` in backward.
* **Dropout** (``drop_rate > 0`` in training) uses ``F.dropout`` itself for the noise, so
  the random stream and values are torchvision's; the mask is kept (bool) for backward.

Saved for backward: the feature buffer, per layer ``y1`` (conv1 output), per-channel
affine/stats (fp32) and the dropout mask if any. Backward walks the layers in reverse,
accumulating into one gradient buffer shaped like the feature buffer; layer j's slice is
complete when layer j is reached. Each layer's norm1 input gradient is added into the
buffer's prefix by the BN backward apply pass itself (``ops.bn_act_bwd_apply_acc``: it
reads the gradient buffer's prefix where it reads the feature buffer's, and writes it
back), not written out and added in a second pass.

On the cpu and cuda backends with the library convolutions (``runs_native``) the block's
forward and backward are one call each of ``resfused_C.dense_fwd`` / ``dense_bwd``
(csrc/dense.cpp): the same ops in the same order, from C++, the prefixes handed to the
kernels as views (copied per layer where the cuda kernels cannot read one in place).
"""
from __future__ import annotations

import functools

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import sync_batch_stats
from ..ops import bn_act as ops
from ..ops import conv as conv_ops
from ..ops.eager import acc_dtype
from .block import (BNSpec, ConvSpec, _bn_input_grad, _conv, _conv_backward, _fused_conv,
                    _fused_conv_backward, _hashable, cast_native_grads, conv_chain_shapes, runs_native)
from .bn_act import _batched, bn_act_backward, bn_coefficients, first_order

# norm1 weight, bias, running mean, running var, conv1 weight, bias,
# norm2 weight, bias, running mean, running var, conv2 weight, bias
TENSORS_PER_LAYER = 12
_N1W, _N1B, _C1W, _C1B, _N2W, _N2B, _C2W, _C2B = 0, 1, 4, 5, 6, 7, 10, 11


class DenseLayerSpec(NamedTuple):
    norm1: BNSpec
    conv1: ConvSpec
    norm2: BNSpec
    conv2: ConvSpec
    growth: int        # channels the layer adds (conv2's out_channels)
    drop_rate: float   # dropout applied to the new features (0: none, e.g. in eval)


class DenseBlockSpec(NamedTuple):
    layers: Tuple[DenseLayerSpec, ...]
    backend: str
    #: "library": library convs with the fused BN-ReLU kernels around them (and the prefix
    #: scratch); "triton" / "eager": the fused conv ops of that backend: conv1 reads its
    #: prefix of the feature buffer in place through norm1-relu1 in its prologue, conv2
    #: applies norm2-relu2 in its prologue, and both epilogues produce the next BN's
    #: statistics (norm2's, and the statistics cache's for the new features)
    conv: str = "library"
    tf32: bool = False


class _Forward(NamedTuple):
    buf: Tensor
    backend: str
    y1s: List[Tensor]
    aff1s: List[Tensor]
    st1s: List[Tensor]
    aff2s: List[Tensor]
    st2s: List[Tensor]
    masks: List[Optional[Tensor]]


def _split(tensors: Sequence[Optional[Tensor]], n: int) -> List[Sequence[Optional[Tensor]]]:
    k = TENSORS_PER_LAYER
    return [tensors[i * k:(i + 1) * k] for i in range(n)]


def prefix_widths(c0: int, spec: DenseBlockSpec) -> List[int]:
    """C_l: the channels layer l reads (the block input plus all earlier layers' features)."""
    widths, c = [], c0
    for layer in spec.layers:
        widths.append(c)
        c += layer.growth
    return widths


def _prefix_scratch(buf: Tensor, widths: List[int], backend: str) -> Optional[Tensor]:
    """One flat scratch big enough for the widest of these prefixes (channels [0, C_l) of
    ``buf``) that the backend cannot read as a view in place; None when it reads them all."""
    gathered = [cl for cl in widths if not ops.reads_as_is(backend, buf[:, :cl])]
    if not gathered:
        return None
    n, _, h, w = buf.shape
    return buf.new_empty(n * max(gathered) * h * w)


def _prefix(buf: Tensor, cl: int, scratch: Optional[Tensor], fmt: torch.memory_format, backend: str) -> Tensor:
    """Channels [0, cl) of ``buf`` as the kernels read them: the view itself where the
    backend reads it in place, else gathered contiguous in ``fmt`` into the shared scratch."""
    view = buf[:, :cl]
    if scratch is None or ops.reads_as_is(backend, view):
        return view
    n, _, h, w = buf.shape
    flat = scratch[:n * cl * h * w]
    if fmt == torch.channels_last:
        dst = flat.view(n, h, w, cl).permute(0, 3, 1, 2)
    else:
        dst = flat.view(n, cl, h, w)
    dst.copy_(view)
    return dst


def _native(spec: DenseBlockSpec, backend: str) -> bool:
    """``runs_native`` for a dense block (``resfused_C.dense_fwd`` / ``dense_bwd``, csrc/dense.cpp)."""
    return runs_native(backend, spec.conv, (bn for ls in spec.layers for bn in (ls.norm1, ls.norm2)))


def _native_args(spec: DenseBlockSpec):
    """(geometry, training, momentum, eps, drop_rate, growth) of ``dense_fwd``/``dense_bwd``:
    per layer conv1's then conv2's 7 values of geometry, norm1's then norm2's flag,
    momentum and eps, the drop rate and the growth; remembered per spec (a spec built with
    lists: worked out each call)."""
    return _dense_native_args(spec) if _hashable(spec) else _dense_native_args.__wrapped__(spec)


@functools.lru_cache(maxsize=64)
def _dense_native_args(spec: DenseBlockSpec):
    geometry = [v for ls in spec.layers for c in (ls.conv1, ls.conv2)
                for v in (*c.stride, *c.padding, *c.dilation, c.groups)]
    bns = [bn for ls in spec.layers for bn in (ls.norm1, ls.norm2)]
    return (geometry, [int(bn.training) for bn in bns], [float(bn.momentum) for bn in bns],
            [float(bn.eps) for bn in bns], [float(ls.drop_rate) for ls in spec.layers],
            [ls.growth for ls in spec.layers])


def _native_forward(spec: DenseBlockSpec, backend: str, x: Tensor, tensors: Sequence[Optional[Tensor]],
                    keep: bool) -> _Forward:
    """``dense_block_forward`` as one call of ``resfused_C.dense_fwd``."""
    geometry, training, momentum, eps, drop, growth = _native_args(spec)
    res = torch.ops.resfused_C.dense_fwd.default(x, list(tensors), geometry, training, momentum, eps, drop, growth,
                                                 ops.memory_format_of(x) == torch.channels_last, keep)
    n = len(spec.layers)
    if not keep:
        return _Forward(res[0], backend, [], [], [], [], [], [])
    lists = [res[1 + j * n:1 + (j + 1) * n] for j in range(5)]
    kept = iter(res[1 + 5 * n:])
    masks = [next(kept) if d > 0 else None for d in drop]
    return _Forward(res[0], backend, *lists, masks)


def dense_block_forward(spec: DenseBlockSpec, x: Tensor, tensors: Sequence[Optional[Tensor]],
                        keep: bool) -> _Forward:
    """Run the block; updates running statistics (once). ``keep``: collect what backward needs."""
    backend = ops.resolve(spec.backend, x)
    if _native(spec, backend):
        return _native_forward(spec, backend, x, tensors, keep)
    fmt = ops.memory_format_of(x)
    n = len(spec.layers)
    N, c0, H, W = x.shape
    widths = prefix_widths(c0, spec)
    total = widths[-1] + spec.layers[-1].growth if n else c0
    buf = torch.empty((N, total, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    buf[:, :c0].copy_(x)

    # Statistics cache: a channel's batch (mean, var) is computed once, when it is written,
    # for as long as some later layer's norm1 normalises with batch statistics.
    # With synchronized statistics (sync BN) the cache holds the whole distributed batch's.
    last_batch_norm1 = max((i for i, ls in enumerate(spec.layers) if ls.norm1.training), default=-1)
    group = next((ls.norm1.group for ls in spec.layers if ls.norm1.group is not None), None)
    acc = acc_dtype(x.dtype)
    cache_mean = cache_var = None
    count = N * H * W

    def channel_stats(t: Tensor) -> Tuple[Tensor, Tensor, int]:
        m, v = ops.bn_stats(t, backend)
        return sync_batch_stats(m, v, N * H * W, group) if group is not None else (m, v, N * H * W)

    if last_batch_norm1 >= 0:
        cache_mean = torch.empty(total, dtype=acc, device=x.device)
        cache_var = torch.empty(total, dtype=acc, device=x.device)
        m, v, count = channel_stats(x)
        cache_mean[:c0].copy_(m)
        cache_var[:c0].copy_(v)

    fused = spec.conv != "library"
    scratch = _prefix_scratch(buf, widths[1:], backend) if not fused else None  # layer 0 reads x
    out = _Forward(buf, backend, [], [], [], [], [], [])
    for i, (ls, t) in enumerate(zip(spec.layers, _split(tensors, n))):
        n1w, n1b, n1rm, n1rv, c1w, c1b, n2w, n2b, n2rm, n2rv, c2w, c2b = t
        cl, k = widths[i], ls.growth
        # layer 0 reads the input; later ones their prefix of the buffer (a view or the scratch)
        xp = x.contiguous(memory_format=fmt) if i == 0 else _prefix(buf, cl, scratch, fmt, backend)
        batch = (cache_mean[:cl], cache_var[:cl]) if ls.norm1.training else None
        aff1, st1 = bn_coefficients(xp, n1w, n1b, n1rm, n1rv, ls.norm1.training, ls.norm1.momentum,
                                    ls.norm1.eps, backend, batch_stats=batch, batch_count=count)
        epi_stats = None
        if fused:
            y1, aff2, st2 = _fused_conv(spec.conv, spec.tf32, xp, c1w, ls.conv1, ls.norm2, aff1, n2w, n2b, n2rm, n2rv,
                                        backend)
            del xp
            want = i < last_batch_norm1 and ls.drop_rate == 0
            y2, m2, v2 = conv_ops.conv_bn_fwd(y1, c2w, list(ls.conv2.stride), list(ls.conv2.padding),
                                              list(ls.conv2.dilation), aff2, None, None, False, want, spec.tf32,
                                              spec.conv)
            if want:  # the cache's statistics of the new features, from conv2's epilogue
                epi_stats = sync_batch_stats(m2, v2, N * H * W, group) if group is not None else (m2, v2, 0)
        else:
            a1 = ops.bn_act_fwd(xp, aff1, None, None, True, backend)  # a transient, never saved
            del xp
            y1 = _conv(a1, c1w, c1b, ls.conv1)
            del a1
            aff2, st2 = bn_coefficients(y1, n2w, n2b, n2rm, n2rv, ls.norm2.training, ls.norm2.momentum,
                                        ls.norm2.eps, backend, group=ls.norm2.group)
            a2 = ops.bn_act_fwd(y1, aff2, None, None, True, backend)
            y2 = _conv(a2, c2w, c2b, ls.conv2)
            del a2
        if tuple(y2.shape) != (N, k, H, W):
            raise ValueError(f"dense block: layer {i + 1} produced new features of shape {tuple(y2.shape)}; "
                             f"a dense layer must keep the spatial size, expected {(N, k, H, W)}")
        mask = None
        if ls.drop_rate > 0:
            noise = F.dropout(torch.ones_like(y2), ls.drop_rate, True)  # torchvision's random stream
            y2 = y2 * noise
            mask = noise != 0
            del noise
        buf[:, cl:cl + k].copy_(y2)
        if i < last_batch_norm1:
            m, v, _ = epi_stats if epi_stats is not None else channel_stats(y2)
            cache_mean[cl:cl + k].copy_(m)
            cache_var[cl:cl + k].copy_(v)
        del y2
        if keep:
            out.y1s.append(y1)
            out.aff1s.append(aff1)
            out.st1s.append(st1)
            out.aff2s.append(aff2)
            out.st2s.append(st2)
            out.masks.append(mask)
    return out


def _native_backward(ctx, grad_out: Tensor, buf: Tensor, y1s, aff1s, st1s, aff2s, st2s, masks, weights,
                     conv_biases) -> Tuple[Optional[Tensor], ...]:
    """The block's backward as one call of ``resfused_C.dense_bwd``; the BN parameters'
    gradients (the accumulation dtype there) then take their parameters' dtype."""
    geometry, training, _, _, drop, growth = _native_args(ctx.spec)
    grads = torch.ops.resfused_C.dense_bwd.default(grad_out, buf, y1s, aff1s, st1s, aff2s, st2s, masks, weights,
                                                   conv_biases, geometry, training, drop, growth, ctx.c0,
                                                   [int(b) for b in ctx.needs_input_grad[1:]],
                                                   ops.memory_format_of(buf) == torch.channels_last)
    cast_native_grads(grads, 1, TENSORS_PER_LAYER, ctx.param_dtypes, (_N1W, _N1B, _N2W, _N2B), acc_dtype(buf.dtype))
    return (None, *grads)


class DenseBlockFunction(torch.autograd.Function):
    """Inputs: ``spec`` (``DenseBlockSpec``), ``x`` (the block input), then twelve tensors per
    layer (see ``TENSORS_PER_LAYER``). Output: the concatenation of x and every layer's new
    features, in torchvision's order."""

    @staticmethod
    def forward(ctx, spec: DenseBlockSpec, x: Tensor, *tensors):
        n = len(spec.layers)
        fwd = dense_block_forward(spec, x, tensors, keep=True)
        layers = _split(tensors, n)
        weights = [t[w] for t in layers for w in (_C1W, _C2W)]
        conv_biases = [t[b] for t in layers for b in (_C1B, _C2B)]
        ctx.spec = spec
        ctx.backend = fwd.backend
        ctx.triton = fwd.backend == "triton" or spec.conv != "library"  # (see first_order)
        ctx.c0 = x.shape[1]
        ctx.has_mask = [m is not None for m in fwd.masks]
        ctx.has_conv_bias = [b is not None for b in conv_biases]
        ctx.param_dtypes = [tuple(None if p is None else p.dtype for p in t) for t in layers]
        ctx.save_for_backward(fwd.buf, *fwd.y1s, *fwd.aff1s, *fwd.st1s, *fwd.aff2s, *fwd.st2s,
                              *[m for m in fwd.masks if m is not None], *weights,
                              *[b for b in conv_biases if b is not None])
        return fwd.buf

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        spec: DenseBlockSpec = ctx.spec
        backend = ctx.backend
        n = len(spec.layers)
        saved = list(ctx.saved_tensors)
        buf, rest = saved[0], saved[1:]
        y1s, aff1s, st1s, aff2s, st2s = (rest[j * n:(j + 1) * n] for j in range(5))
        rest = rest[5 * n:]
        n_masks = sum(ctx.has_mask)
        mask_iter = iter(rest[:n_masks])
        masks = [next(mask_iter) if has else None for has in ctx.has_mask]
        rest = rest[n_masks:]
        weights, rest = rest[:2 * n], rest[2 * n:]
        bias_iter = iter(rest)
        conv_biases = [next(bias_iter) if has else None for has in ctx.has_conv_bias]

        if _native(spec, backend) and not _batched(grad_out):
            return _native_backward(ctx, grad_out, buf, y1s, aff1s, st1s, aff2s, st2s, masks, weights, conv_biases)
        needs = ctx.needs_input_grad  # (spec, x, *tensors)
        need_x = bool(needs[1])
        grads: List[Optional[Tensor]] = [None] * (len(needs) - 2)

        def need(layer: int, j: int) -> bool:
            return bool(needs[2 + layer * TENSORS_PER_LAYER + j])

        def put(layer: int, j: int, value: Optional[Tensor]):
            if value is not None and need(layer, j):
                dtype = ctx.param_dtypes[layer][j]
                grads[layer * TENSORS_PER_LAYER + j] = value if value.dtype == dtype else value.to(dtype)

        fmt = ops.memory_format_of(buf)
        # (under vmap, a batch of output gradients: the gradient buffer is batched too)
        gbuf = grad_out.clone() if _batched(grad_out) else torch.empty_like(buf, memory_format=fmt).copy_(grad_out)
        widths = prefix_widths(ctx.c0, spec)
        scratch = _prefix_scratch(buf, widths, backend) if spec.conv == "library" else None
        for i in range(n - 1, -1, -1):
            ls = spec.layers[i]
            cl, k = widths[i], ls.growth
            need_prefix = i > 0 or need_x
            need_norm1 = need_prefix or need(i, _N1W) or need(i, _N1B)
            need_conv1 = need_norm1 or need(i, _C1W) or need(i, _C1B)
            need_any = need_conv1 or any(need(i, j) for j in (_N2W, _N2B, _C2W, _C2B))
            if not need_any:
                continue
            g = gbuf[:, cl:cl + k]  # complete: every later layer has added its share
            if masks[i] is not None:
                noise = masks[i].to(g.dtype)
                if ls.drop_rate < 1:
                    noise.div_(1.0 - ls.drop_rate)
                g = g * noise
                del noise
            g = g.contiguous(memory_format=fmt)
            y1 = y1s[i]
            if spec.conv != "library":
                # conv2: wgrad recomputes relu2 in its prologue, dgrad's epilogue masks and
                # reduces for norm2; conv1 likewise for norm1, reading the prefix in place
                need_n2 = need_conv1 or need(i, _N2W) or need(i, _N2B)
                dz2, sums2, dw2 = _fused_conv_backward(spec.conv, spec.tf32, g, y1, weights[2 * i + 1], ls.conv2,
                                                       aff2s[i], need_n2, need(i, _C2W), st2s[i])
                put(i, _C2W, dw2)
                del g
                if not need_n2:
                    continue
                put(i, _N2W, sums2[1])
                put(i, _N2B, sums2[0])
                if not need_conv1:
                    continue
                dy1 = _bn_input_grad(dz2, y1, aff2s[i], st2s[i], sums2, ls.norm2, backend)
                del dz2
                xp = buf[:, :cl]
                dz1, sums1, dw1 = _fused_conv_backward(spec.conv, spec.tf32, dy1, xp, weights[2 * i], ls.conv1,
                                                       aff1s[i], need_norm1, need(i, _C1W), st1s[i])
                put(i, _C1W, dw1)
                del dy1
                if need_norm1:
                    put(i, _N1W, sums1[1])
                    put(i, _N1B, sums1[0])
                    if need_prefix:  # added into the gradient buffer by the apply pass itself
                        _bn_input_grad(dz1, xp, aff1s[i], st1s[i], sums1, ls.norm1, backend, acc=gbuf[:, :cl])
                continue
            a2 = ops.bn_act_fwd(y1, aff2s[i], None, None, True, backend)  # recompute relu2
            d_a2, dw2, db2 = _conv_backward(g, a2, weights[2 * i + 1], conv_biases[2 * i + 1], ls.conv2,
                                            need_conv1 or need(i, _N2W) or need(i, _N2B),
                                            need(i, _C2W), need(i, _C2B))
            put(i, _C2W, dw2)
            put(i, _C2B, db2)
            del g
            if not (need_conv1 or need(i, _N2W) or need(i, _N2B)):
                continue
            del a2  # the relu mask is recomputed from y1 (z <= 0): one read fewer per pass
            need_sums2 = ls.norm2.training or need(i, _N2W) or need(i, _N2B)
            dy1, _, sums2 = bn_act_backward(d_a2, y1, None, aff2s[i], st2s[i], ls.norm2.training, True, backend,
                                            need_dx=need_conv1, need_sums=need_sums2, group=ls.norm2.group)
            put(i, _N2W, sums2[1])
            put(i, _N2B, sums2[0])
            del d_a2
            if not need_conv1:
                continue
            xp = _prefix(buf, cl, scratch, fmt, backend)
            a1 = ops.bn_act_fwd(xp, aff1s[i], None, None, True, backend)  # recompute relu(bn1(prefix))
            d_a1, dw1, db1 = _conv_backward(dy1, a1, weights[2 * i], conv_biases[2 * i], ls.conv1,
                                            need_norm1, need(i, _C1W), need(i, _C1B))
            put(i, _C1W, dw1)
            put(i, _C1B, db1)
            del dy1, a1
            if need_norm1:
                need_sums1 = ls.norm1.training or need(i, _N1W) or need(i, _N1B)
                # the prefix's input gradient is added into the gradient buffer by the apply
                # pass itself (one pass where xp is the buffer's view, else dx, then an add)
                _, _, sums1 = bn_act_backward(d_a1, xp, None, aff1s[i], st1s[i], ls.norm1.training, True,
                                              backend, need_dx=need_prefix, need_sums=need_sums1,
                                              group=ls.norm1.group, acc=gbuf[:, :cl] if need_prefix else None)
                put(i, _N1W, sums1[1])
                put(i, _N1B, sums1[0])
            del xp, d_a1
        dx = gbuf[:, :ctx.c0].contiguous(memory_format=fmt) if need_x else None
        return (None, dx, *grads)


# ----------------------------------------------------------------------------- transition
class PoolSpec(NamedTuple):
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: Optional[int]


class TransitionSpec(NamedTuple):
    bn: BNSpec
    conv: ConvSpec
    pool: PoolSpec
    backend: str
    #: "library", or "triton"/"eager": the fused conv op reads x through relu(bn(.)) in
    #: its prologue (relu(bn(x)) is never written), dgrad's epilogue does the BN-ReLU
    #: backward and wgrad recomputes the activation in its prologue
    conv_path: str = "library"
    tf32: bool = False


def _pool_out_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """An average pool's output size along one axis, as ``F.avg_pool2d`` works it out."""
    out = (size + 2 * p - k + ((s - 1) if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input
        out -= 1
    return out


def check_transition_shapes(name: str, x_shape: Sequence[int], w_shape: Sequence[int], conv: ConvSpec,
                            pool: PoolSpec) -> None:
    """Raises, before anything runs, when x is too small for the transition's conv and
    average pool, or the pool's padding is more than half its kernel (``F.avg_pool2d``'s
    own errors, which it would raise after the statistics moved)."""
    shape = conv_chain_shapes(name, x_shape, [(w_shape, conv)], "the transition's convolution")[0]
    for i in range(2):
        k, s, p = pool.kernel_size[i], pool.stride[i], pool.padding[i]
        if p > k // 2:
            raise ValueError(f"{name}: the average pool's padding {tuple(pool.padding)} must be at most half its "
                             f"kernel size {tuple(pool.kernel_size)}")
        if _pool_out_size(shape[2 + i], k, s, p, pool.ceil_mode) < 1:
            raise ValueError(f"{name}: input of spatial size {tuple(x_shape[2:])} is too small for the transition's "
                             f"average pool (kernel {tuple(pool.kernel_size)}, stride {tuple(pool.stride)})")


def _pool(y: Tensor, p: PoolSpec) -> Tensor:
    return F.avg_pool2d(y, p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad, p.divisor_override)


def transition_forward(spec: TransitionSpec, x: Tensor, w, b, rm, rv, cw, cb):
    backend = ops.resolve(spec.backend, x)
    affine, stats = bn_coefficients(x, w, b, rm, rv, spec.bn.training, spec.bn.momentum, spec.bn.eps, backend,
                                    group=spec.bn.group)
    if spec.conv_path != "library":
        c = spec.conv
        y = conv_ops.conv_bn_fwd(x, cw, list(c.stride), list(c.padding), list(c.dilation), affine, None, None, False,
                                 False, spec.tf32, spec.conv_path)[0]
    else:
        a = ops.bn_act_fwd(x, affine, None, None, True, backend)
        y = _conv(a, cw, cb, spec.conv)
        del a
    return _pool(y, spec.pool), y, affine, stats, backend


class TransitionFunction(torch.autograd.Function):
    """DenseNet transition ``avg_pool(conv(relu(bn(x))))`` as one node. Keeps x (the dense
    block's output, which that block keeps anyway) and per-channel stats; relu(bn(x)) is
    recomputed in backward and the conv output is never kept (avg-pool backward needs
    only its shape). Inputs: spec, x, bn weight, bias, running mean, running var, conv
    weight, conv bias."""

    @staticmethod
    def forward(ctx, spec: TransitionSpec, x, w, b, rm, rv, cw, cb):
        out, y, affine, stats, backend = transition_forward(spec, x, w, b, rm, rv, cw, cb)
        ctx.spec = spec
        ctx.backend = backend
        ctx.triton = backend == "triton" or spec.conv_path != "library"  # (see first_order)
        ctx.y_shape = tuple(y.shape)
        ctx.y_format = ops.memory_format_of(y)
        ctx.has_conv_bias = cb is not None
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (w, b, rm, rv, cw, cb))
        ctx.save_for_backward(x, affine, stats, cw, cb)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        spec: TransitionSpec = ctx.spec
        x, affine, stats, cw, cb = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (spec, x, w, b, rm, rv, cw, cb)
        p = spec.pool
        # avg-pool backward reads only the input's shape and layout, never its values
        y_like = torch.empty(ctx.y_shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=ctx.y_format)
        dy = torch.ops.aten.avg_pool2d_backward(grad_out, y_like, list(p.kernel_size), list(p.stride),
                                                list(p.padding), p.ceil_mode, p.count_include_pad,
                                                p.divisor_override)
        del y_like
        need_bn = bool(needs[1] or needs[2] or needs[3])
        dx = dw = db = None
        if spec.conv_path != "library":
            dz, sums, dcw = _fused_conv_backward(spec.conv_path, spec.tf32, dy, x, cw, spec.conv, affine,
                                                 need_bn, bool(needs[6]), stats)
            if need_bn:
                dx = _bn_input_grad(dz, x, affine, stats, sums, spec.bn, ctx.backend) if needs[1] else None
                dw = sums[1].to(ctx.param_dtypes[0]) if needs[2] else None
                db = sums[0].to(ctx.param_dtypes[1]) if needs[3] else None
            dcw = dcw.to(ctx.param_dtypes[4]) if (needs[6] and dcw is not None) else None
            return None, dx, dw, db, None, None, dcw, None
        a = ops.bn_act_fwd(x, affine, None, None, True, ctx.backend)
        da, dcw, dcb = _conv_backward(dy, a, cw, cb, spec.conv, need_bn, bool(needs[6]), bool(needs[7]))
        del a  # the relu mask is recomputed from x
        if need_bn:
            need_sums = spec.bn.training or bool(needs[2] or needs[3])
            dx, _, sums = bn_act_backward(da, x, None, affine, stats, spec.bn.training, True, ctx.backend,
                                          need_dx=bool(needs[1]), need_sums=need_sums, group=spec.bn.group)
            dw = sums[1].to(ctx.param_dtypes[0]) if needs[2] else None
            db = sums[0].to(ctx.param_dtypes[1]) if needs[3] else None
        dcw = dcw.to(ctx.param_dtypes[4]) if (needs[6] and dcw is not None) else None
        dcb = dcb.to(ctx.param_dtypes[5]) if (needs[7] and dcb is not None) else None
        return None, dx, dw, db, None, None, dcw, dcb


__all__ = ["DenseBlockFunction", "DenseBlockSpec", "DenseLayerSpec", "TransitionFunction", "TransitionSpec",
           "PoolSpec", "dense_block_forward", "transition_forward"]
