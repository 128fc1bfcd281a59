"""resfused: fused residual-join and dense-concatenation kernels for ResNets and DenseNets.

Importing resfused never fails because a backend is missing; a call that needs
one says what is missing and how to build it (``python -m resfused.info``).
"""
from . import functional, memory, nn, ops
from ._backend import BACKENDS, select_backend, use_backend
from .conv_select import use_conv
from .convert import convert, fold, revert
from .nn import (BatchNormAct2d, FusedBasicBlock, FusedBottleneck, FusedDenseBlock, FusedDenseLayer, FusedDenseNet,
                 FusedResNet, FusedTransition)
from . import models  # noqa: E402  (after convert: the builders use it)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BatchNormAct2d", "FusedBasicBlock", "FusedBottleneck", "FusedDenseBlock",
           "FusedDenseLayer", "FusedDenseNet", "FusedResNet", "FusedTransition", "convert", "fold", "functional",
           "memory", "models", "nn", "ops", "revert", "select_backend", "use_backend", "use_conv"]
