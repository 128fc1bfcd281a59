"""Modules: they own parameters and buffers and call ``resfused.functional``."""
from .bn_act import BatchNormAct2d
from .block import FusedBasicBlock, FusedBottleneck
from .dense import FusedDenseBlock, FusedDenseLayer, FusedTransition
from .stem import FusedDenseNet, FusedResNet

__all__ = ["BatchNormAct2d", "FusedBasicBlock", "FusedBottleneck", "FusedDenseBlock", "FusedDenseLayer",
           "FusedDenseNet", "FusedResNet", "FusedTransition"]
