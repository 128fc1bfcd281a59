"""``BatchNormAct2d``: ``nn.BatchNorm2d`` whose forward fuses ``+ residual`` and the activation."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import functional as RF
from ..distributed import resolve_group
from ..ops.bn_act import resolve as resolve_backend


class SyncBNMixin:
    """Synchronized batch statistics across processes (``nn.SyncBatchNorm`` semantics) over
    ``process_group`` (None: the default group), for the fused modules; set by their
    ``sync_bn``/``process_group`` arguments or ``resfused.convert(model, sync_bn=True)``."""

    sync_bn: bool = False
    process_group = None

    def _group(self, training: bool):
        """The resolved group when statistics are synchronized: batch statistics in
        training only (``training``: the BN normalises with batch statistics and is in
        training mode; as ``nn.SyncBatchNorm``, a BN without running statistics in eval
        normalises with its own rank's batch)."""
        return resolve_group(self.process_group) if (self.sync_bn and training) else None

    def _sync_group(self, bn: nn.Module):
        """The group one BN of the module synchronizes its batch statistics over (the
        caller asks only for a BN normalising with batch statistics in training): an
        ``nn.SyncBatchNorm`` inside it (``nn.SyncBatchNorm.convert_sync_batchnorm``) over
        its own group; any other BN as the module says."""
        if isinstance(bn, nn.SyncBatchNorm):
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()):
                return None  # local statistics, as nn.SyncBatchNorm itself computes outside a process group
            return resolve_group(bn.process_group)
        return self._group(True)


def _snapshot(bns: Sequence[nn.Module]) -> List[Tuple[Tensor, Tensor]]:
    names = ("running_mean", "running_var", "num_batches_tracked")
    return [(t, t.clone()) for bn in bns for t in (getattr(bn, n, None) for n in names) if t is not None]


def _restore_on_error(saved: List[Tuple[Tensor, Tensor]]):
    """Synchronized statistics can fail mid-call (a rank with another shape): put every
    BN's running statistics and batch count back (``saved``: taken before anything moved),
    so a call that raises changes nothing. Nothing saved: nothing to do (no context)."""
    return _restoring(saved) if saved else contextlib.nullcontext()


@contextlib.contextmanager
def _restoring(saved: List[Tuple[Tensor, Tensor]]):
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, old in saved:
                t.copy_(old)
        raise


def _exporting() -> bool:
    """Under torch.export or an ONNX export."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool((is_exporting is not None and is_exporting()) or torch.onnx.is_in_onnx_export())


if hasattr(torch.compiler, "assume_constant_result"):  # asked for real while torch.export traces strictly
    _exporting = torch.compiler.assume_constant_result(_exporting)


_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def _functorch_active() -> bool:
    """Inside a torch.func transform (grad, vjp, jacrev, vmap...), which the fused
    autograd Functions do not support (they save what backward needs in forward).
    torch.compile folds the query to a constant while tracing, inside a transform or not."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


def plain_relu(m: nn.Module) -> bool:
    """An ``nn.ReLU`` whose forward is ReLU's own (what a fused module applies in its
    place; a subclass computing something else keeps the module on its own forward)."""
    return isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward


def runs_unfused(module: nn.Module, x) -> bool:
    """Whether a fused module must run torchvision's own forward, calling its submodules
    one by one, for this call: under FX symbolic tracing (``x`` a Proxy:
    ``create_feature_extractor``, ``symbolic_trace``) and ``torch.jit.trace``, which record
    the submodules' ops; under torch.export and ONNX export (a portable program of
    standard ops, which autograd can also differentiate: ``fold`` gives the folded
    deployment graph); inside torch.func transforms and forward-mode AD
    (``torch.autograd.forward_ad.dual_level``); on the meta device (shape
    inference); and whenever a hook would otherwise not fire — one registered on any
    submodule (forward, pre-forward or backward: feature taps, ``torch.nn.utils.prune``'s
    mask, applied by a pre-forward hook on the conv) or a global module hook — or a
    submodule's forward was replaced on its instance. The fused path reads the
    submodules' parameters directly and calls none of them."""
    xs = x if isinstance(x, (list, tuple)) else (x,)
    if traced_or_transformed(xs):
        return True
    if any(isinstance(t, Tensor) and t.device.type == "meta" for t in xs):
        # (a module elsewhere gets the fused path's clear device-mismatch error)
        return all(p.device.type == "meta" for p in module.parameters())
    if getattr(module, "sync_bn", False) and module.training:
        # torchvision's forward would normalise its plain BNs with local statistics: the
        # fused path keeps them synchronized (hooks on inner modules then do not fire; a
        # forward replaced on an inner module's instance cannot be honoured: an error)
        patched = _patched_below(module)
        if patched:
            raise RuntimeError(f"{type(module).__name__}: the forward of its submodule {patched!r} was replaced on "
                               "the instance, which a block synchronizing its batch statistics (sync_bn=True) "
                               "cannot call; restore that submodule's forward, or convert the model without "
                               "sync_bn")
        return False
    if global_hooks() and next(module.children(), None) is not None:
        return True
    return _hooked_below(module)


