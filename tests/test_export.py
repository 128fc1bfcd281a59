"""Export: a ``resfused.fold``-ed eval model exports with ``torch.export`` (standard ops
only) and to ONNX, with matching outputs; an unfolded fused model exports as
torchvision's ops (``torch.export``, train and eval, saved and loaded back, and
differentiable; ONNX), with matching outputs and gradients."""
from __future__ import annotations

import copy
import importlib.util
import io

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


def _densenet():
    torch.manual_seed(0)
    return resfused.convert(randomise_bns(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3),
                                                                      num_init_features=16, num_classes=10)))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("which", ["resnet", "densenet"])
def test_unfolded_model_exports_as_torchvision_ops(which, training):
    """The exported program holds standard ops only: it saves and loads back, gives the
    model's outputs and, differentiated, its gradients (a training-mode export)."""
    model = (_resnet() if which == "resnet" else _densenet()).train(training).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if not hasattr(torch.compiler, "is_exporting"):  # torch < 2.7 cannot tell an export: the fused ops
        assert any("resfused" in t for t in targets), targets
        if not training:
            assert_close(ep.module()(x), model(x), 1e-9, 1e-9, "exported output")
        return
    assert not any("resfused" in t for t in targets), targets
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    reference = copy.deepcopy(model)  # (a training forward moves the running statistics)
    outs, grads = [], []
    for m in (reference, loaded):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.square().sum().backward()
        outs.append(out)
        grads.append(xi.grad)
    assert_close(outs[1], outs[0], 1e-9, 1e-9, "exported output")
    # (training: batch statistics over 2x1x1 values in layer4, a backward that amplifies
    # the fused and the standard ops' different summation orders to ~1e-8 in fp64)
    assert_close(grads[1], grads[0], 1e-7 * grads[0].abs().max().item(), 1e-7, "exported input gradient")


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
def test_unfolded_model_exports_to_onnx_and_matches(which):
    from onnx.reference import ReferenceEvaluator

    model = (_resnet() if which == "resnet" else _densenet()).eval()
    x = torch.randn(2, 3, 32, 32)
    proto = torch.onnx.export(model, (x,), dynamo=True).model_proto
    out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    assert_close(torch.from_numpy(out), model(x), 1e-5, 1e-5, "onnx output")
