"""Drop-in fused DenseNet modules: ``FusedDenseLayer``, ``FusedDenseBlock`` and
``FusedTransition``.

Subclasses of torchvision's ``_DenseLayer``/``_DenseBlock``/``_Transition`` with the same
constructor, attribute names and state_dict keys (``denselayer%d``...) and no extra
parameters or buffers, so ``resfused.convert`` swaps them by class. The block runs as one
autograd node (``resfused.autograd.DenseBlockFunction``: shared feature storage, each
layer's channel prefix read in place, statistics cache). A module whose parts are not the
standard kinds (BatchNorm2d, ReLU, zero-padded Conv2d keeping the spatial size,
AvgPool2d) runs torchvision's own forward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.models.densenet import _DenseBlock, _DenseLayer, _Transition

from ..autograd.block import BNSpec, conv_chain_shapes
from ..autograd.dense import (TENSORS_PER_LAYER, DenseBlockFunction, DenseBlockSpec, DenseLayerSpec, PoolSpec,
                              TransitionFunction, TransitionSpec, check_transition_shapes, dense_block_forward,
                              transition_forward)
from ..functional import check_bn_input
from ..ops import bn_act as ops
from .block import (_autocast_dtype, _conv_spec, _no_autocast, check_conv_path, check_module_input, check_units,
                    conv_key, conv_tf32, select_conv, timing_runs)
from .bn_act import (SyncBNMixin, _restore_on_error, _snapshot, advance_batch_norm, advance_batch_norms,
                     batch_norm_args, module_attr, plain_relu, runs_unfused)


def _keeps_size(conv: nn.Conv2d) -> bool:
    spec = _conv_spec(conv)
    if spec is None or spec.stride != (1, 1):
        return False
    return all(2 * p == d * (k - 1) for p, d, k in zip(spec.padding, spec.dilation, conv.kernel_size))


#: a torchvision dense layer's submodules, in order
_LAYER_PARTS = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")


def _parts(layer: nn.Module) -> Tuple[Optional[nn.Module], ...]:
    """(norm1, relu1, conv1, norm2, relu2, conv2) of a dense layer, read from its module
    table (None where one is missing): a dense block reads them for every layer per call,
    and ``nn.Module.__getattr__`` is most of a microsecond a read."""
    mods = layer._modules
    return tuple(mods.get(name) for name in _LAYER_PARTS)


#: the BN kinds a fused dense layer or transition applies itself (an nn.SyncBatchNorm, as
#: ``nn.SyncBatchNorm.convert_sync_batchnorm`` leaves it, synchronizes over its own group)
_DENSE_BNS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _layer_fusable(layer: nn.Module, parts: Optional[Tuple[Optional[nn.Module], ...]] = None) -> bool:
    if not isinstance(layer, _DenseLayer):
        return False
    norm1, relu1, conv1, norm2, relu2, conv2 = parts or _parts(layer)
    return (type(norm1) in _DENSE_BNS and type(norm2) in _DENSE_BNS and plain_relu(relu1)
            and plain_relu(relu2) and _keeps_size(conv1) and _keeps_size(conv2)
            and norm1.num_features == conv1.in_channels and norm2.num_features == conv1.out_channels)


def _grad_wanted(x: Tensor, tensors: Sequence[Optional[Tensor]]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for t in tensors)


def _run_dense_layers(name: str, layers: List[nn.Module], x: Tensor, owner: SyncBNMixin) -> Tensor:
    """Validate, advance the BNs' batch counters, then run ``layers`` as one fused dense block."""
    parts = [_parts(layer) for layer in layers]
    bns = [bn for p in parts for bn in (p[0], p[3])]
    args = [batch_norm_args(bn) for bn in bns]
    groups, group = [None] * len(bns), None  # (nothing synchronized: the common case, worked out in one pass)
    if owner.sync_bn or any(type(bn) is nn.SyncBatchNorm for bn in bns):
        # (as nn.SyncBatchNorm: batch statistics in training only)
        groups = [owner._sync_group(bn) if a[4] and bn.training else None for a, bn in zip(args, bns)]
        group = next((g for g in groups if g is not None), None)  # (one of them, or None when none is)
        # the statistics cache serves every norm1 that normalises with batch statistics: one group for all
        if len({id(g) for g, a, bn in zip(groups[::2], args[::2], bns[::2]) if a[4] and bn.training}) > 1:
            raise ValueError(f"{name}: the layers' norm1 synchronize their batch statistics over different process "
                             "groups (or some not at all); a fused dense block shares one statistics cache between "
                             "them: give them one process group")
    convs = [c for p in parts for c in (p[2], p[5])]
    weights = [module_attr(c, "weight") for c in convs]
    check_module_input(name, x, bns[0].num_features, weights[0], any(a[4] and g is None for a, g in zip(args, groups)))
    # (a synchronized BN checks the merged count of values per channel, once gathered)
    cast = _autocast_dtype(x)
    # norm1 of a layer normalises its input (conv1's input channels), norm2 conv1's output
    bn_channels = [w.shape[1] * c.groups if j % 2 == 0 else weights[j - 1].shape[0]
                   for j, (w, c) in enumerate(zip(weights, convs))]
    biases = [module_attr(c, "bias") for c in convs]
    check_units(name, x, weights, biases, bns, args, bn_channels, cast,
                lambda j: (f"denselayer{j // 2 + 1}.conv{j % 2 + 1}", f"denselayer{j // 2 + 1}.norm{j % 2 + 1}"))
    conv_specs = [_conv_spec(c) for c in convs]
    checked = set()
    for w, cs in zip(weights, conv_specs):  # (each keeps the spatial size; the output size depends on
        if (w.shape[2:], cs) not in checked:  # the kernel's size and geometry alone: each kind once)
            checked.add((w.shape[2:], cs))
            conv_chain_shapes(name, tuple(x.shape), [(w.shape, cs)], "the layers' convolutions")
    ops.resolve("auto", x if cast is None else x.new_empty(0, dtype=cast))  # backend and dtype
    why = check_conv_path(name, x, convs, cast or x.dtype)
    saved = _snapshot(bns) if group is not None else []
    momenta = advance_batch_norms(bns)  # only after every check has passed
    layer_specs, tensors = [], []
    for j, layer in enumerate(layers):
        (rm1, rv1, w1, b1, t1), (rm2, rv2, w2, b2, t2) = args[2 * j], args[2 * j + 1]
        n1, n2 = bns[2 * j], bns[2 * j + 1]
        drop = layer.drop_rate if (layer.training and layer.drop_rate > 0) else 0.0
        layer_specs.append(DenseLayerSpec(BNSpec(t1, momenta[2 * j], n1.eps, groups[2 * j]),
                                          conv_specs[2 * j],
                                          BNSpec(t2, momenta[2 * j + 1], n2.eps, groups[2 * j + 1]),
                                          conv_specs[2 * j + 1],
                                          weights[2 * j + 1].shape[0], float(drop)))
        cw1, cb1 = weights[2 * j], biases[2 * j]
        cw2, cb2 = weights[2 * j + 1], biases[2 * j + 1]
        if cast is not None:
            cw1, cw2 = cw1.to(cast), cw2.to(cast)
            cb1 = None if cb1 is None else cb1.to(cast)
            cb2 = None if cb2 is None else cb2.to(cast)
        tensors += [w1, b1, rm1, rv1, cw1, cb1, w2, b2, rm2, rv2, cw2, cb2]
    spec = DenseBlockSpec(tuple(layer_specs), "auto")
    if cast is not None:
        x = x.to(cast)
    with _no_autocast(x, cast), _restore_on_error(saved):
        spec = spec._replace(tf32=conv_tf32(x.dtype))
        key = lambda any_size=False: conv_key("dense", x, convs, any_size=any_size,  # noqa: E731
                                              train=[a[4] for a in args], grad=_grad_wanted(x, tensors),
                                              tf32=spec.tf32)
        spec = spec._replace(conv=select_conv(name, why, x, key, lambda: _dense_tuning_runs(spec, x, tensors),
                                              may_time=group is None))
        if _grad_wanted(x, tensors):
            return DenseBlockFunction.apply(spec, x, *tensors)
        return dense_block_forward(spec, x, tensors, keep=False).buf


