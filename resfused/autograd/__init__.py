"""One ``torch.autograd.Function`` per fused unit; explicit save/recompute; calls ops only."""
from .bn_act import BatchNormActFunction

__all__ = ["BatchNormActFunction"]
