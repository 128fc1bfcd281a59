"""``convert(model)`` / ``revert(model)``: swap torchvision ResNet blocks and DenseNet dense
layers/blocks/transitions for the fused ones (and back) in place; ``fold(model)``: a
deployment copy with eval BN folded into the convolutions (ResNet blocks).

The fused blocks are subclasses of torchvision's with no extra parameters or buffers, so
a swap changes only the class of each block object: parameters, buffers, hooks, device,
dtype and train/eval mode stay exactly as they were, and state_dicts are bit-identical.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn
from torchvision.models.densenet import DenseNet, _DenseBlock, _DenseLayer, _Transition
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .nn.bn_act import BatchNormAct2d, _exporting
from .nn.block import (FusedBasicBlock, FusedBottleneck, _autocast_dtype, _bn_args, _bn_supported, _no_autocast,
                       conv_key, conv_tf32, select_conv, triton_conv_reason)
from .nn.dense import FusedDenseBlock, FusedDenseLayer, FusedTransition
from .nn.stem import FusedDenseNet, FusedResNet
from .ops import bn_act as ops
from .ops import conv as conv_ops

_FUSED: Dict[Type[nn.Module], Type[nn.Module]] = {Bottleneck: FusedBottleneck, BasicBlock: FusedBasicBlock}
_PLAIN: Dict[Type[nn.Module], Type[nn.Module]] = {v: k for k, v in _FUSED.items()}
# DenseNet modules: swapped by class too, but their ``memory_efficient`` is torchvision's own
# attribute (checkpointing in torchvision's forward), so convert/revert leave it alone.
_DENSE_FUSED: Dict[Type[nn.Module], Type[nn.Module]] = {_DenseLayer: FusedDenseLayer, _DenseBlock: FusedDenseBlock,
                                                        _Transition: FusedTransition}
_DENSE_PLAIN: Dict[Type[nn.Module], Type[nn.Module]] = {v: k for k, v in _DENSE_FUSED.items()}
# Whole models: the fused stem (bn1/norm0, relu, max pooling as one node)
_MODEL_FUSED: Dict[Type[nn.Module], Type[nn.Module]] = {ResNet: FusedResNet, DenseNet: FusedDenseNet}
_MODEL_PLAIN: Dict[Type[nn.Module], Type[nn.Module]] = {v: k for k, v in _MODEL_FUSED.items()}


def convert(model: nn.Module, memory_efficient: bool = True, sync_bn: bool = False,
            process_group=None) -> nn.Module:
    """Swap every torchvision ``Bottleneck``/``BasicBlock`` in ``model`` (the model itself
    included) for ``FusedBottleneck``/``FusedBasicBlock``, and every DenseNet ``_DenseLayer``/
    ``_DenseBlock``/``_Transition`` for ``FusedDenseLayer``/``FusedDenseBlock``/
    ``FusedTransition``, in place, and a torchvision ``ResNet`` (``DenseNet``) itself becomes a
    ``FusedResNet`` (``FusedDenseNet``): its stem's BN, ReLU and max pooling as one node. Returns ``model``.
    ``memory_efficient`` applies to the ResNet blocks; dense blocks always share storage
    and recompute.

    ``sync_bn=True``: the fused blocks synchronize their batch statistics across processes
    over ``process_group`` (None: the default group), as ``nn.SyncBatchNorm``; the model's
    other BatchNorm2d (the stem's, DenseNet's final norm) become synchronized
    ``BatchNormAct2d(activation="identity")`` modules, which run on CPU under DDP too."""
    if sync_bn:
        from .distributed import resolve_group

        if process_group is not None:
            resolve_group(process_group)  # a clear error for a wrong kind of group, before any change
    for module in model.modules():
        fused = _FUSED.get(type(module))
        dense = _DENSE_FUSED.get(type(module))
        if type(module) in _MODEL_FUSED:
            module.__class__ = _MODEL_FUSED[type(module)]
        elif dense is not None:
            module.__class__ = dense
        elif fused is not None:
            module.__class__ = fused
            module.memory_efficient = memory_efficient
        elif type(module) in _PLAIN:
            module.memory_efficient = memory_efficient
        if type(module) in _PLAIN or type(module) in _DENSE_PLAIN:
            module.sync_bn, module.process_group = sync_bn, process_group
    if sync_bn:
        _sync_other_batch_norms(model, process_group)
    return model


def _sync_other_batch_norms(module: nn.Module, process_group) -> None:
    """Every BatchNorm2d outside the fused blocks (which synchronize their own) becomes a
    synchronized ``BatchNormAct2d(activation="identity")``, in place (same parameters,
    buffers and state_dict; unlike nn.SyncBatchNorm it runs on CPU under DDP too); a
    ``BatchNormAct2d`` not yet synchronized is synchronized, keeping its activation."""
    for child in module.children():
        if type(child) in _PLAIN or type(child) in _DENSE_PLAIN:
            continue
        if type(child) is nn.BatchNorm2d:
            child.__class__ = BatchNormAct2d
            child.activation, child.sync_bn, child.process_group = "identity", True, process_group
            child._resfused_sync_of_bn = True
        elif isinstance(child, BatchNormAct2d):
            if not child.sync_bn:
                child.sync_bn, child.process_group = True, process_group
                child._resfused_synced = True
        else:
            _sync_other_batch_norms(child, process_group)


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert``: fused blocks (and a ``FusedResNet``/``FusedDenseNet``) become torchvision's again, in
    place. Returns ``model``."""
    for module in model.modules():
        if type(module) is BatchNormAct2d and module.__dict__.pop("_resfused_sync_of_bn", False):
            module.__class__ = nn.BatchNorm2d  # a BatchNorm2d that convert(sync_bn=True) synchronized
            for attr in ("activation", "sync_bn", "process_group"):
                module.__dict__.pop(attr, None)
            continue
        if isinstance(module, BatchNormAct2d) and module.__dict__.pop("_resfused_synced", False):
            module.sync_bn, module.process_group = False, None  # a BatchNormAct2d it synchronized
            continue
        if type(module) in _MODEL_PLAIN:
            module.__class__ = _MODEL_PLAIN[type(module)]
            continue
        dense = _DENSE_PLAIN.get(type(module))
        if dense is not None:
            module.__class__ = dense
            for attr in ("sync_bn", "process_group"):
                module.__dict__.pop(attr, None)
            continue
        plain = _PLAIN.get(type(module))
        if plain is not None:
            module.__class__ = plain
            for attr in ("memory_efficient", "sync_bn", "process_group"):
                module.__dict__.pop(attr, None)
    return model