def _dense_tuning_runs(spec: DenseBlockSpec, x: Tensor, tensors: List[Optional[Tensor]]):
    grad = _grad_wanted(x, tensors)

    def run(path, xi, ts):
        s = spec._replace(conv=path)
        return DenseBlockFunction.apply(s, xi, *ts) if grad else dense_block_forward(s, xi, ts, keep=False).buf
    return timing_runs(x, tensors, lambda j: j % TENSORS_PER_LAYER in (2, 3, 8, 9), grad, run)


class FusedDenseLayer(SyncBNMixin, _DenseLayer):
    """torchvision ``_DenseLayer`` (same constructor and state_dict), fused. Standalone it
    returns the new features only, like torchvision's; inside a ``FusedDenseBlock`` the
    block runs all its layers as one node."""

    def _layer_name(self) -> str:
        return (f"{type(self).__name__}(num_input_features={self.norm1.num_features}, "
                f"growth_rate={self.conv2.out_channels})")

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:  # noqa: A002 (torchvision's name)
        if not _layer_fusable(self) or runs_unfused(self, input):
            return super().forward(input)
        if not isinstance(input, Tensor):
            inputs = list(input)
            if not all(isinstance(t, Tensor) for t in inputs):
                raise TypeError(f"{self._layer_name()}: expected a Tensor or a list of Tensors")
            input = torch.cat(inputs, 1) if len(inputs) != 1 else inputs[0]
        out = _run_dense_layers(self._layer_name(), [self], input, self)
        # the new features alone, in a tensor of their own (contiguous, as torchvision's)
        return out[:, input.shape[1]:].clone(memory_format=ops.memory_format_of(out))