def traced_or_transformed(xs) -> bool:
    """The call conditions under which a fused module runs torchvision's own forward
    whatever its submodules (see ``runs_unfused``): FX symbolic tracing (a Proxy among
    ``xs``), ``torch.jit.trace``, a torch.func transform, forward-mode AD, torch.export or
    an ONNX export."""
    if torch.jit.is_tracing() or any(isinstance(t, torch.fx.Proxy) for t in xs) or _functorch_active():
        return True
    if torch.autograd.forward_ad._current_level >= 0:  # forward-mode AD (dual tensors): torchvision's ops have a jvp
        return True
    return _exporting()


def global_hooks() -> bool:
    """Whether a global module hook is registered (it would fire for each submodule call)."""
    glob = nn.modules.module
    return any(getattr(glob, d, None) for d in _GLOBAL_HOOK_DICTS)


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` has a hook of its own (forward, pre-forward, backward) or a forward
    replaced on its instance (``m.forward = ...``, as accelerate's ``add_hook_to_module``
    does): a fused path reading its parameters instead of calling it would skip them."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or "forward" in m.__dict__)


def _hooked_below(module: nn.Module) -> bool:
    """Whether any module below ``module`` is ``hooked`` (its own hooks do not count)."""
    for m in module._modules.values():
        if m is not None and (hooked(m) or _hooked_below(m)):
            return True
    return False


def _patched_below(module: nn.Module, prefix: str = "") -> str:
    """The name of a submodule below ``module`` whose forward was replaced on the
    instance ("" when none)."""
    for name, m in module._modules.items():
        if m is None:
            continue
        if "forward" in m.__dict__:
            return prefix + name
        found = _patched_below(m, f"{prefix}{name}.")
        if found:
            return found
    return ""


class BatchNormAct2d(SyncBNMixin, nn.BatchNorm2d):
    """A drop-in ``nn.BatchNorm2d`` (same arguments, buffers and state_dict) computing
    ``act(bn(x) + residual)`` in one fused pass.

    ``activation`` is ``"relu"`` (default) or ``"identity"``. ``momentum=None``
    gives the cumulative moving average through ``num_batches_tracked``;
    ``affine=False`` and ``track_running_stats=False`` behave as in ``nn.BatchNorm2d``.
    Synchronized batch statistics: ``sync_bn=True`` (or ``resfused.convert(model,
    sync_bn=True)``), not ``nn.SyncBatchNorm.convert_sync_batchnorm``, which replaces any
    BatchNorm subclass by a plain ``nn.SyncBatchNorm`` (activation and residual dropped).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 activation: str = "relu", sync_bn: bool = False, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        RF._check_activation(activation)
        self.activation = activation
        # sync_bn: batch statistics synchronized over process_group (None: the default
        # group) in training, as nn.SyncBatchNorm (which DistributedDataParallel only
        # accepts on GPUs; this one runs on any device)
        self.sync_bn, self.process_group = sync_bn, process_group

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if runs_unfused(self, x):  # traced: nn.BatchNorm2d's own forward, then the add and activation
            if isinstance(x, torch.fx.Proxy):  # (FX: no shape check, no counter moved while tracing)
                rm, rv, w, b, bn_training = batch_norm_args(self)
                out = torch.nn.functional.batch_norm(x, rm, rv, w, b, bn_training, self.momentum or 0.0, self.eps)
            else:
                out = super().forward(x)
            out = out if residual is None else out + residual
            return torch.relu(out) if self.activation == "relu" else out
        # Validate everything before num_batches_tracked moves: a call that raises changes nothing.
        relu = RF._check_activation(self.activation)
        running_mean, running_var, weight, bias, bn_training, group = checked_bn_args(
            self, x, lambda bn_training: self._group(bn_training and self.training))
        if residual is not None:
            RF.check_residual(x, residual)
        backend = resolve_backend("auto", x)  # a forced backend that cannot run raises here, before the count
        saved = _snapshot([self]) if group is not None else []
        momentum = advance_batch_norm(self)
        with _restore_on_error(saved):
            return RF.apply_checked(x, running_mean, running_var, weight, bias, bn_training, momentum, self.eps,
                                    residual, relu, backend, group)


def module_attr(m: nn.Module, name: str):
    """``m.<name>``, a parameter, buffer or submodule read straight from the module's own
    table: ``nn.Module.__getattr__`` (Python, reached only after the normal lookup fails)
    is most of a microsecond per read, and a fused block reads dozens per call. Anything
    else (a parametrization's property, a plain attribute) through getattr as usual."""
    for table in (m._parameters, m._buffers, m._modules):
        if name in table:
            return table[name]
    return getattr(m, name)


def checked_bn_args(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, group_of=None):
    """The checks of one fused call of ``bn`` on ``x`` before anything moves (input
    dimensions and channels, momentum, eps, the input against the statistics): a call
    that raises changes nothing. ``group_of(use_batch_stats)``: the process group the
    batch statistics are synchronized over, or None (the default: not synchronized).
    Returns ``batch_norm_args(bn)`` and that group."""
    bn._check_input_dim(x)
    if x.shape[1] != bn.num_features:
        raise ValueError(f"{type(bn).__name__}({bn.num_features}) expected input with {bn.num_features} "
                         f"channels, got input of shape {tuple(x.shape)}")
    running_mean, running_var, weight, bias, bn_training = batch_norm_args(bn)
    if bn.momentum is not None:
        RF._check_number("momentum", bn.momentum)
    RF.check_eps("eps", bn.eps, bn_training)
    group = group_of(bn_training) if group_of is not None else None
    RF.check_bn_input(x, running_mean, running_var, weight, bias, bn_training, synced=group is not None)
    return running_mean, running_var, weight, bias, bn_training, group


def batch_norm_args(bn: nn.modules.batchnorm._BatchNorm):
    """``(running_mean, running_var, weight, bias, use_batch_stats)`` as ``nn.BatchNorm2d.forward``
    passes them to ``F.batch_norm``."""
    running_mean, running_var = module_attr(bn, "running_mean"), module_attr(bn, "running_var")
    training = bn.training
    bn_training = training or (running_mean is None and running_var is None)
    if training and not bn.track_running_stats:
        running_mean = running_var = None
    return running_mean, running_var, module_attr(bn, "weight"), module_attr(bn, "bias"), bn_training


def advance_batch_norms(bns: Sequence[nn.Module]) -> List[float]:
    """``advance_batch_norm`` of each of ``bns`` (0.0 for a module that is no
    ``nn.BatchNorm2d``/``nn.SyncBatchNorm``: a frozen BN counts no batches), with every
    counter moved by one ``torch._foreach_add_`` (one launch on a GPU, where one per BN
    ran; a BN module standing twice counts two batches, each use with its own cumulative
    momentum, as two calls of it would). Call only after every check has passed."""
    uses = {}  # id(counter) -> [counter, how many of bns count on it]
    cumulative = []  # (index in momenta, its counter's uses entry, which use this is)
    momenta = []
    for bn in bns:
        momentum = 0.0
        if isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            count = module_attr(bn, "num_batches_tracked") if bn.training and bn.track_running_stats else None
            if count is not None:
                entry = uses.setdefault(id(count), [count, 0])
                entry[1] += 1
                if bn.momentum is None:
                    cumulative.append((len(momenta), entry, entry[1]))
            momentum = 0.0 if bn.momentum is None else bn.momentum
        momenta.append(momentum)
    counters, steps = [c for c, _ in uses.values()], [k for _, k in uses.values()]
    if len(counters) == 1:
        counters[0].add_(steps[0])
    elif counters:
        torch._foreach_add_(counters, steps)
    # momentum=None: the cumulative average, 1 / num_batches_tracked as it stood after
    # this use's own increment (read after the adds)
    for i, (count, total), use in cumulative:
        momenta[i] = 1.0 / (float(count) - (total - use))
    return momenta


def advance_batch_norm(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count the batch (``num_batches_tracked``) as ``nn.BatchNorm2d`` does and return the
    momentum for this call (``1/num_batches_tracked`` when ``bn.momentum`` is None).
    Call only after every check has passed."""
    return advance_batch_norms([bn])[0]
