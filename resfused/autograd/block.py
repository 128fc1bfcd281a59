"""``ResidualBlockFunction``: a whole ResNet block (BasicBlock or Bottleneck) as one
autograd node.

Forward: library convs (``F.conv2d``) and the fused kernels —
conv1 → fused BN-ReLU → conv2 [→ fused BN-ReLU → conv3] → fused join
``relu(bn_last(y_last) + identity)``, where on the standard downsample branch both BNs
are applied in the same pass, ``relu(bn_last(y_last) + bn_d(conv_d(x)))``.

Memory (DESIGN.md §3): the node keeps x, the pre-BN conv outputs ``y_i`` (and ``y_d``),
the block output and fp32 per-channel statistics; with ``memory_efficient`` the inner
BN-ReLU outputs ``a_i`` are recomputed from ``y_i`` in backward (one elementwise pass
each) instead of being kept. Running statistics are updated exactly once, in forward.

Backward: the fused join backward, then per conv ``aten.convolution_backward`` and the
fused BN-ReLU backward (relu mask recomputed from ``y_i``: 0 where ``z <= 0``,
rounded as in forward, so no activation is read).

On the cpu and cuda backends with the library convolutions (``runs_native``) forward and
backward are one call each of ``resfused_C.block_fwd`` / ``block_bwd`` (csrc/block.cpp):
the same ops in the same order, from C++, which takes most of the Python's host time off
each call. The Python path below remains for the other cases.
"""
from __future__ import annotations

import functools

from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import sync_active, sync_batch_stats, sync_grad_sums
from ..ops import bn_act as ops
from ..ops import conv as conv_ops
from . import bn_act as _bn_act
from .bn_act import _batched, bn_act_backward, bn_coefficients, channel_count, first_order, grad_coefficients

TENSORS_PER_UNIT = 6  # conv weight, conv bias, bn weight, bn bias, running mean, running var


class ConvSpec(NamedTuple):
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int


class BNSpec(NamedTuple):
    training: bool  # batch statistics (True) or running statistics (False)
    momentum: float
    eps: float
    group: Any = None  # process group the batch statistics are synchronized over (sync BN)


class BlockSpec(NamedTuple):
    convs: Tuple[ConvSpec, ...]       # one per unit; the last unit feeds the join
    bns: Tuple[BNSpec, ...]
    downsample: Optional[Tuple[ConvSpec, BNSpec]]  # the fused conv-BN downsample branch, if any
    memory_efficient: bool
    backend: str
    #: "library": F.conv2d / aten.convolution_backward around the fused elementwise kernels;
    #: "triton" / "eager": the fused conv ops (``resfused.ops.conv``) of that backend, with
    #: each inner BN-ReLU in the next conv's prologue and the statistics in the epilogue
    conv: str = "library"
    tf32: bool = False  # the fused conv ops may multiply fp32 in TF32
    #: the caller ran ``check_join_shapes`` on these inputs already (the fused modules do,
    #: before any running statistic moves): forward does not repeat it
    checked: bool = False


def _conv(x: Tensor, w: Tensor, b: Optional[Tensor], c: ConvSpec) -> Tensor:
    return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)


def _conv_backward(grad: Tensor, inp: Tensor, w: Tensor, b: Optional[Tensor], c: ConvSpec,
                   need_inp: bool, need_w: bool, need_b: bool):
    if not (need_inp or need_w or need_b):
        return None, None, None
    bias_sizes = [w.shape[0]] if b is not None else None
    return torch.ops.aten.convolution_backward(grad, inp, w, bias_sizes, list(c.stride), list(c.padding),
                                               list(c.dilation), False, [0, 0], c.groups,
                                               [need_inp, need_w, need_b and b is not None])


