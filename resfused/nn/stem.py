"""``FusedResNet`` and ``FusedDenseNet``: torchvision's ``ResNet`` whose stem runs
``maxpool(relu(bn1(conv1(x))))`` with BatchNorm, ReLU and max pooling as one autograd
node, and torchvision's ``DenseNet`` whose ``features`` run ``pool0(relu0(norm0(...)))`` so.

``resfused.convert`` (and so every ``resfused.models`` ResNet and DenseNet) swaps a torchvision
``ResNet``'s (``DenseNet``'s) class for this subclass, as it does the blocks': no parameter, buffer,
submodule or state_dict key changes, and ``resfused.revert`` swaps it back. The stem's
modules stay what they are (``model.relu`` is still an ``nn.ReLU``, ``model.maxpool`` an
``nn.MaxPool2d``); the fused forward reads their settings and runs them only when it
cannot stand in for them.

The fused stem keeps the BN's input, the pooling indices and per-channel vectors for
backward, not the BN-ReLU output eager keeps (in fp32 with 3x3/2 pooling, 40% of what
eager's BN, ReLU and pooling keep), and on the cpu backend computes ``relu(bn(y))`` and the pooling in one pass over
an NCHW ``y``. Outputs, indices, gradients and running statistics are those of
``bn_act_fwd`` followed by aten's max pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import ResNet

from ..autograd.bn_act import BatchNormReluPoolFunction
from ..ops import bn_act as ops
from ..ops.bn_act import pool_shape
from ..ops.bn_act import resolve as resolve_backend
from .bn_act import (advance_batch_norm, checked_bn_args, global_hooks, hooked, module_attr, plain_relu,
                     traced_or_transformed)


def _two(v):
    """A pooling argument as a pair (an int or a one-value sequence stands for both
    dimensions, as aten takes it), None for any other length."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else v if len(v) == 2 else None


def pool_window(pool: nn.Module, x: Tensor):
    """``(kernel_size, stride, padding)`` of ``pool`` as pairs when the fused stem can stand
    in for it on ``x`` (an ``nn.MaxPool2d`` with dilation 1, floor mode, no indices returned,
    padding at most half the window, a non-empty output), else None."""
    if type(pool) is not nn.MaxPool2d or pool.return_indices or pool.ceil_mode:
        return None
    stride = pool.stride
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = pool.kernel_size  # (aten's meaning of an empty stride)
    k, s, p, dil = (_two(v) for v in (pool.kernel_size, stride, pool.padding, pool.dilation))
    if None in (k, s, p) or dil != (1, 1):
        return None
    try:
        pool_shape(x.shape, k, s, p)  # (the op's own conditions on the window)
    except ValueError:
        return None
    return list(k), list(s), list(p)


def stem_fusable(bn: nn.Module, relu: nn.Module, pool: nn.Module, y) -> bool:
    """Whether ``pool(relu(bn(y)))`` may run as one fused node: a plain ``nn.BatchNorm2d``
    (a subclass, a frozen or synchronized BN runs its own forward), or an ``nn.Identity``
    (``resfused.fold``'s stem, BN folded into conv1) when no gradient is wanted; ReLU's own forward, a
    pooling ``pool_window`` takes; no hook on the three modules and no global one; a 4-D
    tensor off the meta device; not traced, exported or under a torch.func transform."""
    if type(bn) not in (nn.BatchNorm2d, nn.Identity) or not plain_relu(relu) or not isinstance(y, Tensor):
        return False
    if y.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return False  # (what max pooling takes, the fused kernels do not)
    if type(bn) is nn.Identity and torch.is_grad_enabled() and y.requires_grad:
        return False  # (fold's stem, bn1 folded into conv1: fused for inference only)
    if y.dim() != 4 or y.device.type == "meta" or traced_or_transformed((y,)) or global_hooks():
        return False
    return not (hooked(bn) or hooked(relu) or hooked(pool)) and pool_window(pool, y) is not None


def bn_relu_pool(bn: nn.Module, pool: nn.MaxPool2d, y: Tensor) -> Tensor:
    """``pool(relu(bn(y)))`` as one node (call only where ``stem_fusable``): the BN's checks
    first, then its batch count, exactly once, as ``nn.BatchNorm2d`` counts it. An
    ``nn.Identity`` bn: the ReLU and the pooling in one pass (scale 1, shift 0)."""
    if type(bn) is nn.Identity:
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        c = y.shape[1]
        unit = torch.stack([torch.ones(c, dtype=acc, device=y.device), torch.zeros(c, dtype=acc, device=y.device)])
        return ops.bn_relu_maxpool(y, unit, *pool_window(pool, y), resolve_backend("auto", y))[0]
    running_mean, running_var, weight, bias, bn_training, _ = checked_bn_args(bn, y)
    kernel_size, stride, padding = pool_window(pool, y)
    backend = resolve_backend("auto", y)  # a forced backend that cannot run raises here, before the count
    momentum = advance_batch_norm(bn)
    return BatchNormReluPoolFunction.apply(y, weight, bias, running_mean, running_var, bn_training, momentum, bn.eps,
                                           kernel_size, stride, padding, backend)


class FusedResNet(ResNet):
    """torchvision's ``ResNet`` (same constructor, modules and state_dict) whose stem
    ``maxpool(relu(bn1(conv1(x))))`` runs BatchNorm, ReLU and max pooling as one node
    whenever ``stem_fusable`` allows, and torchvision's modules one by one otherwise."""

    def stem(self, y: Tensor) -> Tensor:
        """``maxpool(relu(bn1(y)))`` of ``y = conv1(x)``: one node where ``stem_fusable``."""
        bn, relu, pool = module_attr(self, "bn1"), module_attr(self, "relu"), module_attr(self, "maxpool")
        return bn_relu_pool(bn, pool, y) if stem_fusable(bn, relu, pool, y) else pool(relu(bn(y)))

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.stem(module_attr(self, "conv1")(x))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def run_sequential(seq: nn.Module, x: Tensor) -> Tensor:
    """``seq(x)`` for an ``nn.Sequential``, with each BatchNorm2d → ReLU → MaxPool2d run of
    its modules that ``stem_fusable`` allows as one node; the Sequential called as it is
    when it is another kind of module or has a hook of its own (or a global one)."""
    mods = list(seq._modules.values()) if type(seq) is nn.Sequential else []
    if not mods or hooked(seq) or global_hooks() or not isinstance(x, Tensor) or any(m is None for m in mods):
        return seq(x)  # (a None slot: nn.Sequential's own error)
    i = 0
    while i < len(mods):
        if i + 2 < len(mods) and stem_fusable(mods[i], mods[i + 1], mods[i + 2], x):
            x = bn_relu_pool(mods[i], mods[i + 2], x)
            i += 3
        else:
            x = mods[i](x)
            i += 1
    return x


class FusedDenseNet(DenseNet):
    """torchvision's ``DenseNet`` (same constructor, modules and state_dict) whose
    ``features`` run ``pool0(relu0(norm0(...)))`` as one node whenever ``stem_fusable``
    allows (``run_sequential``), and torchvision's modules one by one otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        features = run_sequential(module_attr(self, "features"), x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)