class FusedDenseBlock(SyncBNMixin, _DenseBlock):
    """torchvision ``_DenseBlock`` (same constructor and state_dict: ``denselayer%d``), fused:
    the output is torchvision's ``torch.cat([x, new_1, ..., new_L], 1)``, written in place
    into one shared buffer."""

    def _block_name(self) -> str:
        layers = list(self.values())
        first = layers[0] if layers else None
        c0 = first.norm1.num_features if first is not None else "?"
        k = first.conv2.out_channels if first is not None else "?"
        return f"{type(self).__name__}(num_layers={len(layers)}, num_input_features={c0}, growth_rate={k})"

    def _fusable(self) -> bool:
        layers = list(self._modules.values())
        if not layers:
            return False
        c = None
        for layer in layers:
            parts = _parts(layer)
            if not _layer_fusable(layer, parts):
                return False
            norm1, conv2 = parts[0], parts[5]
            if c is not None and norm1.num_features != c:
                return False
            c = norm1.num_features + conv2.out_channels
        return True

    def forward(self, init_features: Tensor) -> Tensor:
        if not self._fusable() or runs_unfused(self, init_features):
            return super().forward(init_features)
        return _run_dense_layers(f"{self._block_name()}.denselayer1", list(self._modules.values()), init_features,
                                 self)


class FusedTransition(SyncBNMixin, _Transition):
    """torchvision ``_Transition`` (norm → relu → 1x1 conv → avg pool; same state_dict),
    with the fused BN-ReLU recomputed in backward instead of kept."""

    def _fusable(self) -> bool:
        names = [n for n, _ in self.named_children()]
        if names != ["norm", "relu", "conv", "pool"]:
            return False
        pool = self.pool
        return (type(self.norm) in _DENSE_BNS and plain_relu(self.relu)
                and _conv_spec(self.conv) is not None and type(pool) is nn.AvgPool2d)

    def _name(self) -> str:
        return (f"{type(self).__name__}(num_input_features={self.norm.num_features}, "
                f"num_output_features={self.conv.out_channels})")

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable() or runs_unfused(self, x):
            return super().forward(x)
        name = self._name()
        rm, rv, w, b, training = batch_norm_args(self.norm)
        group = self._sync_group(self.norm) if training and self.norm.training else None
        check_module_input(name, x, self.norm.num_features, self.conv.weight, training and group is None)
        check_bn_input(x, rm, rv, w, b, training, prefix=f"{name}: ", name="input", synced=group is not None)
        cast = _autocast_dtype(x)
        # (the BN's tensors are checked above: here the conv's bias and the BN's eps)
        check_units(name, x, [self.conv.weight], [self.conv.bias], [self.norm], [(None,) * 4 + (training,)],
                    [x.shape[1]], cast, lambda _: ("conv", "norm"))
        ops.resolve("auto", x if cast is None else x.new_empty(0, dtype=cast))
        why = check_conv_path(name, x, [self.conv], cast or x.dtype)
        pool = self.pool

        def pair(v) -> Tuple[int, int]:
            return (v, v) if isinstance(v, int) else tuple(v)

        stride = pool.stride if pool.stride is not None else pool.kernel_size
        pspec = PoolSpec(pair(pool.kernel_size), pair(stride), pair(pool.padding), bool(pool.ceil_mode),
                         bool(pool.count_include_pad), pool.divisor_override)
        check_transition_shapes(name, tuple(x.shape), tuple(self.conv.weight.shape), _conv_spec(self.conv), pspec)
        saved = _snapshot([self.norm]) if group is not None else []
        momentum = advance_batch_norm(self.norm)
        spec = TransitionSpec(BNSpec(training, momentum, self.norm.eps, group), _conv_spec(self.conv), pspec, "auto")
        cw, cb = self.conv.weight, self.conv.bias
        if cast is not None:
            cw = cw.to(cast)
            cb = None if cb is None else cb.to(cast)
            x = x.to(cast)
        tensors = (w, b, rm, rv, cw, cb)
        with _no_autocast(x, cast), _restore_on_error(saved):
            grad = _grad_wanted(x, tensors)
            spec = spec._replace(tf32=conv_tf32(x.dtype))
            key = lambda any_size=False: conv_key("transition", x, [self.conv], any_size=any_size,  # noqa: E731
                                                  train=training, grad=grad, tf32=spec.tf32)
            spec = spec._replace(conv_path=select_conv(name, why, x, key,
                                                       lambda: _transition_tuning_runs(spec, x, tensors, grad),
                                                       may_time=group is None))
            if grad:
                return TransitionFunction.apply(spec, x, *tensors)
            return transition_forward(spec, x, *tensors)[0]


def _transition_tuning_runs(spec: TransitionSpec, x: Tensor, tensors, grad: bool):
    def run(path, xi, ts):
        s = spec._replace(conv_path=path)
        return TransitionFunction.apply(s, xi, *ts) if grad else transition_forward(s, xi, *ts)[0]
    return timing_runs(x, tensors, lambda j: j in (2, 3), grad, run)


__all__ = ["FusedDenseLayer", "FusedDenseBlock", "FusedTransition"]
