"""channels_last end to end: every fused module's output keeps the input's memory format,
and no copy converts between NCHW and channels_last, forward or backward (the fused
ResNet blocks on the library convolutions copy nothing at all; on the Triton convolutions
they copy only weights, into the GEMM's K-major layout)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import resfused
from utils import backend_cases, case_id, interpreted

CASES = [c for c in backend_cases() if not interpreted(*c)]
# (not FusedDenseLayer: here every one is inside a FusedDenseBlock, and a hook on a module
# inside a fused block makes that block run torchvision's forward, so its hooks fire)
FUSED = (resfused.FusedBottleneck, resfused.FusedBasicBlock, resfused.FusedDenseBlock, resfused.nn.FusedTransition)


def _layout(t):
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        return None
    if t.is_contiguous(memory_format=torch.channels_last):  # first: [N, C, 1, 1] is both
        return "channels_last"
    if t.is_contiguous():
        return "nchw"
    return "strided"


class _CopyLog(TorchDispatchMode):
    """Records every copy-like aten op on 4-D tensors: (op, source layout, result layout)."""

    COPIES = ("aten.copy_", "aten.clone", "aten._to_copy", "aten.contiguous", "aten.cat")

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(self.COPIES):
            src = args[1] if name.startswith("aten.copy_") else args[0]
            dst = args[0] if name.startswith("aten.copy_") else out
            if _layout(src) is not None:
                self.copies.append((name, _layout(src), _layout(dst), tuple(src.shape)))
        return out


def _model(name):
    torch.manual_seed(0)
    if name == "resnet50":
        return resfused.models.resnet50(num_classes=10)
    if name == "resnet18":
        return resfused.models.resnet18(num_classes=10)
    return resfused.convert(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16,
                                                        bn_size=2, num_classes=10))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet"])
def test_channels_last_kept_without_layout_copies(case, name):
    backend, device = case
    model = _model(name).to(device).to(memory_format=torch.channels_last).train()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((type(mod).__name__, _layout(out))))
             for m in model.modules() if isinstance(m, FUSED)]
    x = torch.randn(2, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    log = _CopyLog()
    with resfused.use_backend(backend), resfused.use_conv("library"), log:
        model(x).sum().backward()
    for h in hooks:
        h.remove()
    assert seen, "no fused module ran"
    assert all(layout == "channels_last" for _, layout in seen), seen
    conversions = [c for c in log.copies if {c[1], c[2]} == {"nchw", "channels_last"}]
    assert not conversions, f"layout conversions: {conversions}"
    if name.startswith("resnet") and backend != "eager":
        # the fused blocks make no copy at all (the eager backend, the oracle, computes in
        # the accumulation dtype and casts back)
        assert not log.copies, f"copies in a fused ResNet: {log.copies}"


TRITON_DEVICES = [d for d in ("cpu", "cuda") if (d == "cuda" and torch.cuda.is_available()) or
                  (d == "cpu" and not resfused._backend.unavailable_reason("triton", torch.device("cpu")))]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_conv_path_keeps_channels_last_and_copies_only_weights(device):
    from torchvision.models.resnet import conv1x1

    torch.manual_seed(0)
    block = resfused.FusedBottleneck(8, 4, stride=2, downsample=torch.nn.Sequential(
        conv1x1(8, 16, 2), torch.nn.BatchNorm2d(16))).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 7, 6, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    log = _CopyLog()
    with resfused.use_conv("triton"), log:
        out = block(x)
        out.backward(torch.randn_like(out))  # channels_last, as the next layer's gradient is
    assert _layout(out) == "channels_last" and _layout(x.grad) == "channels_last"
    weights = [sorted(p.shape) for p in block.parameters() if p.dim() == 4]
    assert log.copies, "expected the weight repacks to be seen"
    others = [c for c in log.copies if sorted(c[3]) not in weights]
    assert not others, f"copies of activations on the Triton-conv path: {others}"
