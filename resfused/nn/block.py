"""Drop-in fused ResNet blocks: ``FusedBasicBlock`` and ``FusedBottleneck``.

Subclasses of torchvision's ``BasicBlock``/``Bottleneck`` with the same constructor,
attribute names, state_dict keys and ``expansion``; their forward runs the whole block as
one autograd node (``resfused.autograd.ResidualBlockFunction``). A block whose layers
are not the standard kinds (a norm layer other than BatchNorm2d/FrozenBatchNorm2d, a
conv with non-zero padding mode, a custom activation) runs torchvision's own forward.
"""
from __future__ import annotations

import contextlib
import functools

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .. import conv_select
from .._backend import unavailable_reason
from ..autograd.block import (TENSORS_PER_UNIT, BlockSpec, BNSpec, ConvSpec, ResidualBlockFunction,
                              check_join_shapes)
from ..functional import bn_dtype_allowed, check_eps, check_not_inference
from ..ops import bn_act as ops
from ..ops.bn_act import _compiling, _trace_time_constant
from .bn_act import (SyncBNMixin, _restore_on_error, _snapshot, advance_batch_norms, batch_norm_args,
                     module_attr, plain_relu, runs_unfused)

try:  # torchvision's frozen BN (detection backbones): an eval-only affine BN with buffers
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover - very old torchvision
    FrozenBatchNorm2d = ()


def _conv_spec(conv: nn.Module) -> Optional[ConvSpec]:
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return ConvSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _bn_supported(bn: nn.Module) -> bool:
    """A BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d whose forward is that class's
    own (a subclass computing something else, such as resfused's ``BatchNormAct2d`` with
    its activation, is not the plain BN the fused block would apply)."""
    for kind in _BN_KINDS:
        if isinstance(bn, kind):
            return type(bn).forward is kind.forward
    return False


#: the BN kinds a fused block applies itself (the first one a module is an instance of counts)
_BN_KINDS = (nn.SyncBatchNorm, nn.BatchNorm2d) + ((FrozenBatchNorm2d,) if FrozenBatchNorm2d != () else ())


def _bn_args(bn: nn.Module):
    """(running_mean, running_var, weight, bias, use_batch_stats) for either BN kind."""
    if isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return batch_norm_args(bn)
    return (module_attr(bn, "running_mean"), module_attr(bn, "running_var"), module_attr(bn, "weight"),
            module_attr(bn, "bias"), False)


