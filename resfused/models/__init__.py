"""Fused ResNets and DenseNets: torchvision's ``ResNet`` with ``FusedBottleneck``/``FusedBasicBlock``,
and torchvision's ``DenseNet`` with ``FusedDenseBlock``/``FusedTransition``.

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


_RESNET_DOC = ("torchvision's ``{name}`` with fused blocks (same arguments, same state_dict). "
               "``memory_efficient`` (default True) recomputes the inner BN-ReLU outputs in backward; "
               "``sync_bn``/``process_group`` synchronize batch statistics across processes "
               "(see ``resfused.convert``).")
_DENSENET_DOC = ("torchvision's ``{name}`` with fused dense blocks and transitions (same arguments, same "
                 "state_dict). Dense blocks always share feature storage and recompute norm1/relu1 and relu2 in "
                 "backward; torchvision's ``memory_efficient`` (checkpointing) is accepted and only matters after "
                 "``resfused.revert``. ``sync_bn``/``process_group`` as in ``resfused.convert``.")
_DENSE_NAMES = ["densenet121", "densenet161", "densenet169", "densenet201"]


def _builder(name: str, doc: str, takes_memory_efficient: bool):
    tv_builder = getattr(tvm, name)

    def build(*args, **kwargs) -> nn.Module:
        # (positional arguments go to torchvision's builder as they are: weights, progress,
        # or the legacy pretrained flag, which it still takes with a deprecation warning)
        fused = {"memory_efficient": kwargs.pop("memory_efficient", True)} if takes_memory_efficient else {}
        fused.update(sync_bn=kwargs.pop("sync_bn", False), process_group=kwargs.pop("process_group", None))
        return convert(tv_builder(*args, **kwargs), **fused)

    build.__name__ = name
    build.__qualname__ = name
    build.__doc__ = doc.format(name=name)
    return build


for _name in _NAMES:
    globals()[_name] = _builder(_name, _RESNET_DOC, takes_memory_efficient=True)
for _name in _DENSE_NAMES:
    globals()[_name] = _builder(_name, _DENSENET_DOC, takes_memory_efficient=False)

__all__ = list(_NAMES) + list(_DENSE_NAMES)
