"""The op layer: ``torch.ops.resfused.*`` schemas, fake kernels and backend dispatch."""
from . import eager
from .bn_act import bn_act_bwd_apply, bn_act_bwd_apply_acc, bn_act_bwd_reduce, bn_act_fwd, bn_stats, memory_format_of

__all__ = ["eager", "bn_stats", "bn_act_fwd", "bn_act_bwd_reduce", "bn_act_bwd_apply", "bn_act_bwd_apply_acc",
           "memory_format_of"]
