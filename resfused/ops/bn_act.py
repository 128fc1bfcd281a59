"""The BN-activation ops: schemas under ``torch.ops.resfused``, fake kernels and
backend dispatch.

Four ops make up a fused BatchNorm(+add)+activation, forward and backward
(DESIGN.md §1): ``bn_stats`` (one reduction pass), ``bn_act_fwd`` (one apply
pass), ``bn_act_bwd_reduce`` (one reduction pass) and ``bn_act_bwd_apply`` (one
apply pass). Their contract is written, executable, in ``resfused/ops/eager.py``.
A fifth, ``bn_act_bwd_apply_acc``, is the apply pass adding its input gradient into a
tensor in place (a dense block's gradient buffer) instead of writing a new one. A sixth,
``bn_coef``, is the per-channel step between the statistics and apply passes (scale,
shift, invstd, and the running-statistics update) in one launch: as a dozen [C]-sized
tensor ops it was most of the host time a BN spent on a GPU. A seventh,
``bn_relu_maxpool``, is the apply pass followed by max pooling with indices (a ResNet's
stem): one pass on the cpu backend (NCHW), the two ops in turn elsewhere.

Each op takes a ``backend`` argument (``"auto"`` or a backend name); the autograd
layer resolves it once per forward and hands the same name to backward. Before
calling a backend the op brings every big tensor into x's memory format (NCHW or
channels_last, contiguous) and checks the dtype is one the backend supports.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from . import eager

OPS = ("bn_stats", "bn_act_fwd", "bn_act_bwd_reduce", "bn_act_bwd_apply", "bn_act_bwd_apply_acc", "bn_coef",
       "bn_relu_maxpool")


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout resfused keeps for x: NCHW unless x is (or suggests) channels_last."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 4 and x.shape[1] > 1:  # strided: channels_last when channels vary fastest
        n, c, h, w = x.shape
        s = x.stride()
        if (w > 1 and s[1] < s[3]) or (w == 1 and h > 1 and s[1] < s[2]):
            return torch.channels_last
    return torch.contiguous_format


def _like_x(t: Optional[Tensor], fmt: torch.memory_format) -> Optional[Tensor]:
    if t is None:
        return None
    return t.contiguous(memory_format=fmt)


def _per_channel(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _backend_impl(name: str, op: str) -> Callable:
    if name == "eager":
        return getattr(eager, op)
    if name in NATIVE_BACKENDS:
        return _native_op(op)
    from ..triton import bn_act as triton_bn_act  # imports triton only when used

    return getattr(triton_bn_act, op)


NATIVE_BACKENDS = ("cpu", "cuda")  # the backends of resfused._C


@functools.lru_cache(maxsize=None)
def _native_op(op: str) -> Callable:
    """resfused._C's kernel entry (its default overload, resolved once: looking it up
    through ``torch.ops`` is a few microseconds of every call)."""
    return getattr(torch.ops.resfused_C, op).default


def _trace_time_constant(fn: Callable) -> Callable:
    """Under torch.compile, call ``fn`` while tracing and bake its result into the graph
    (backend choice is Python bookkeeping: imports, environment, thread-local state)."""
    mark = getattr(torch.compiler, "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_trace_time_constant
def _resolve_name(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    name = _backend.select_backend(device) if backend == "auto" else backend
    why = _backend.unavailable_reason(name, device)
    if why:
        raise RuntimeError(f"resfused backend {name!r} cannot run here: {why}")
    if dtype not in _backend.SUPPORTED_DTYPES[name]:
        supported = ", ".join(str(d).replace("torch.", "") for d in _backend.SUPPORTED_DTYPES[name])
        raise TypeError(f"resfused backend {name!r} does not support input dtype {dtype}; supported: {supported}")
    return name


def resolve(backend: str, x: Tensor) -> str:
    """Turn ``"auto"`` into a concrete backend for x and check x's dtype is supported.
    Under torch.compile the choice is made once, while tracing (``use_backend`` and
    ``RESFUSED_BACKEND`` then apply as they were at compile time)."""
    return _resolve_name(backend, x.device, x.dtype)


def _call(op: str, backend: str, x: Tensor, *args):
    return _backend_impl(resolve(backend, x), op)(*args)


#: backends whose fwd / bwd_reduce / bwd_apply kernels read x as a channel-prefix view
#: (``wide[:, :C]`` of a dense NCHW or channels_last tensor) in place, without a copy
PREFIX_VIEW_BACKENDS = frozenset({"cpu", "triton", "cuda"})


def is_prefix_view(x: Tensor) -> bool:
    """x is ``wide[:, :C]`` of a wider NCHW- or channels_last-contiguous tensor (and not
    itself contiguous): what a dense block's layer reads from the shared feature buffer."""
    if x.dim() != 4 or x.numel() == 0 or x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return False
    n, c, h, w = x.shape
    s = x.stride()
    nchw = (w == 1 or s[3] == 1) and (h == 1 or s[2] == w) and (c == 1 or s[1] == h * w) and n > 1 \
        and s[0] > c * h * w
    rs = s[3]
    cl = (c == 1 or s[1] == 1) and rs > c and (h == 1 or s[2] == w * rs) and (n == 1 or s[0] == h * w * rs) \
        and n * h * w > 1
    return nchw or cl


