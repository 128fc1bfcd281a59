"""Export: a ``resfused.fold``-ed eval model exports with ``torch.export`` (standard ops
only) and to ONNX, with matching outputs; unfolded fused models export with
``torch.export`` and refuse ONNX with an error that says to fold (or revert) first."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torchvision

import resfused
from utils import assert_close, randomise_bns

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def _resnet(name="resnet18"):
    torch.manual_seed(0)
    return randomise_bns(getattr(resfused.models, name)(num_classes=10)).eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_model_exports_with_standard_ops(name):
    folded = resfused.fold(_resnet(name))
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(folded, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("resfused" in t for t in targets), targets
    assert_close(ep.module()(x), folded(x), 1e-6, 1e-6, "exported folded output")


@pytest.mark.parametrize("training", [False, True])
def test_unfolded_model_exports_with_torch_export(training):
    model = _resnet().train(training)
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    if not training:
        assert_close(ep.module()(x), model(x), 1e-6, 1e-6, "exported output")


@pytest.mark.skipif(not HAVE_ONNX, reason="onnx and onnxscript are not installed (scripts/setup.sh installs them)")
def test_folded_model_exports_to_onnx_and_matches():
    from onnx.reference import ReferenceEvaluator

    folded = resfused.fold(_resnet())
    x = torch.randn(2, 3, 32, 32)
    proto = torch.onnx.export(folded, (x,), dynamo=True).model_proto
    out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    assert_close(torch.from_numpy(out), folded(x), 1e-5, 1e-5, "onnx output")


@pytest.mark.skipif(not HAVE_ONNX, reason="onnx and onnxscript are not installed (scripts/setup.sh installs them)")
@pytest.mark.parametrize("which", ["resnet", "densenet"])
def test_unfolded_model_refuses_onnx_saying_fold_first(which):
    if which == "resnet":
        model = _resnet()
    else:
        model = resfused.convert(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3),
                                                             num_init_features=16, num_classes=10)).eval()
    with pytest.raises(Exception) as info:
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), dynamo=True)
    text = "".join(str(e) for e in (info.value, info.value.__cause__, info.value.__context__) if e)
    assert "resfused.fold(model)" in text and "resfused.revert(model)" in text, text[:2000]
