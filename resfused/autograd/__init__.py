"""One ``torch.autograd.Function`` per fused unit; explicit save/recompute; calls ops only."""
from .bn_act import BatchNormActFunction
from .dense import DenseBlockFunction, TransitionFunction

__all__ = ["BatchNormActFunction", "DenseBlockFunction", "TransitionFunction"]
