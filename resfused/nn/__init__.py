"""Modules: they own parameters and buffers and call ``resfused.functional``."""
from .bn_act import BatchNormAct2d

__all__ = ["BatchNormAct2d"]