def check_module_input(name: str, x: Tensor, expected_c: int, weight: Tensor, batch_stats: bool = False) -> None:
    """A fused module's input checks, raised before anything runs or is updated: a 4-D
    tensor with ``expected_c`` channels on ``weight``'s device and dtype (any dtype under
    autocast), and, when ``batch_stats``, more than one value per channel."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected 4-D input [N, {expected_c}, H, W], got {x.dim()}-D input of shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != expected_c:
        raise ValueError(f"{name}: expected input of shape [N, {expected_c}, H, W], got {tuple(x.shape)}")
    if x.device != weight.device:
        raise RuntimeError(f"{name}: input is on {x.device} but the weights are on {weight.device}")
    check_not_inference(name, x, weight)
    if _autocast_dtype(x) is None and x.dtype != weight.dtype:
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the weights' dtype {weight.dtype}")
    if batch_stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"{name}: expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")


def check_units(name: str, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                bns: Sequence[nn.Module], bn_args: Sequence[Sequence], bn_channels: Sequence[int],
                cast: Optional[torch.dtype], labels: Callable[[int], Tuple[str, str]]) -> None:
    """A fused module's convolutions and BNs, checked before anything runs or is updated
    (where the library call or a kernel would fail after batch counters moved):
    * every conv weight and bias on x's device and in x's dtype (any dtype under
      autocast), a bias with one value per output channel;
    * every BN tensor (``bn_args[i][:4]``) on x's device, with ``bn_channels[i]`` values,
      in the dtype the convs run in (``cast`` or x's), or float32 when that is
      float16/bfloat16 (``F.batch_norm``'s rule);
    * every BN's eps as ``F.batch_norm`` takes it: positive where it normalises with batch
      statistics (``bn_args[i][4]``), non-negative otherwise.
    ``labels(i)``: (conv name, BN name) of unit i in the module, for the errors (worked
    out only when one is raised: this runs on every call)."""
    run = cast or x.dtype
    dev, xdt = x.device, x.dtype
    # (the common case in one expression per tensor; the messages only where one fails)
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.device != dev or (cast is None and w.dtype != xdt) or (
                b is not None and (b.device != dev or (cast is None and b.dtype != xdt) or b.shape != (w.shape[0],))):
            _conv_error(name, labels(i)[0], w, b, dev, xdt, cast)
    for i, (bn, args, c) in enumerate(zip(bns, bn_args, bn_channels)):
        for t in args[:4]:
            if t is not None and (t.device != dev or t.shape != (c,) or not bn_dtype_allowed(t.dtype, run)):
                _bn_tensor_error(name, labels(i)[1], t, dev, c, run)
        eps = bn.eps
        if not (type(eps) is float and (eps > 0 or (eps == 0 and not args[4]))):
            check_eps(f"{name}: {labels(i)[1]}.eps", eps, args[4])


def _conv_error(name: str, label: str, w: Tensor, b: Optional[Tensor], dev: torch.device, xdt: torch.dtype,
                cast: Optional[torch.dtype]) -> None:
    """Raises check_units' error for a conv whose weight or bias does not fit."""
    for what, t in (("weight", w), ("bias", b)):
        if t is None:
            continue
        if t.device != dev:
            raise RuntimeError(f"{name}: input is on {dev} but {label}'s {what} is on {t.device}")
        if cast is None and t.dtype != xdt:
            raise TypeError(f"{name}: input dtype {xdt} does not match {label}'s {what} dtype {t.dtype}")
    raise ValueError(f"{name}: {label}'s bias must have one value per output channel ({w.shape[0]}), got shape "
                     f"{tuple(b.shape)}")


def _bn_tensor_error(name: str, label: str, t: Tensor, dev: torch.device, c: int, run: torch.dtype) -> None:
    """Raises check_units' error for a BN tensor that does not fit."""
    if t.device != dev:
        raise RuntimeError(f"{name}: input is on {dev} but {label}'s tensors are on {t.device}")
    if t.shape != (c,):
        raise ValueError(f"{name}: {label}'s weight, bias and running statistics must have one value per channel "
                         f"({c}), got shape {tuple(t.shape)}")
    raise TypeError(f"{name}: {label}'s tensors are {t.dtype} but the block runs in {run} (a BN takes the input's "
                    f"dtype, or float32 for a float16/bfloat16 input)")


class _FusedBlockMixin(SyncBNMixin):
    """The fused forward shared by both block kinds (torchvision's constructor plus
    ``memory_efficient``, ``sync_bn`` and ``process_group``). Subclasses list their units."""

    memory_efficient: bool = True

    def __init__(self, *args, memory_efficient: bool = True, sync_bn: bool = False, process_group=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_efficient = memory_efficient
        self.sync_bn, self.process_group = sync_bn, process_group

    def _units(self) -> List[Tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def _block_name(self, units: Optional[List[Tuple[nn.Module, nn.Module]]] = None) -> str:
        last_conv = (units or self._units())[-1][0]
        return (f"{type(self).__name__}(in_channels={module_attr(self, 'conv1').in_channels}, "
                f"out_channels={last_conv.out_channels}, stride={self.stride})")

    def _fusable(self, units: Optional[List[Tuple[nn.Module, nn.Module]]] = None) -> bool:
        if not plain_relu(module_attr(self, "relu")):
            return False
        for conv, bn in units or self._units():
            if _conv_spec(conv) is None or not _bn_supported(bn):
                return False
        ds = module_attr(self, "downsample")  # fused (a conv-BN Sequential) or run as it is
        return ds is None or isinstance(ds, nn.Module)

    def _fused_downsample(self) -> Optional[Tuple[nn.Module, nn.Module]]:
        ds = module_attr(self, "downsample")
        if isinstance(ds, nn.Sequential) and len(ds) == 2:
            conv, bn = ds._modules.values()
            if _conv_spec(conv) is not None and _bn_supported(bn):
                return conv, bn
        return None

    def forward(self, x: Tensor) -> Tensor:
        units = self._units()
        if not self._fusable(units) or runs_unfused(self, x):
            return super().forward(x)  # type: ignore[misc]
        fused_ds = self._fused_downsample()
        n = len(units)
        convs = [conv for conv, _ in units]
        bns = [bn for _, bn in units]
        if fused_ds is not None:
            convs.append(fused_ds[0])
            bns.append(fused_ds[1])
        name = self._block_name(units)
        weights = [module_attr(c, "weight") for c in convs]
        check_module_input(name, x, convs[0].in_channels, weights[0])
        conv_specs = [_conv_spec(c) for c in convs]
        args = [_bn_args(bn) for bn in bns]
        cast = _autocast_dtype(x)
        biases = [module_attr(c, "bias") for c in convs]
        check_units(name, x, weights, biases, bns, args, [w.shape[0] for w in weights], cast,
                    lambda i: ((f"conv{i + 1}", f"bn{i + 1}") if i < n else ("downsample.0", "downsample.1")))
        why = check_conv_path(name, x, convs, cast or x.dtype)
        backend = ops.resolve("auto", x if cast is None else x.new_empty(0, dtype=cast))  # a forced one that cannot run
        groups = [self._sync_group(bn) if a[4] and bn.training else None for a, bn in zip(args, bns)]
        shapes = [(w.shape, cs) for w, cs in zip(weights, conv_specs)]
        # A custom downsample module runs eagerly (its output is the plain identity), before
        # the join's shape check: its BNs are put back if that check fails.
        identity = None
        downsample = module_attr(self, "downsample")
        if downsample is not None and fused_ds is None:
            ds_saved = _snapshot([m for m in downsample.modules() if isinstance(m, nn.BatchNorm2d)])
            identity = downsample(x)
        else:
            ds_saved = []
        with _restore_on_error(ds_saved):
            # (a synchronized BN checks the merged count of values per channel, once gathered)
            check_join_shapes(name, tuple(x.shape), shapes[:n], identity.shape if identity is not None else None,
                              shapes[n] if fused_ds else None, [a[4] and g is None for a, g in zip(args, groups)])
        saved = _snapshot(bns) if any(g is not None for g in groups) else []
        momenta = advance_batch_norms(bns)
        bn_specs = [BNSpec(a[4], m, bn.eps, grp) for a, m, bn, grp in zip(args, momenta, bns, groups)]
        # (shapes checked above: the autograd layer does not check them again)
        spec = BlockSpec(tuple(conv_specs[:n]), tuple(bn_specs[:n]),
                         (conv_specs[n], bn_specs[n]) if fused_ds else None, self.memory_efficient, backend,
                         checked=True)
        tensors: List[Optional[Tensor]] = []
        for cw, cb, (rm, rv, w, b, _) in zip(weights, biases, args):
            if cast is not None:
                cw = cw.to(cast)
                cb = None if cb is None else cb.to(cast)
            tensors += [cw, cb, w, b, rm, rv]
        if cast is not None:
            x = x.to(cast)
            identity = None if identity is None else identity.to(cast)
        with _no_autocast(x, cast), _restore_on_error(saved):
            spec = spec._replace(tf32=conv_tf32(x.dtype))
            key = lambda any_size=False: conv_key("block", x, convs, any_size=any_size,  # noqa: E731
                                                  train=[b.training for b in bn_specs],
                                                  grad=torch.is_grad_enabled(), tf32=spec.tf32)
            # no timing under synchronized BN (ranks could choose apart): the cache decides there
            path = select_conv(name, why, x, key, lambda: _tuning_runs(spec, x, identity, tensors),
                               may_time=all(g is None for g in groups))
            return ResidualBlockFunction.apply(spec._replace(conv=path), x, identity, *tensors)


#: dtypes the Triton convolutions take
TRITON_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_forced_conv = _trace_time_constant(conv_select.forced_conv)
_cached_conv = _trace_time_constant(lambda device, key: conv_select.cached(f"{conv_select.versions_key(device)}|{key}"))
_cached_conv_any_size = _trace_time_constant(
    lambda device, key: conv_select.cached_any_size(f"{conv_select.versions_key(device)}|{key}"))
_triton_unavailable = _trace_time_constant(unavailable_reason)


def triton_conv_reason(x: Tensor, groups: Sequence[int], biased: bool = False,
                       dtype: Optional[torch.dtype] = None) -> str:
    """Why convolutions with these ``groups`` (and a bias, when ``biased``) on x (run in
    ``dtype``, x's by default) cannot run as the Triton convolutions ("" when they can)."""
    why = _triton_unavailable("triton", x.device)
    if why:
        return why
    dtype = x.dtype if dtype is None else dtype
    if dtype not in TRITON_CONV_DTYPES:
        return f"they take float16, bfloat16 or float32 inputs, got {dtype}"
    if x.dim() == 4 and x.shape[1] > 1 and x.stride(1) != 1:  # (at 1x1 spatial size NCHW is channels_last)
        return "they take channels_last inputs (x.to(memory_format=torch.channels_last))"
    if any(g != 1 for g in groups):
        return "grouped convolutions (groups > 1) run in the library"
    if biased:
        return "a convolution with a bias runs in the library"
    return ""


#: check_conv_path's reason where the library convolutions run without weighing Triton
NOT_WEIGHED = "the library convolutions run here (Triton is weighed on CUDA devices, or forced by use_conv)"


def check_conv_path(name: str, x: Tensor, convs: Sequence[nn.Conv2d], dtype: torch.dtype) -> str:
    """Why the Triton convolutions cannot run ``convs`` on x in ``dtype`` ("" when they
    can); raises at once when ``use_conv("triton")`` is forced and they cannot, so a
    module calls it before any running statistic moves. Where ``select_conv`` takes the
    library whatever the reason (not forced, and not on a device where it weighs Triton),
    the reason is not worked out: ``NOT_WEIGHED``."""
    forced = _forced_conv()
    if forced == "library" or (forced != "triton" and not _weighs_triton(x.device)):
        return NOT_WEIGHED
    why = triton_conv_reason(x, [c.groups for c in convs], any(module_attr(c, "bias") is not None for c in convs),
                             dtype=dtype)
    if why and forced == "triton":
        raise RuntimeError(_forced_message(name, why))
    return why


def conv_tf32(dtype: torch.dtype) -> bool:
    """Whether the fused conv ops may multiply in TF32: fp32 operands and the flag the
    library convolutions obey (``torch.backends.cudnn.allow_tf32``)."""
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def conv_key(kind: str, x: Tensor, convs: Sequence[nn.Conv2d], dtype: Optional[torch.dtype] = None,
             any_size: bool = False, **flags) -> str:
    """The conv-choice cache key of a module call (without the device and versions, which
    ``select_conv`` adds): kind, the dtype the convs run in (x's by default), x's shape
    (``x*`` with ``any_size``), the convs' weights and geometry, then ``flags``."""
    geometry = tuple((tuple(c.stride), tuple(c.padding), tuple(c.dilation)) for c in convs)
    weights = tuple(tuple(module_attr(c, "weight").shape) for c in convs)
    flag_items = tuple((k, tuple(v), True) if isinstance(v, list) else (k, v, False) for k, v in flags.items())
    fmt = _format_conv_key.__wrapped__ if _compiling() else _format_conv_key
    return fmt(kind, x.dtype if dtype is None else dtype, None if any_size else tuple(x.shape), weights, geometry,
               flag_items)


@functools.lru_cache(maxsize=4096)
def _format_conv_key(kind: str, dtype: torch.dtype, size: Optional[Tuple[int, ...]], weights, geometry,
                     flag_items) -> str:
    """``conv_key``'s string, formatted once per distinct key (every auto-mode call on CUDA
    asks for it); list-valued flags print as lists."""
    dt = str(dtype).replace("torch.", "")
    flags = "".join(f"|{k}{list(v) if is_list else v}" for k, v, is_list in flag_items)
    return (f"{kind}|{dt}|{'x*' if size is None else f'x{size}'}|w{list(weights)}|conv{list(geometry)}" + flags)


def _weighs_triton(device: torch.device) -> bool:
    """Devices on which "auto" weighs the Triton convolutions against the library's: CUDA
    (elsewhere Triton runs only through its interpreter, far too slow to win)."""
    return device.type == "cuda"


def _forced_message(name: str, why: str) -> str:
    return f"{name}: use_conv('triton') was forced but the Triton convolutions cannot run it: {why}"


def select_conv(name: str, why: str, x: Tensor, key: Callable[..., str], runs, may_time: bool = True) -> str:
    """"library" or "triton" for one call (``resfused.use_conv``): forced, or on CUDA the
    cached / timed faster of ``runs`` (zero-argument callables per path) for ``key()``
    (``conv_key``'s arguments bound). Under torch.compile, whose input sizes may be
    symbolic (a dynamic batch size), the cache's choice for the block when every input
    size seen agrees (``key(any_size=True)``), else the library's."""
    forced = _forced_conv()
    if forced == "library":
        return "library"
    if forced == "triton":
        if why:
            raise RuntimeError(_forced_message(name, why))
        return "triton"
    if why or not _weighs_triton(x.device):
        return "library"
    if _compiling():
        return _cached_conv_any_size(x.device, key(any_size=True)) or "library"
    if not may_time:
        return _cached_conv(x.device, key()) or "library"
    return conv_select.choose(f"{conv_select.versions_key(x.device)}|{key()}", x.device, runs())


def timing_runs(x: Tensor, tensors: Sequence[Optional[Tensor]], is_stat: Callable[[int], bool], grad: bool,
                run_path: Callable[[str, Tensor, List[Optional[Tensor]]], Tensor]):
    """{path: one call} for ``select_conv``: each runs ``run_path(path, x, tensors)`` once,
    forward (+ backward of a ones gradient when ``grad``), on detached copies of x and the
    tensors and clones of the running statistics (``is_stat(index)``), so nothing of the
    model changes."""
    def make(path: str):
        def run():
            ts = [None if t is None else (t.detach().clone() if is_stat(j)
                                          else t.detach().requires_grad_(t.requires_grad and grad))
                  for j, t in enumerate(tensors)]
            with torch.set_grad_enabled(grad):
                out = run_path(path, x.detach().requires_grad_(x.requires_grad and grad), ts)
                if out.requires_grad:
                    out.backward(torch.ones_like(out))
        return run

    return {"library": make("library"), "triton": make("triton")}


def _tuning_runs(spec: BlockSpec, x: Tensor, identity: Optional[Tensor], tensors: List[Optional[Tensor]]):
    idt = None if identity is None else identity.detach()
    return timing_runs(x, tensors, lambda j: j % TENSORS_PER_UNIT in (4, 5), torch.is_grad_enabled(),
                       lambda path, xi, ts: ResidualBlockFunction.apply(spec._replace(conv=path), xi, idt, *ts))


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
        return True
    except TypeError:
        return False


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run these convs in, or None when autocast is off."""
    dev = x.device.type
    if dev == "meta":  # no autocast state of its own
        return None
    if _autocast_takes_device():
        if not torch.is_autocast_enabled(dev):
            return None
        return torch.get_autocast_dtype(dev)
    if dev == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    if dev == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    return None


def _no_autocast(x: Tensor, cast: Optional[torch.dtype]):
    """Autocast off for x's device inside the fused call (``cast``: the dtype it was running
    in, None when it was off already: then there is nothing to turn off)."""
    return torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext()


def _units_of(block: nn.Module, n: int) -> List[Tuple[nn.Module, nn.Module]]:
    """``[(conv1, bn1), ..., (conv<n>, bn<n>)]`` of a block (None where one is missing)."""
    mods = block._modules
    return [(mods.get(c), mods.get(b)) for c, b in _UNIT_NAMES[:n]]


_UNIT_NAMES = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


class FusedBasicBlock(_FusedBlockMixin, BasicBlock):
    """torchvision ``BasicBlock`` (same constructor and state_dict), fused."""

    def _units(self):
        return _units_of(self, 2)


class FusedBottleneck(_FusedBlockMixin, Bottleneck):
    """torchvision ``Bottleneck`` (same constructor and state_dict), fused."""

    def _units(self):
        return _units_of(self, 3)
