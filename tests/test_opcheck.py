"""torch.library.opcheck for every resfused op on every backend this machine runs:
schema, fake (meta) kernels, and AOT dispatch."""
import pytest
import torch

from resfused.ops import bn_act as ops
from utils import backend_cases, case_id, interpreted

CASES = backend_cases()


def samples(device, layout, residual_bn):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    g = torch.randn_like(x)
    affine = torch.randn(2, 3, device=device)
    stats = torch.stack([torch.randn(3, device=device), torch.rand(3, device=device) + 0.5])
    coef = torch.randn(4, 3, device=device)
    out = torch.relu(torch.randn_like(x))
    ra = affine.clone() if residual_bn else None
    rs = stats.clone() if residual_bn else None
    rc = coef.clone() if residual_bn else None
    return {
        "bn_stats": (x,),
        "bn_act_fwd": (x, affine, r, ra, True),
        "bn_act_bwd_reduce": (g, x, affine, stats, r, ra, rs, None, True, not residual_bn),
        "bn_act_bwd_apply": (g, x, affine, coef, r, ra, rc, out, True),
        # (the residual_bn variant: the relu mask from out instead of recomputed)
        "bn_act_bwd_apply_acc": (torch.randn_like(x), g, x, affine, coef, out if residual_bn else None, True),
        # (residual_bn: training, with weight, bias and the running-statistics update;
        # else eval: running statistics as mean/var, no weight)
        "bn_coef": (stats[0], stats[1], None if not residual_bn else torch.rand(3, device=device), affine[1],
                    torch.randn(3, device=device) if residual_bn else None,
                    torch.rand(3, device=device) + 0.5 if residual_bn else None, 0.1, 1e-5, 3),
        # (residual_bn: a window that does not tile the input, padding on one axis only)
        "bn_relu_maxpool": (x, affine, [3, 2] if residual_bn else [3, 3], [2, 1] if residual_bn else [2, 2],
                            [1, 0] if residual_bn else [1, 1]),
    }


PARAMS = [pytest.param(case, layout, residual_bn, op, id=f"{case_id(case)}-{layout}-resbn{int(residual_bn)}-{op}")
          for case in CASES for layout in ("nchw", "channels_last") for op in ops.OPS
          for residual_bn in ((False,) if op == "bn_stats" else (False, True))]


@pytest.mark.parametrize("case,layout,residual_bn,op", PARAMS)
def test_opcheck(case, layout, residual_bn, op):
    backend, device = case
    args = samples(device, layout, residual_bn)[op] + (backend,)
    tests = ("test_schema", "test_faketensor") if interpreted(*case) else \
        ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(torch.ops.resfused, op).default, args, test_utils=tests)
