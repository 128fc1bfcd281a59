"""Fused ResNets: torchvision's ``ResNet`` with ``FusedBottleneck``/``FusedBasicBlock``.

Each builder takes torchvision's arguments (``weights``, ``progress``, and every keyword
of ``ResNet`` such as ``zero_init_residual``, ``groups``, ``width_per_group``,
``replace_stride_with_dilation``, ``norm_layer``) and returns a model whose state_dict
keys are torchvision's, so ``model.load_state_dict(tv_model.state_dict())`` works both ways.
"""
from __future__ import annotations

import torchvision.models as tvm
from torch import nn

from ..convert import convert

_NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
          "wide_resnet50_2", "wide_resnet101_2"]


def _builder(name: str):
    tv_builder = getattr(tvm, name)

    def build(*, memory_efficient: bool = True, **kwargs) -> nn.Module:
        return convert(tv_builder(**kwargs), memory_efficient=memory_efficient)

    build.__name__ = name
    build.__qualname__ = name
    build.__doc__ = (f"torchvision's ``{name}`` with fused blocks (same arguments, same state_dict). "
                     f"``memory_efficient`` (default True) recomputes the inner BN-ReLU outputs in backward.")
    return build


for _name in _NAMES:
    globals()[_name] = _builder(_name)

__all__ = list(_NAMES)
