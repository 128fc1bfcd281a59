"""Autocast (bf16 on CPU; bf16 and fp16 on CUDA, fp16 with GradScaler): BN parameters and
running statistics stay fp32, and outputs, gradients and running statistics are within
the low-precision rule (error against a float64 oracle at most 2x eager PyTorch's own)."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import resfused
from utils import assert_low_precision, assert_model_low_precision, backend_cases, interpreted, randomise_bns

CASES = [c for c in backend_cases() if not interpreted(*c)]
AMP = [(b, d, dt) for (b, d) in CASES for dt in ([torch.bfloat16] if d == "cpu" else [torch.bfloat16, torch.float16])]


def _models(name):
    torch.manual_seed(0)
    if name == "resnet18":
        tv = torchvision.models.resnet18(num_classes=10)
    else:
        tv = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2,
                                         num_classes=10)
    randomise_bns(tv, bias=0.2, running_stats=False)
    mine = resfused.convert(copy.deepcopy(tv))
    return tv, mine, copy.deepcopy(tv).double()


@pytest.mark.parametrize("case", AMP, ids=lambda c: f"{c[0]}-{c[1]}-{str(c[2])[6:]}")
@pytest.mark.parametrize("name", ["resnet18", "densenet"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_autocast_training_step_within_low_precision_rule(case, name, layout):
    """An autocast training step's outputs, parameter gradients and running statistics
    against the float64 oracle: within the low-precision rule (at most 2x eager
    torchvision's own error). resnet18 takes 64x64 images: at 32x32 its last stage
    normalises 4 values per channel, where bf16 rounding is amplified so much that two
    correct fp32-statistics BNs (plain PyTorch ops against cuDNN's, on a GPU) differed by
    2-3.6x in their errors."""
    backend, device, dtype = case
    tv, mine, oracle = _models(name)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    tv, mine = tv.to(device).to(memory_format=fmt), mine.to(device).to(memory_format=fmt)
    hw = 64 if name == "resnet18" else 32
    x = torch.randn(4, 3, hw, hw, device=device).contiguous(memory_format=fmt)
    scaler_on = dtype == torch.float16
    scalers = [torch.amp.GradScaler(device, init_scale=2.0 ** 10, enabled=scaler_on) for _ in range(2)]
    outs = []
    with resfused.use_backend(backend):
        for model, scaler in zip((tv, mine), scalers):
            with torch.autocast(device, dtype=dtype):
                out = model(x)
            assert out.dtype == dtype
            scaler.scale(out.float().square().mean()).backward()
            outs.append(out)
    ref = oracle(x.double().cpu())
    ref.square().mean().backward()
    assert_low_precision(outs[1], outs[0], ref, f"{name} output")
    results = []
    scale = scalers[0].get_scale() if scaler_on else 1.0
    for (pn, p), q, r in zip(mine.named_parameters(), tv.parameters(), oracle.parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, pn
        results.append((f"grad {pn}", p.grad / scale, q.grad / scale, r.grad))
    for (bn, b), c, r in zip(mine.named_buffers(), tv.buffers(), oracle.buffers()):
        if b.dtype.is_floating_point:
            assert b.dtype == torch.float32, bn
            results.append((f"buffer {bn}", b, c, r))
        else:
            assert torch.equal(b.cpu(), r), bn
    assert_model_low_precision(results, name)