def _kernel_x(x: Tensor, fmt: torch.memory_format, backend: str) -> Tuple[str, Tensor]:
    """(resolved backend, x as its kernels take it): contiguous in fmt, or a channel-prefix
    view left in place for the backends that read one."""
    name = resolve(backend, x)
    return name, x if reads_as_is(name, x) else x.contiguous(memory_format=fmt)


def reads_as_is(backend: str, x: Tensor) -> bool:
    """Whether the ops hand x to the (resolved) backend's kernels without a copy: x is
    contiguous in its memory format, or a channel-prefix view the backend reads in place."""
    if x.is_contiguous(memory_format=memory_format_of(x)):
        return True
    return backend in PREFIX_VIEW_BACKENDS and is_prefix_view(x) and _reads_view(backend, x)


def _reads_view(name: str, x: Tensor) -> bool:
    """The backend's own condition on a prefix view: the cpu kernels take any; the triton
    ones an NCHW batch stride that is a whole number of channel planes; the cuda ones any
    NCHW view with H*W > 1 (one with H*W == 1 is the same memory as a channels_last
    view, and taken as one), and a channels_last view whose C and row stride are multiples
    of 16 bytes (what their vectorised channels_last kernels read; for anything else, or
    when x, grad_out, residual or out is not 16-byte aligned, their entry point copies x
    itself)."""
    if name == "triton":
        from ..triton import bn_act as triton_bn_act

        return triton_bn_act.x_layout(x) is not None
    if name == "cuda":
        # shapes and strides only (what torch.compile can trace; a prefix starts at channel 0
        # of its buffer): the kernels' entry point checks the real pointers (x's, and those
        # of the other big inputs) and copies a channels_last x where one is not 16-byte
        # aligned. The entry point takes a view as channels_last first, as here.
        n, c, h, w = x.shape
        s = x.stride()
        rs = s[3] if w > 1 else s[2] if h > 1 else s[0]
        cl = (c == 1 or s[1] == 1) and rs > c and (h == 1 or s[2] == w * rs) and (n == 1 or s[0] == h * w * rs)
        e = x.element_size()
        return not cl or (c * e % 16 == 0 and rs * e % 16 == 0)
    return True


