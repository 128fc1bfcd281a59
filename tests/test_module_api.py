"""Fused modules behave as torchvision's under the usual module operations: pickling,
deepcopy, state_dict round trips, ``.to(device, dtype)``, ``.half()``, ``.bfloat16()``;
and under ``torch.use_deterministic_algorithms(True)`` every result is bit-identical run
to run."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision

import resfused
from utils import backend_cases, case_id, interpreted, randomise_bns

CASES = [c for c in backend_cases() if not interpreted(*c)]


def _models():
    torch.manual_seed(0)
    dense = resfused.convert(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16,
                                                         bn_size=2, num_classes=10))
    return {"resnet18": randomise_bns(resfused.models.resnet18(num_classes=10)),
            "resnet50": randomise_bns(resfused.models.resnet50(num_classes=10)),
            "densenet": randomise_bns(dense)}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_copies_keep_classes_state_and_outputs(name, how):
    model = _models()[name].eval()
    if how == "pickle":
        other = pickle.loads(pickle.dumps(model))
    elif how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), other(x))


@pytest.mark.parametrize("name", ["resnet18", "densenet"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_moves_like_torchvision(name, dtype):
    model = _models()[name]
    ref = resfused.revert(copy.deepcopy(model))
    for m in (model, ref):
        if dtype == torch.float16:
            m.half()
        elif dtype == torch.bfloat16:
            m.bfloat16()
        else:
            m.to("cpu", dtype)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2), k
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    model.eval()
    ref.eval()
    out, out_ref = model(x), ref(x)
    assert out.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol * float(out_ref.detach().abs().max()))


def test_state_dict_round_trip_through_revert():
    model = _models()["resnet50"]
    sd = copy.deepcopy(model.state_dict())
    tv = resfused.revert(copy.deepcopy(model))
    again = resfused.convert(tv)
    for (k, v), (k2, v2) in zip(sd.items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", ["resnet18", "densenet"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic_mode_is_bitwise_reproducible(case, name, layout):
    backend, device = case
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    base = _models()[name].to(device).to(memory_format=fmt).train()
    x = torch.randn(4, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    runs = []
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with resfused.use_backend(backend):
            for _ in range(2):
                model = copy.deepcopy(base)
                out = model(x)
                out.square().sum().backward()
                runs.append([out] + [p.grad for p in model.parameters()] + list(model.buffers()))
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