# ----------------------------------------------------------------------------- folding
def _fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(conv(x))`` in eval mode as a single conv."""
    rm, rv, w, b, _ = _bn_args(bn)
    if rm is None:
        raise ValueError("fold: a BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    with torch.no_grad():
        invstd = torch.rsqrt(rv.double() + bn.eps)
        scale = invstd if w is None else w.double() * invstd
        shift = -rm.double() * scale if b is None else b.double() - rm.double() * scale
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def _folded_conv(conv: nn.Conv2d, bn: nn.Module, keep_bias: bool = True) -> Tuple[nn.Conv2d, Tensor]:
    weight, bias = _fold_conv_bn(conv, bn)
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=keep_bias, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if keep_bias:
            new.bias.copy_(bias)
    return new, bias


class FoldedBlock(nn.Module):
    """An eval-only ResNet block with BN folded into its convs: inner units are
    ``relu(conv(x) + bias)``; the last conv runs without bias and the join
    ``relu(y + bias + identity)`` (identity: x, or the folded downsample conv without its
    bias, whose bias joins in the same pass) is one fused apply pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        units = block._units() if hasattr(block, "_units") else _FUSED[type(block)]._units(block)
        self.inner = nn.ModuleList([_folded_conv(conv, bn)[0] for conv, bn in units[:-1]])
        self.last, last_bias = _folded_conv(*units[-1], keep_bias=False)
        ds = block.downsample
        self.down = None
        down_bias = None
        if ds is not None:
            if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)):
                raise ValueError("fold: only the standard conv-BN downsample branch can be folded")
            self.down, down_bias = _folded_conv(ds[0], ds[1], keep_bias=False)
        # (scale, shift) of the join in the kernels' accumulation dtype: float64 for a float64
        # block, else float32
        acc = torch.float64 if last_bias.dtype == torch.float64 else torch.float32
        one = torch.ones_like(last_bias, dtype=acc)
        self.register_buffer("affine", torch.stack([one, last_bias.to(acc)]))
        self.register_buffer("res_affine", None if down_bias is None else torch.stack([one, down_bias.to(acc)]))

    def forward(self, x: Tensor) -> Tensor:
        if not _exporting() and self._conv_path(x) == "triton":
            return self._forward_triton(x)
        return self._forward_library(x)

    def _forward_library(self, x: Tensor) -> Tensor:
        h = x
        for conv in self.inner:
            h = torch.relu(conv(h))
        y = self.last(h)
        identity = x if self.down is None else self.down(x)
        if _exporting() or self._grad_wanted(x):
            # torch.export / ONNX, or gradients wanted (the fused kernel has no backward):
            # the same join in standard ops (same rounding: the scales are 1), so an
            # exported graph needs no resfused op and autograd sees every step
            z = y + self.affine[1].to(y.dtype).view(1, -1, 1, 1)
            if self.res_affine is not None:
                identity = identity + self.res_affine[1].to(y.dtype).view(1, -1, 1, 1)
            return torch.relu(z + identity)
        return ops.bn_act_fwd(y, self.affine.to(_acc(y)), identity,
                              None if self.res_affine is None else self.res_affine.to(_acc(y)), True)


    def _grad_wanted(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _convs(self):
        return list(self.inner) + [self.last] + ([self.down] if self.down is not None else [])

    def _conv_path(self, x: Tensor) -> str:
        convs = self._convs()
        dtype = _autocast_dtype(x) or x.dtype
        why = triton_conv_reason(x, [c.groups for c in convs], dtype=dtype)
        if not why and any(type(c) is not nn.Conv2d or c.padding_mode != "zeros" or isinstance(c.padding, str)
                           for c in convs):
            why = "a convolution with non-zero padding mode runs in the library"
        if not why and self._grad_wanted(x):
            why = ("gradients would be needed; the Triton path of a folded block is for inference (run it under "
                   "torch.no_grad() or torch.inference_mode())")
        return select_conv(type(self).__name__, why, x,
                           lambda any_size=False: conv_key("folded", x, convs, dtype, any_size, tf32=conv_tf32(dtype)),
                           lambda: {"library": lambda: self._forward_library(x),
                                    "triton": lambda: self._forward_triton(x)})

    def _forward_triton(self, x: Tensor) -> Tensor:
        """The same block as three Triton convolutions: bias + ReLU in the inner convs'
        epilogues, and bias + residual + ReLU (the join) in the last one's."""
        cast = _autocast_dtype(x)
        if cast is not None:
            x = x.to(cast)
        tf32 = conv_tf32(x.dtype)

        def run(conv: nn.Conv2d, h: Tensor, bias: Tensor, residual=None, relu=True) -> Tensor:
            w = conv.weight.to(h.dtype)
            return conv_ops.conv_bn_fwd(h, w, list(conv.stride), list(conv.padding), list(conv.dilation), None,
                                        bias.float(), residual, relu, False, tf32, "triton")[0]

        with _no_autocast(x, cast):
            h = x
            for conv in self.inner:
                h = run(conv, h, conv.bias)
            identity = x
            if self.down is not None:
                identity = run(self.down, x, self.res_affine[1], relu=False)
            return run(self.last, h, self.affine[1], residual=identity)


def _acc(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def fold(model: nn.Module) -> nn.Module:
    """A deployment copy of ``model`` in eval mode: every ResNet block (fused or torchvision's)
    becomes a ``FoldedBlock`` and a ResNet stem's ``bn1`` is folded into ``conv1``. Outputs
    equal the unfolded model's in eval within fp32 tolerance. ``model`` is not changed.
    A block that is not the standard kind (another activation or norm layer, a custom
    downsample, a BN without running statistics) is kept unfolded, in eval mode."""
    # (process groups are shared, not copied: they cannot be, and the copy runs in eval,
    # where nothing is synchronized)
    groups = {id(g): g for m in model.modules() for g in (getattr(m, "process_group", None),) if g is not None}
    folded = copy.deepcopy(model, memo=dict(groups)).eval()
    if (type(folded) in _FUSED or type(folded) in _PLAIN) and _foldable(folded):
        return FoldedBlock(folded).eval()  # a block on its own
    _fold_children(folded)
    stem_bn = isinstance(folded, ResNet) and (_bn_supported(folded.bn1) or (  # (convert(sync_bn=True)'s stem BN)
        type(folded.bn1) is BatchNormAct2d and folded.bn1.activation == "identity"))
    if stem_bn and type(folded.conv1) is nn.Conv2d and _bn_args(folded.bn1)[0] is not None:
        # (a stem BN without running statistics stays)
        folded.conv1 = _folded_conv(folded.conv1, folded.bn1)[0]
        folded.bn1 = nn.Identity()
    return folded


def _foldable(block: nn.Module) -> bool:
    """A ResNet block folds when the fused block would run it (ReLU, zero-padded Conv2d,
    BatchNorm2d/FrozenBatchNorm2d units) with running statistics in every BN and either no
    downsample or the standard conv-BN one; any other block is kept as it is (in eval)."""
    plain = type(block)
    if plain in _FUSED:  # (fold works on a copy) the fused class's checks, on this block
        block.__class__ = _FUSED[plain]
    try:
        units = block._units()
        pair = block._fused_downsample() if block.downsample is not None else None
        if not block._fusable(units) or (block.downsample is not None and pair is None):
            return False
        bns = [bn for _, bn in units] + ([pair[1]] if pair is not None else [])
        return all(_bn_args(bn)[0] is not None for bn in bns)
    finally:
        block.__class__ = plain


def _fold_children(module: nn.Module, memo: Optional[Dict[int, Tuple[nn.Module, nn.Module]]] = None) -> None:
    """Every foldable block below ``module`` becomes a FoldedBlock, in every slot that holds
    it: a block held twice (tied) becomes one FoldedBlock held twice. ``memo``: id of a
    module seen -> (it, what replaces it)."""
    memo = {} if memo is None else memo
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        seen = memo.get(id(child))
        if seen is None:
            if type(child) in _FUSED or type(child) in _PLAIN:
                seen = (child, FoldedBlock(child) if _foldable(child) else child)
            else:
                seen = (child, child)
                _fold_children(child, memo)
            memo[id(child)] = seen
        if seen[1] is not child:
            setattr(module, name, seen[1])


__all__ = ["convert", "revert", "fold", "FoldedBlock"]