def _bn_stats_impl(x: Tensor, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(mean, biased var) per channel, fp32 (fp64 for fp64 x)."""
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    return _call("bn_stats", backend, x, x)


bn_stats_op = torch.library.custom_op("resfused::bn_stats", mutates_args=())(_bn_stats_impl)


@bn_stats_op.register_fake
def _(x, backend="auto"):
    acc = eager.acc_dtype(x.dtype)
    c = x.shape[1]
    return x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _bn_act_fwd_impl(x: Tensor, affine: Tensor, residual: Optional[Tensor], res_affine: Optional[Tensor],
               relu: bool, backend: str = "auto") -> Tensor:
    """act(x*scale + shift [+ residual | + residual*res_scale + res_shift]) in x's dtype and layout."""
    fmt = memory_format_of(x)
    name, x = _kernel_x(x, fmt, backend)
    return _backend_impl(name, "bn_act_fwd")(x, _per_channel(affine), _like_x(residual, fmt),
                                             _per_channel(res_affine), relu)


bn_act_fwd_op = torch.library.custom_op("resfused::bn_act_fwd", mutates_args=())(_bn_act_fwd_impl)


@bn_act_fwd_op.register_fake
def _(x, affine, residual, res_affine, relu, backend="auto"):
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _bn_act_bwd_reduce_impl(grad_out: Tensor, x: Tensor, affine: Tensor, stats: Tensor, residual: Optional[Tensor],
                            res_affine: Optional[Tensor], res_stats: Optional[Tensor], out: Optional[Tensor],
                            relu: bool, write_dz: bool = False, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(sums, dz): rows (sum dz, sum dz*x_hat[, sum dz*res_hat]) as a [2 or 3, C] fp32
    tensor, and the masked gradient dz (x's dtype and layout) when ``write_dz``, else empty."""
    fmt = memory_format_of(x)
    name, x = _kernel_x(x, fmt, backend)
    return _backend_impl(name, "bn_act_bwd_reduce")(
        _like_x(grad_out, fmt), x, _per_channel(affine), _per_channel(stats), _like_x(residual, fmt),
        _per_channel(res_affine), _per_channel(res_stats), _like_x(out, fmt), relu, write_dz)


bn_act_bwd_reduce_op = torch.library.custom_op("resfused::bn_act_bwd_reduce", mutates_args=())(_bn_act_bwd_reduce_impl)


@bn_act_bwd_reduce_op.register_fake
def _(grad_out, x, affine, stats, residual, res_affine, res_stats, out, relu, write_dz=False, backend="auto"):
    rows = 3 if res_stats is not None else 2
    dz = torch.empty_like(x, memory_format=memory_format_of(x)) if write_dz else x.new_empty((0,))
    return x.new_empty((rows, x.shape[1]), dtype=eager.acc_dtype(x.dtype)), dz


def _bn_act_bwd_apply_impl(grad_out: Tensor, x: Tensor, affine: Tensor, coef: Tensor, residual: Optional[Tensor],
                     res_affine: Optional[Tensor], res_coef: Optional[Tensor], out: Optional[Tensor],
                     relu: bool, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(dx, dres): input gradients of the BN(+add)+activation; dres is empty without residual."""
    fmt = memory_format_of(x)
    name, x = _kernel_x(x, fmt, backend)
    return _backend_impl(name, "bn_act_bwd_apply")(
        _like_x(grad_out, fmt), x, _per_channel(affine), _per_channel(coef), _like_x(residual, fmt),
        _per_channel(res_affine), _per_channel(res_coef), _like_x(out, fmt), relu)


bn_act_bwd_apply_op = torch.library.custom_op("resfused::bn_act_bwd_apply", mutates_args=())(_bn_act_bwd_apply_impl)


@bn_act_bwd_apply_op.register_fake
def _(grad_out, x, affine, coef, residual, res_affine, res_coef, out, relu, backend="auto"):
    fmt = memory_format_of(x)
    dres = torch.empty_like(x, memory_format=fmt) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x, memory_format=fmt), dres


def _bn_act_bwd_apply_acc_impl(acc: Tensor, grad_out: Tensor, x: Tensor, affine: Tensor, coef: Tensor,
                               out: Optional[Tensor], relu: bool, backend: str = "auto") -> None:
    """``acc += dx`` in place, rounded once into acc: dx is ``bn_act_bwd_apply``'s input
    gradient (no residual). One pass that reads acc and writes it back where acc has x's
    strides and the backend reads x as it is (a layer's prefix of a dense block's
    gradient buffer, x being the same prefix of the feature buffer); otherwise the pass
    runs on contiguous copies of x and acc, and acc takes the result."""
    if acc.shape != x.shape or acc.dtype != x.dtype or acc.device != x.device:
        raise ValueError(f"bn_act_bwd_apply_acc: acc must match x in shape, dtype and device; got "
                         f"{tuple(acc.shape)} {acc.dtype} on {acc.device} for x {tuple(x.shape)} {x.dtype} "
                         f"on {x.device}")
    for name, t in (("x", x), ("grad_out", grad_out), ("out", out)):
        if t is not None and _overlap(acc, t):
            raise ValueError(f"bn_act_bwd_apply_acc: acc must not share memory with {name}")
    fmt = memory_format_of(x)
    name = resolve(backend, x)
    if name == "eager":
        eager.bn_act_bwd_apply_acc(acc, grad_out, x, affine, coef, out, relu)
        return
    args = (_like_x(grad_out, fmt), x, _per_channel(affine), _per_channel(coef), _like_x(out, fmt), relu)
    if acc.stride() == x.stride() and reads_as_is(name, x):
        _backend_impl(name, "bn_act_bwd_apply_acc")(acc, *args)
        return
    xc = x.contiguous(memory_format=fmt)
    # acc itself when it already has xc's strides; else a copy with exactly them (a tensor
    # contiguous both ways, [N, C, 1, 1], can have either layout's strides)
    dense = acc if acc.stride() == xc.stride() else torch.empty_like(xc).copy_(acc)
    _backend_impl(name, "bn_act_bwd_apply_acc")(dense, args[0], xc, *args[2:])
    if dense is not acc:
        acc.copy_(dense)


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors' memory spans (first to last element) intersect in one storage."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> Tuple[int, int]:
        start = t.data_ptr()
        return start, start + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


bn_act_bwd_apply_acc_op = torch.library.custom_op("resfused::bn_act_bwd_apply_acc",
                                                  mutates_args=("acc",))(_bn_act_bwd_apply_acc_impl)


@bn_act_bwd_apply_acc_op.register_fake
def _(acc, grad_out, x, affine, coef, out, relu, backend="auto"):
    return None


def _bn_coef_impl(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                  count: int, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(affine, stats) of one BN from its per-channel mean and (biased) variance over
    ``count`` values per channel, in mean's dtype (the accumulation dtype); with running
    statistics (training), first updates them in place (``eager.bn_coef``: the variance
    that goes into running_var is unbiased, ``var * count / (count - 1)``). Running
    statistics of another dtype are updated through a copy in mean's dtype. (``count`` is
    an integer so that torch.compile keeps it symbolic: a float made from the batch size
    would be specialised, one recompilation per batch size.)"""
    unbias = count / max(count - 1, 1)
    name = resolve(backend, mean)
    acc = mean.dtype
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_coef: running_mean and running_var go together")
    args = [_per_channel(mean)] + [None if t is None else _per_channel(t if t.dtype == acc else t.to(acc))
                                   for t in (var, weight, bias)]
    impl = _backend_impl(name, "bn_coef")
    running = (running_mean, running_var)
    if running_mean is None or all(t.dtype == acc and t.is_contiguous() for t in running):
        return impl(*args, running_mean, running_var, momentum, eps, unbias)
    work = [t.to(acc, copy=True).contiguous() for t in running]
    affine, stats = impl(*args, *work, momentum, eps, unbias)
    for t, w in zip(running, work):
        t.copy_(w)
    return affine, stats


bn_coef_op = torch.library.custom_op("resfused::bn_coef",
                                     mutates_args=("running_mean", "running_var"))(_bn_coef_impl)


@bn_coef_op.register_fake
def _(mean, var, weight, bias, running_mean, running_var, momentum, eps, count, backend="auto"):
    c = mean.shape[0]
    return mean.new_empty((2, c)), mean.new_empty((2, c))


def pool_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Max pooling's output extent (dilation 1, floor)."""
    return (size + 2 * padding - kernel) // stride + 1


#: the cpu kernel numbers a window's elements in fp32 vectors: exact up to 2**24
_MAX_NATIVE_WINDOW = 1 << 24


def pool_shape(x_shape, kernel_size, stride, padding) -> Tuple[int, int, int, int]:
    """The output shape of ``bn_relu_maxpool`` (aten's max pooling, dilation 1, floor
    mode), after aten's own conditions on the window; a ValueError naming the argument
    otherwise."""
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)):
        if len(v) != 2:
            raise ValueError(f"bn_relu_maxpool: {name} must have two values, got {list(v)}")
    n, c, h, w = x_shape
    out = []
    for d, size in enumerate((h, w)):
        k, s, p = kernel_size[d], stride[d], padding[d]
        if k <= 0 or s <= 0 or p < 0 or p > k // 2:
            raise ValueError(f"bn_relu_maxpool: needs kernel_size > 0, stride > 0 and 0 <= padding <= "
                             f"kernel_size / 2, got kernel_size {list(kernel_size)}, stride {list(stride)}, "
                             f"padding {list(padding)}")
        o = pool_output_size(size, k, s, p)
        if o <= 0:
            raise ValueError(f"bn_relu_maxpool: the output would be empty: input {h}x{w}, kernel_size "
                             f"{list(kernel_size)}, stride {list(stride)}, padding {list(padding)}")
        out.append(o)
    return n, c, out[0], out[1]


def _bn_relu_maxpool_impl(x: Tensor, affine: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                          backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``max_pool2d_with_indices(relu(x*scale + shift), kernel_size, stride, padding)``
    (dilation 1, floor): (out, indices) in x's dtype and layout. The cpu backend does it in
    one pass over an NCHW x, writing no full-size activation; elsewhere the apply pass
    writes it and aten's pooling reads it (both give the same values and indices)."""
    pool_shape(x.shape, kernel_size, stride, padding)
    fmt = memory_format_of(x)
    name, xk = _kernel_x(x, fmt, backend)
    if name == "cpu" and fmt == torch.contiguous_format and xk.is_contiguous() and \
            kernel_size[0] * kernel_size[1] <= _MAX_NATIVE_WINDOW:
        return _native_op("bn_relu_maxpool")(xk, _per_channel(affine), list(kernel_size), list(stride),
                                             list(padding))
    a = _backend_impl(name, "bn_act_fwd")(xk, _per_channel(affine), None, None, True)
    return torch.ops.aten.max_pool2d_with_indices.default(a, list(kernel_size), list(stride), list(padding))


bn_relu_maxpool_op = torch.library.custom_op("resfused::bn_relu_maxpool", mutates_args=())(_bn_relu_maxpool_impl)


@bn_relu_maxpool_op.register_fake
def _(x, affine, kernel_size, stride, padding, backend="auto"):
    shape = pool_shape(x.shape, kernel_size, stride, padding)
    fmt = memory_format_of(x)
    return (x.new_empty(shape).contiguous(memory_format=fmt),
            x.new_empty(shape, dtype=torch.int64).contiguous(memory_format=fmt))


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _fast(op_def, impl: Callable) -> Callable:
    """The op as the autograd layer calls it: straight to the implementation in eager
    execution (no dispatcher round trip per call), through the registered custom op while
    torch.compile traces (where the fake kernel and the op's opacity matter)."""
    def call(*args):
        return op_def(*args) if _compiling() else impl(*args)
    call.__name__ = impl.__name__.strip("_").replace("_impl", "")
    call.__doc__ = impl.__doc__
    return call


bn_stats = _fast(bn_stats_op, _bn_stats_impl)
bn_act_fwd = _fast(bn_act_fwd_op, _bn_act_fwd_impl)
bn_act_bwd_reduce = _fast(bn_act_bwd_reduce_op, _bn_act_bwd_reduce_impl)
bn_act_bwd_apply = _fast(bn_act_bwd_apply_op, _bn_act_bwd_apply_impl)
bn_act_bwd_apply_acc = _fast(bn_act_bwd_apply_acc_op, _bn_act_bwd_apply_acc_impl)
bn_coef = _fast(bn_coef_op, _bn_coef_impl)
bn_relu_maxpool = _fast(bn_relu_maxpool_op, _bn_relu_maxpool_impl)

# The registered ops (torch.ops.resfused.*), by name.
BY_NAME: Dict[str, Callable] = {
    "bn_stats": bn_stats_op,
    "bn_act_fwd": bn_act_fwd_op,
    "bn_act_bwd_reduce": bn_act_bwd_reduce_op,
    "bn_act_bwd_apply": bn_act_bwd_apply_op,
    "bn_act_bwd_apply_acc": bn_act_bwd_apply_acc_op,
    "bn_coef": bn_coef_op,
    "bn_relu_maxpool": bn_relu_maxpool_op,
}
