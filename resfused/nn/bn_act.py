"""``BatchNormAct2d``: ``nn.BatchNorm2d`` whose forward fuses ``+ residual`` and the activation."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as RF


class BatchNormAct2d(nn.BatchNorm2d):
    """A drop-in ``nn.BatchNorm2d`` (same arguments, buffers and state_dict) computing
    ``act(bn(x) + residual)`` in one fused pass.

    ``activation`` is ``"relu"`` (default) or ``"identity"``. ``momentum=None``
    gives the cumulative moving average through ``num_batches_tracked``;
    ``affine=False`` and ``track_running_stats=False`` behave as in ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 activation: str = "relu"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        RF._check_activation(activation)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expected input with {self.num_features} "
                             f"channels, got input of shape {tuple(x.shape)}")
        # nn.BatchNorm2d's rules for the mode, the momentum and which buffers take part.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        # Validate everything before num_batches_tracked moves: a call that raises changes nothing.
        RF.check_bn_input(x, running_mean, running_var, self.weight, self.bias, bn_training)
        if residual is not None:
            RF.check_residual(x, residual)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return RF.batch_norm_act(x, running_mean, running_var, self.weight, self.bias, bn_training,
                                 momentum, self.eps, residual, self.activation)
