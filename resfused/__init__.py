"""resfused: fused residual-join and dense-concatenation kernels for ResNets and DenseNets.

Importing resfused never fails because a backend is missing; a call that needs
one says what is missing and how to build it (``python -m resfused.info``).
"""
from . import functional, nn, ops
from ._backend import BACKENDS, select_backend, use_backend
from .nn import BatchNormAct2d

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BatchNormAct2d", "functional", "nn", "ops", "select_backend", "use_backend"]