def _pointwise_grid(inp: Tensor, w: Tensor, c: ConvSpec) -> Optional[Tensor]:
    """A 1x1 conv with stride s > 1 and no padding (ResNet's downsample branch) reads only
    ``inp[:, :, ::s, ::s]``: it is the stride-1 conv of that grid, and its input gradient
    is zero off the grid. On the CPU the library's strided backward (oneDNN) runs 1.1-2.8x
    slower at ResNet-50's downsample shapes than the stride-1 backward of the grid plus a
    strided add of its input gradient, so there the grid view is returned (else None)."""
    if inp.device.type != "cpu" or tuple(w.shape[-2:]) != (1, 1) or c.padding != (0, 0) or c.stride == (1, 1):
        return None
    return inp[:, :, ::c.stride[0], ::c.stride[1]]


def _fused_conv(path: str, tf32: bool, h: Tensor, w: Tensor, c: ConvSpec, bn: BNSpec,
                prologue: Optional[Tensor], g, b, rm, rv, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """y = conv(prologue(h)) on the fused conv ops of ``path`` with the BN statistics from
    the conv's epilogue; returns (y, affine, stats) of the BN that follows (running
    statistics updated once)."""
    y, mean, var = conv_ops.conv_bn_fwd(h, w, list(c.stride), list(c.padding), list(c.dilation), prologue, None,
                                        None, False, bn.training, tf32, path)
    batch_stats, count = None, None
    if bn.training:
        count = channel_count(y)
        if sync_active(bn.group, True):
            mean, var, count = sync_batch_stats(mean, var, count, bn.group)
        batch_stats = (mean, var)
    affine, st = bn_coefficients(y, g, b, rm, rv, bn.training, bn.momentum, bn.eps, backend,
                                 batch_stats=batch_stats, batch_count=count)
    return y, affine, st


def _fused_conv_backward(path: str, tf32: bool, dy: Tensor, inp: Tensor, w: Tensor, c: ConvSpec,
                         prologue: Optional[Tensor], need_inp: bool, need_w: bool,
                         bn_stats: Optional[Tensor] = None):
    """(d_inp or dz, sums, dw) of a fused conv (ops of ``path``) whose input was
    ``relu(inp*scale + shift)`` (``prologue``) or ``inp`` itself; with a prologue, d_inp
    is the ReLU-masked gradient dz and sums are (Σdz, Σdz*x̂) of the BN with ``bn_stats``."""
    dw = conv_ops.conv_bn_wgrad(dy, inp, list(w.shape), list(c.stride), list(c.padding), list(c.dilation),
                                prologue, tf32, path) if need_w else None
    d_inp = sums = None
    if need_inp:
        d_inp, sums = conv_ops.conv_bn_dgrad(dy, w, list(inp.shape), list(c.stride), list(c.padding),
                                             list(c.dilation), inp if prologue is not None else None, prologue,
                                             bn_stats, tf32, path)
    return d_inp, sums, dw


def _bn_input_grad(dz: Tensor, x: Tensor, affine: Tensor, stats: Tensor, sums: Tensor, bn: BNSpec,
                   backend: str, acc: Optional[Tensor] = None) -> Optional[Tensor]:
    """The BN input gradient from the ReLU-masked dz and its sums (Σdz, Σdz*x̂), which a
    fused dgrad epilogue produced: the apply pass alone (sums synchronized under sync BN).
    With ``acc`` it is added into acc in place (``ops.bn_act_bwd_apply_acc``) and None is
    returned."""
    g_sums, g_count = sums, channel_count(x)
    if sync_active(bn.group, bn.training):
        g_sums, g_count = sync_grad_sums(sums, g_count, bn.group)
    coef = grad_coefficients(stats, affine, g_sums, 1, bn.training, g_count, backend)
    if acc is not None:
        ops.bn_act_bwd_apply_acc(acc, dz, x, affine, coef, None, False, backend)
        return None
    return ops.bn_act_bwd_apply(dz, x, affine, coef, None, None, None, None, False, backend)[0]


def _add_input_grads(dx: Optional[Tensor], d_inp: Tensor, grid: Optional[Tuple[int, int]]) -> Tensor:
    """dx + d_inp, in place: both are fresh tensors of this backward, so no third x-sized
    buffer is allocated. With ``grid`` (sh, sw), dx is the gradient of x[:, :, ::sh, ::sw]
    alone and is added into that grid of d_inp."""
    if dx is None:
        return d_inp
    if grid is None:
        return dx.add_(d_inp)
    d_inp[:, :, ::grid[0], ::grid[1]].add_(dx)
    return d_inp


def _conv_out_shape(shape: Sequence[int], w_shape: Sequence[int], c: ConvSpec) -> Tuple[int, ...]:
    """The output shape of a conv with weight shape ``w_shape`` and geometry ``c`` on an
    input of ``shape``."""
    return (shape[0], w_shape[0]) + tuple(conv_ops.out_size(shape[2 + i], w_shape[2 + i], c.stride[i], c.padding[i],
                                                             c.dilation[i]) for i in range(2))


def conv_chain_shapes(name: str, x_shape: Sequence[int], convs: Sequence[Tuple[Sequence[int], ConvSpec]],
                      what: str = "the block's convolutions") -> List[Tuple[int, ...]]:
    """The output shape of each of ``convs`` ((weight shape, geometry), applied in turn) on
    an input of ``x_shape``; raises, before anything runs, when the input is too small for
    them (an empty spatial size included), as the library conv would after statistics moved."""
    shapes: List[Tuple[int, ...]] = []
    shape: Tuple[int, ...] = tuple(x_shape)
    for w_shape, c in convs:
        shape = _conv_out_shape(shape, w_shape, c)
        if shape[2] < 1 or shape[3] < 1:
            raise ValueError(f"{name}: input of spatial size {tuple(x_shape[2:])} is too small for {what}")
        shapes.append(shape)
    return shapes


def check_join_shapes(name: str, x_shape: Sequence[int], convs: Sequence[Tuple[Sequence[int], ConvSpec]],
                      identity_shape: Optional[Sequence[int]],
                      downsample: Optional[Tuple[Sequence[int], ConvSpec]] = None,
                      batch_stats: Sequence[bool] = ()) -> None:
    """Raises, before anything runs, when x is too small for the block's convolutions
    (``convs``: (weight shape, geometry) in turn), when the main branch would not give
    the identity branch's shape: ``identity_shape``, else the fused ``downsample`` conv's
    output, else x's (a block built without the downsample it needs), or when a BN that
    normalises with batch statistics (``batch_stats``: one flag per conv, the downsample's
    last) would see one value per channel (``nn.BatchNorm2d``'s own error). Shapes that
    passed are remembered: a model calls each block with a few input shapes (not while
    torch.compile traces, whose sizes may be symbolic)."""
    args = (name, tuple(x_shape), tuple((tuple(w), c) for w, c in convs),
            None if identity_shape is None else tuple(identity_shape),
            None if downsample is None else (tuple(downsample[0]), downsample[1]), tuple(batch_stats))
    if ops._compiling() or not _hashable(args):  # (a ConvSpec built with lists: checked, not remembered)
        return _check_join_shapes.__wrapped__(*args)
    _check_join_shapes(*args)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _check_join_shapes(name: str, x_shape: Tuple[int, ...], convs, identity_shape: Optional[Tuple[int, ...]],
                       downsample, batch_stats: Tuple[bool, ...]) -> None:
    shapes = conv_chain_shapes(name, x_shape, convs)
    if identity_shape is None:
        identity_shape = _conv_out_shape(x_shape, *downsample) if downsample is not None else x_shape
    if tuple(identity_shape) != shapes[-1]:
        raise ValueError(f"{name}: the identity branch gives shape {tuple(identity_shape)} but the main branch "
                         f"gives {shapes[-1]}; the block needs a downsample that matches them")
    bn_inputs = [(f"bn{i + 1}", s) for i, s in enumerate(shapes)]
    if downsample is not None:
        bn_inputs.append(("downsample.1", tuple(identity_shape)))
    for (bn, shape), training in zip(bn_inputs, batch_stats):
        if training and shape[0] * shape[2] * shape[3] == 1:
            raise ValueError(f"{name}: expected more than 1 value per channel when training, got input size "
                             f"{shape} at {bn}")


def runs_native(backend: str, conv_path: str, bns: Iterable[BNSpec]) -> bool:
    """Whether a whole block (these BNs) runs as one call into resfused._C each way (its
    block composites: the same ops in the same order as the Python path, from C++): a
    backend of resfused._C with its composites on, the library convolutions, no
    synchronized batch statistics, eager execution (torch.compile traces the Python path)."""
    if backend not in _bn_act._COMPOSITE_BACKENDS or conv_path != "library" or ops._compiling():
        return False
    return not any(sync_active(bn.group, bn.training) for bn in bns)


def _all_units(spec: BlockSpec) -> Tuple[Tuple[ConvSpec, ...], Tuple[BNSpec, ...]]:
    """(convs, bns) of every unit of the block: the main branch's, then the fused
    downsample branch's when there is one."""
    if spec.downsample is None:
        return spec.convs, spec.bns
    return spec.convs + (spec.downsample[0],), spec.bns + (spec.downsample[1],)


def _native(spec: BlockSpec, backend: str) -> bool:
    """``runs_native`` for a ResNet block (``resfused_C.block_fwd`` / ``block_bwd``, csrc/block.cpp)."""
    return runs_native(backend, spec.conv, _all_units(spec)[1])


def cast_native_grads(grads: List[Optional[Tensor]], start: int, stride: int, param_dtypes, slots: Sequence[int],
                      acc: torch.dtype) -> None:
    """A native backward's BN parameter gradients (``grads[start + unit * stride + j]`` for
    j in ``slots``), computed in the accumulation dtype ``acc``, cast in place to their
    parameters' dtypes (``param_dtypes[unit][j]``), as the Python path's ``put`` does."""
    for unit, dtypes in enumerate(param_dtypes):
        for j in slots:
            g = grads[start + unit * stride + j]
            if g is not None and dtypes[j] != acc:
                grads[start + unit * stride + j] = g.to(dtypes[j])


def _native_args(spec: BlockSpec) -> Tuple[List[int], List[int], List[float], List[float]]:
    """(geometry, training, momentum, eps) of ``block_fwd``/``block_bwd`` for the block's
    units, the downsample branch's last: 7 ints of geometry, then one flag, momentum and
    eps per unit; remembered per spec (a spec built with lists: worked out each call)."""
    return _block_native_args(spec) if _hashable(spec) else _block_native_args.__wrapped__(spec)


@functools.lru_cache(maxsize=256)
def _block_native_args(spec: BlockSpec) -> Tuple[List[int], List[int], List[float], List[float]]:
    convs, bns = _all_units(spec)
    geometry = [v for c in convs for v in (*c.stride, *c.padding, *c.dilation, c.groups)]
    return geometry, [int(bn.training) for bn in bns], [float(bn.momentum) for bn in bns], \
        [float(bn.eps) for bn in bns]


def _units(tensors: Sequence[Optional[Tensor]], n: int) -> List[Sequence[Optional[Tensor]]]:
    k = TENSORS_PER_UNIT
    return [tensors[i * k:(i + 1) * k] for i in range(n)]


def _forward(spec: BlockSpec, backend: str, x: Tensor, identity: Optional[Tensor], units):
    """The block's forward op by op from Python (the general path: the fused convolutions,
    synchronized statistics, torch.compile, the triton and eager backends): (out, y_d,
    aff_d, st_d, ys, affines, stats, acts)."""
    n = len(spec.convs)
    fused = spec.conv != "library"
    h = x
    ys, affines, stats, acts = [], [], [], []
    for i, ((w, cb, g, b, rm, rv), conv, bn) in enumerate(zip(units, spec.convs, spec.bns)):
        if fused:  # the previous BN-ReLU runs in this conv's prologue: a is never written
            y, affine, st = _fused_conv(spec.conv, spec.tf32, h, w, conv, bn, affines[-1] if i else None,
                                        g, b, rm, rv, backend)
        else:
            y = _conv(h, w, cb, conv)
            affine, st = bn_coefficients(y, g, b, rm, rv, bn.training, bn.momentum, bn.eps, backend,
                                         group=bn.group)
        ys.append(y)
        affines.append(affine)
        stats.append(st)
        if i < n - 1:
            if fused:
                h = y
            else:
                h = ops.bn_act_fwd(y, affine, None, None, True, backend)
                acts.append(h)
    y_d = aff_d = st_d = None
    if spec.downsample is not None:
        w, cb, g, b, rm, rv = units[n]
        conv_d, bn_d = spec.downsample
        if fused:
            y_d, aff_d, st_d = _fused_conv(spec.conv, spec.tf32, x, w, conv_d, bn_d, None, g, b, rm, rv, backend)
        else:
            y_d = _conv(x, w, cb, conv_d)
            aff_d, st_d = bn_coefficients(y_d, g, b, rm, rv, bn_d.training, bn_d.momentum, bn_d.eps, backend,
                                          group=bn_d.group)
        out = ops.bn_act_fwd(ys[-1], affines[-1], y_d, aff_d, True, backend)
    else:
        residual = x if identity is None else identity
        out = ops.bn_act_fwd(ys[-1], affines[-1], residual, None, True, backend)
    return out, y_d, aff_d, st_d, ys, affines, stats, acts


def _native_forward(spec: BlockSpec, x: Tensor, identity: Optional[Tensor], tensors: Sequence[Optional[Tensor]]):
    """``_forward`` as one call of ``resfused_C.block_fwd``."""
    geometry, training, momentum, eps = _native_args(spec)
    ds = spec.downsample is not None
    res = torch.ops.resfused_C.block_fwd.default(x, identity, list(tensors), geometry, training, momentum, eps, ds,
                                                 not spec.memory_efficient)
    n = len(spec.convs)
    y_d, aff_d, st_d = res[1:4] if ds else (None, None, None)
    k = 4 if ds else 1
    return res[0], y_d, aff_d, st_d, res[k:k + n], res[k + n:k + 2 * n], res[k + 2 * n:k + 3 * n], res[k + 3 * n:]


def _native_backward(ctx, grad_out: Tensor, x: Tensor, out: Tensor, ys, affines, stats, kept_acts, y_d, aff_d, st_d,
                     weights, conv_biases) -> Tuple[Optional[Tensor], ...]:
    """The block's backward as one call of ``resfused_C.block_bwd``; the BN parameters'
    gradients (the accumulation dtype there) then take their parameters' dtype."""
    geometry, training, _, _ = _native_args(ctx.spec)
    grads = torch.ops.resfused_C.block_bwd.default(grad_out, x, out, ys, affines, stats, kept_acts, y_d, aff_d, st_d,
                                                   weights, conv_biases, geometry, training,
                                                   [int(b) for b in ctx.needs_input_grad[1:]], ctx.identity_given)
    cast_native_grads(grads, 2, TENSORS_PER_UNIT, ctx.param_dtypes, (2, 3), affines[0].dtype)
    return (None, *grads)


class ResidualBlockFunction(torch.autograd.Function):
    """Inputs: ``spec``, ``x``, ``identity`` (None: the identity is x, or the fused
    downsample branch when ``spec.downsample``), then six tensors per unit and six for the
    downsample branch (conv weight, conv bias, bn weight, bn bias, running mean, running var)."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x: Tensor, identity: Optional[Tensor], *tensors):
        if identity is not None and spec.downsample is not None:
            raise ValueError("ResidualBlockFunction: give either an identity tensor or a fused downsample branch "
                             "(spec.downsample), not both: the join adds one of them")
        backend = ops.resolve(spec.backend, x)
        n = len(spec.convs)
        units = _units(tensors, n + (1 if spec.downsample else 0))
        if not spec.checked:
            check_join_shapes("residual block", tuple(x.shape), [(u[0].shape, c) for u, c in zip(units, spec.convs)],
                              None if identity is None else identity.shape,
                              (units[n][0].shape, spec.downsample[0]) if spec.downsample else None,
                              [bn.training and bn.group is None for bn in _all_units(spec)[1]])
        if _native(spec, backend):
            out, y_d, aff_d, st_d, ys, affines, stats, acts = _native_forward(spec, x, identity, tensors)
        else:
            out, y_d, aff_d, st_d, ys, affines, stats, acts = _forward(spec, backend, x, identity, units)
        ctx.spec = spec
        ctx.backend = backend
        ctx.triton = backend == "triton" or spec.conv != "library"  # (see first_order)
        ctx.identity_given = identity is not None
        kept_acts = [] if spec.memory_efficient else acts
        weights = [u[0] for u in units]
        conv_biases = [u[1] for u in units]
        ctx.n_kept = (len(kept_acts), len(weights))
        ctx.has_conv_bias = [b is not None for b in conv_biases]
        ctx.param_dtypes = [tuple(None if t is None else t.dtype for t in u[:4]) for u in units]
        ctx.save_for_backward(x, out, y_d, aff_d, st_d, *ys, *affines, *stats, *kept_acts, *weights,
                              *[b for b in conv_biases if b is not None])
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        spec: BlockSpec = ctx.spec
        backend = ctx.backend
        n = len(spec.convs)
        n_acts, n_weights = ctx.n_kept
        saved = list(ctx.saved_tensors)
        x, out, y_d, aff_d, st_d = saved[:5]
        rest = saved[5:]
        ys, affines, stats = rest[:n], rest[n:2 * n], rest[2 * n:3 * n]
        kept_acts = rest[3 * n:3 * n + n_acts]
        weights = rest[3 * n + n_acts:3 * n + n_acts + n_weights]
        bias_iter = iter(rest[3 * n + n_acts + n_weights:])
        conv_biases = [next(bias_iter) if has else None for has in ctx.has_conv_bias]
        if _native(spec, backend) and not _batched(grad_out):
            return _native_backward(ctx, grad_out, x, out, ys, affines, stats, kept_acts, y_d, aff_d, st_d, weights,
                                    conv_biases)

        needs = ctx.needs_input_grad  # (spec, x, identity, *tensors)
        k = TENSORS_PER_UNIT

        def need(unit: int, j: int) -> bool:
            return bool(needs[3 + unit * k + j])

        grads: List[Optional[Tensor]] = [None] * (len(needs) - 3)

        def put(unit: int, j: int, value: Optional[Tensor]):
            if value is not None and need(unit, j):
                dtype = ctx.param_dtypes[unit][j]
                grads[unit * k + j] = value if value.dtype == dtype else value.to(dtype)

        any_param_grad = any(needs[3:])
        fused = spec.conv != "library"
        need_x = bool(needs[1])
        ds = spec.downsample
        last = n - 1

        # The join: relu(bn_last(y_last) + identity | bn_d(y_d)).
        bn_last = spec.bns[last]
        need_sums = bn_last.training or need(last, 2) or need(last, 3) or (
            ds is not None and (ds[1].training or need(n, 2) or need(n, 3)))
        want_identity = ds is None and (need_x if not ctx.identity_given else bool(needs[2]))
        want_ds = ds is not None and (need_x or need(n, 0) or need(n, 1) or need(n, 2) or need(n, 3))
        dy, dres, sums = bn_act_backward(
            grad_out, ys[last], out, affines[last], stats[last], bn_last.training, True, backend,
            need_dx=True, need_sums=need_sums or any_param_grad, plain_residual_grad=want_identity,
            residual=y_d if ds is not None else None, res_affine=aff_d, res_stats=st_d,
            res_training=ds[1].training if ds is not None else False,
            group=bn_last.group if bn_last.group is not None else (ds[1].group if ds is not None else None))
        put(last, 2, sums[1])
        put(last, 3, sums[0])

        dx = None
        dx_grid = None  # (sh, sw) when dx holds only the gradient of x[:, :, ::sh, ::sw]
        if ds is not None:
            put(n, 2, sums[2])
            # both BNs' bias gradient is Σdy: a tensor of its own for each parameter's .grad,
            # or an in-place op on one (accumulation, clipping, unscaling) would hit both
            put(n, 3, sums[0].clone() if need(last, 3) else sums[0])
            if want_ds and fused:
                dx_d, _, dw_d = _fused_conv_backward(spec.conv, spec.tf32, dres, x, weights[n], ds[0], None, need_x,
                                                     need(n, 0))
                put(n, 0, dw_d)
                dx = dx_d
            elif want_ds:
                inp_d, conv_d = x, ds[0]
                grid = _pointwise_grid(x, weights[n], ds[0])
                if grid is not None:  # dx_d is the gradient of x[:, :, ::s, ::s] only
                    inp_d, conv_d, dx_grid = grid, ds[0]._replace(stride=(1, 1)), ds[0].stride
                dx_d, dw_d, db_d = _conv_backward(dres, inp_d, weights[n], conv_biases[n], conv_d, need_x, need(n, 0),
                                                  need(n, 1))
                put(n, 0, dw_d)
                put(n, 1, db_d)
                dx = dx_d
        elif want_identity and not ctx.identity_given:
            dx = dres
        d_identity = dres if (ctx.identity_given and needs[2]) else None

        # Units from last to first: conv backward, then the BN-ReLU that produced its input.
        for i in range(last, -1, -1):
            if fused:
                # wgrad recomputes a_{i-1} in its prologue; dgrad's epilogue applies the
                # ReLU mask and reduces (Σdz, Σdz*x̂), so only the apply pass is left.
                inp = x if i == 0 else ys[i - 1]
                pro = None if i == 0 else affines[i - 1]
                d_inp, sums, dw = _fused_conv_backward(spec.conv, spec.tf32, dy, inp, weights[i], spec.convs[i], pro,
                                                       i > 0 or need_x, need(i, 0), None if i == 0 else stats[i - 1])
                put(i, 0, dw)
                if i == 0:
                    if need_x and d_inp is not None:
                        dx = _add_input_grads(dx, d_inp, dx_grid)
                    break
                put(i - 1, 2, sums[1])
                put(i - 1, 3, sums[0])
                dy = _bn_input_grad(d_inp, inp, affines[i - 1], stats[i - 1], sums, spec.bns[i - 1], backend)
                continue
            if i == 0:
                inp = x
            elif kept_acts:
                inp = kept_acts[i - 1]
            else:  # recompute a_{i-1} = relu(bn(y_{i-1})): one elementwise pass
                inp = ops.bn_act_fwd(ys[i - 1], affines[i - 1], None, None, True, backend)
            need_inp = i > 0 or need_x
            d_inp, dw, db = _conv_backward(dy, inp, weights[i], conv_biases[i], spec.convs[i],
                                           need_inp, need(i, 0), need(i, 1))
            put(i, 0, dw)
            put(i, 1, db)
            if i == 0:
                if need_x and d_inp is not None:
                    dx = _add_input_grads(dx, d_inp, dx_grid)
                break
            bn = spec.bns[i - 1]
            # The relu mask is recomputed from y (z <= 0, rounded as in forward) rather than
            # read from a_{i-1}: one tensor fewer to read in each of the two passes.
            del inp
            dy, _, sums = bn_act_backward(d_inp, ys[i - 1], None, affines[i - 1], stats[i - 1], bn.training, True,
                                          backend, need_dx=True, need_sums=True, group=bn.group)
            put(i - 1, 2, sums[1])
            put(i - 1, 3, sums[0])
        return (None, dx if need_x else None, d_identity, *grads)
