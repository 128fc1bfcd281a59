"""FusedBottleneck / FusedBasicBlock against torchvision's blocks: outputs, input and
parameter gradients and running statistics, on every backend this machine runs."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import resfused
from resfused.memory import saved_bytes
from resfused.nn import FusedBasicBlock, FusedBottleneck
from utils import (DispatchLog, assert_close, backend_cases, case_id, check_no_grad_and_inference_mode,
                   gradcheck_module, interpreted, randomise_bns, run_against_reference)

CASES = backend_cases()
NATIVE_CASES = backend_cases(("cpu", "cuda"))  # the backends whose blocks run in resfused._C
KINDS = {"bottleneck": (Bottleneck, FusedBottleneck), "basic": (BasicBlock, FusedBasicBlock)}


class CustomDownsample(nn.Module):
    """A downsample the block does not fuse: runs eagerly, its output is the identity."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.conv = conv1x1(cin, cout)

    def forward(self, x):
        return self.conv(self.pool(x))


def make_pair(kind, inplanes, planes, stride, downsample, groups=1, base_width=64, dilation=1,
              memory_efficient=True):
    ref_cls, fused_cls = KINDS[kind]
    out_ch = planes * ref_cls.expansion

    def ds():
        if downsample == "standard":
            return nn.Sequential(conv1x1(inplanes, out_ch, stride), nn.BatchNorm2d(out_ch))
        if downsample == "custom":
            return CustomDownsample(inplanes, out_ch, stride)
        return None

    kw = dict(groups=groups, base_width=base_width, dilation=dilation) if kind == "bottleneck" else {}
    ref = ref_cls(inplanes, planes, stride, ds(), **kw)
    fused = fused_cls(inplanes, planes, stride, ds(), memory_efficient=memory_efficient, **kw)
    randomise_bns(ref)
    fused.load_state_dict(ref.state_dict())
    return ref.double(), fused


BLOCK_CONFIGS = [
    # kind, inplanes, planes, stride, downsample, groups, base_width, dilation
    ("bottleneck", 16, 4, 1, None, 1, 64, 1),
    ("bottleneck", 8, 4, 2, "standard", 1, 64, 1),
    ("bottleneck", 8, 8, 1, "standard", 2, 32, 1),      # groups (ResNeXt-style)
    ("bottleneck", 16, 4, 1, None, 1, 64, 2),            # dilation
    ("bottleneck", 8, 4, 2, "custom", 1, 64, 1),
    ("basic", 8, 8, 1, None, 1, 64, 1),
    ("basic", 8, 16, 2, "standard", 1, 64, 1),
    ("basic", 7, 5, 1, "standard", 1, 64, 1),            # odd channel counts
]


def _block_params():
    out = []
    for case in CASES:
        configs = BLOCK_CONFIGS[:2] + BLOCK_CONFIGS[5:7] if interpreted(*case) else BLOCK_CONFIGS
        for cfg, layout, training, me in itertools.product(configs, ["nchw", "channels_last"], [True, False],
                                                           [True, False]):
            if interpreted(*case) and not me and not training:
                continue  # the interpreter is slow; memory_efficient=False is covered in training
            out.append(pytest.param(case, cfg, layout, training, me,
                                    id=f"{case_id(case)}-{cfg[0]}-s{cfg[3]}-{cfg[4]}-g{cfg[5]}-d{cfg[7]}-{layout}"
                                       f"-tr{int(training)}-me{int(me)}"))
    return out


@pytest.mark.parametrize("case,cfg,layout,training,memory_efficient", _block_params())
def test_block_matches_torchvision(case, cfg, layout, training, memory_efficient):
    backend, device = case
    kind, inplanes, planes, stride, downsample, groups, base_width, dilation = cfg
    ref, fused = make_pair(kind, inplanes, planes, stride, downsample, groups, base_width, dilation,
                           memory_efficient)
    fused = fused.to(device).train(training)
    ref.train(training)
    x = torch.randn(2, inplanes, 7, 9, dtype=torch.float64) * 1.5 + 0.2
    run_against_reference(fused, ref, x, layout, device, backend)
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        scale = float(pr.grad.abs().max())
        assert_close(p.grad, pr.grad, 1e-4 * max(scale, 1.0), 1e-4, what=f"grad {name}")
    for (name, b), (_, br) in zip(fused.named_buffers(), ref.named_buffers()):
        if b.is_floating_point():
            assert_close(b, br, 1e-5, 1e-5, what=f"buffer {name}")
        else:
            assert torch.equal(b.cpu(), br), f"buffer {name}"


@pytest.mark.parametrize("case", [c for c in CASES if not interpreted(*c)], ids=case_id)
def test_gradcheck_bottleneck_with_downsample_stride2(case):
    """fp64 gradcheck of a whole block (the interpreter is too slow for a block's
    hundreds of kernel launches; its block results are checked against torchvision above)."""
    backend, device = case
    _, fused = make_pair("bottleneck", 4, 2, 2, "standard")
    fused = fused.double().to(device)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    gradcheck_module(fused, x, backend)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_running_stats_updated_once_and_no_grad_paths(case):
    backend, device = case
    ref, fused = make_pair("bottleneck", 8, 4, 2, "standard")
    fused = fused.to(device).train()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    check_no_grad_and_inference_mode(ref, fused, x, device, backend)
    with resfused.use_backend(backend):
        # frozen BN: parameters without grad, input without grad
        fused.train()
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
        out = fused(x.float().to(device))
        out.sum().backward()
        assert fused.conv1.weight.grad is not None
        assert fused.bn1.weight.grad is None


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cumulative_momentum_and_a_frozen_bn(case, monkeypatch):
    """The fused path's batch counting as torchvision's forward counts: a BN with
    momentum=None (the cumulative average, through num_batches_tracked) next to ones with
    a momentum, and a FrozenBatchNorm2d downsample BN (no batch counted, no momentum).
    Three steps: outputs, gradients and running statistics."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    backend, device = case
    ref, fused = make_pair("bottleneck", 8, 4, 2, "standard")
    fused = fused.double()
    for block in (ref, fused):
        block.bn2.momentum = None
        frozen = FrozenBatchNorm2d(16).double()
        frozen.load_state_dict({k: v for k, v in block.downsample[1].state_dict().items()
                                if k != "num_batches_tracked"})
        block.downsample[1] = frozen
    fused = fused.to(device).train()
    ref.train()
    import resfused.nn.block as nn_block
    calls = []
    fused_apply = nn_block.ResidualBlockFunction.apply
    monkeypatch.setattr(nn_block.ResidualBlockFunction, "apply", lambda *a: calls.append(1) or fused_apply(*a))
    for step in range(3):
        x = torch.randn(2, 8, 6, 6, dtype=torch.float64) + step
        with resfused.use_backend(backend):
            out = fused(x.to(device))
        expected = ref(x)
        assert_close(out, expected, 1e-9, 1e-9, what=f"step {step} output")
        out.sum().backward()
        expected.sum().backward()
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, pr.grad, 1e-8, 1e-8, what=f"grad {name}")
    for (name, b), (_, br) in zip(fused.named_buffers(), ref.named_buffers()):
        if b.is_floating_point():
            assert_close(b, br, 1e-9, 1e-9, what=f"buffer {name}")
        else:
            assert torch.equal(b.cpu(), br), f"buffer {name}"
    assert int(fused.bn2.num_batches_tracked) == 3
    assert len(calls) == 3, "the block ran torchvision's forward, not the fused one"


@pytest.mark.parametrize("bad", ["no_downsample", "no_downsample_stride2", "downsample_stride", "too_small",
                                 "empty_height", "one_value_inner", "one_value_downsample", "forced_backend",
                                 "conv_dtype", "bn_dtype", "bias_dtype", "bias_size", "bn_size", "eps_zero_training",
                                 "eps_negative_eval", "custom_downsample_stride"])
def test_misbuilt_block_raises_before_anything_moves(bad):
    """A block whose branches cannot be joined (built without the downsample it needs, or a
    downsample of the wrong stride), whose input is too small for its convolutions (an
    empty spatial size included), whose inner or downsample BN would see one value per
    channel in training (torchvision's error), whose convs or BNs do not fit (a dtype, a
    bias or BN buffer of the wrong size, an eps ``F.batch_norm`` refuses: zero in training,
    negative in eval), or forced onto a backend that cannot run raises a clear error naming
    the block before any running statistic moves."""
    misfits = {"conv_dtype": (TypeError, "conv2's weight dtype torch.float64"),
               "bn_dtype": (TypeError, "bn2's tensors are torch.float64 but the block runs in torch.float32"),
               "bias_dtype": (TypeError, "conv2's bias dtype torch.float64"),
               "bias_size": (ValueError, r"conv2's bias must have one value per output channel \(4\), got shape \(3,\)"),
               "bn_size": (ValueError, r"bn3's weight, bias and running statistics must have one value per channel "
                                       r"\(16\), got shape \(15,\)"),
               "eps_zero_training": (ValueError, r"bn2.eps must be positive when normalising with batch statistics"),
               "eps_negative_eval": (ValueError, r"bn2.eps must be non-negative, got -0.001")}
    if bad in misfits:
        block = FusedBottleneck(16, 4).train()
        if bad in ("conv_dtype", "bn_dtype"):
            (block.conv2 if bad == "conv_dtype" else block.bn2).double()
        elif bad.startswith("bias"):
            block.conv2.bias = nn.Parameter(torch.zeros(4 if bad == "bias_dtype" else 3,
                                                        dtype=torch.float64 if bad == "bias_dtype" else None))
        elif bad == "bn_size":
            block.bn3.running_mean = torch.zeros(15)
        else:
            block.bn2.eps = 0.0 if bad == "eps_zero_training" else -1e-3
            block.train(bad == "eps_zero_training")
        before = {k: v.clone() for k, v in block.state_dict().items()}
        exc, text = misfits[bad]
        with pytest.raises(exc, match=r"FusedBottleneck\(in_channels=16, .*" + text):
            block(torch.randn(2, 16, 5, 5))
        for k, v in block.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a call that raised"
        return
    if bad == "custom_downsample_stride":  # (runs eagerly before the join's check: its BN is put back)
        ds = nn.Sequential(conv1x1(8, 16, 1), nn.BatchNorm2d(16), nn.Identity())
        block = FusedBottleneck(8, 4, stride=2, downsample=ds).train()
        before = {k: v.clone() for k, v in block.state_dict().items()}
        with pytest.raises(ValueError, match="the identity branch gives shape"):
            block(torch.randn(2, 8, 5, 5))
        for k, v in block.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a call that raised"
        return
    if bad == "forced_backend":
        block = FusedBasicBlock(8, 8).train()
        before = {k: v.clone() for k, v in block.state_dict().items()}
        with pytest.raises(RuntimeError, match="backend 'cuda' was forced but cannot run"), \
                resfused.use_backend("cuda"):  # (a CPU tensor, on any machine)
            block(torch.randn(2, 8, 5, 5))
        for k, v in block.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a call that raised"
        return
    if bad.startswith("one_value"):  # N=1 and a 2x2 input: conv2 (stride 2) gives 1x1 at bn2
        ds = nn.Sequential(conv1x1(16, 16, 2), nn.BatchNorm2d(16))
        block, x = FusedBottleneck(16, 4, stride=2, downsample=ds), torch.randn(1, 16, 2, 2)
        if bad == "one_value_inner":
            block.train()
        else:  # only the downsample's BN normalises with batch statistics
            block.eval()
            block.downsample[1].train()
        text = "expected more than 1 value per channel when training, got input size " + \
            (r"\(1, 4, 1, 1\) at bn2" if bad == "one_value_inner" else r"\(1, 16, 1, 1\) at downsample.1")
        before = {k: v.clone() for k, v in block.state_dict().items()}
        with pytest.raises(ValueError, match=r"FusedBottleneck\(in_channels=16, .*" + text):
            block(x)
        for k, v in block.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a call that raised"
        return
    if bad == "empty_height":
        block, x = FusedBottleneck(16, 4), torch.randn(2, 16, 0, 5)
    elif bad == "no_downsample":
        block, x = FusedBottleneck(16, 8), torch.randn(2, 16, 5, 5)
    elif bad == "no_downsample_stride2":
        block, x = FusedBasicBlock(8, 8, stride=2), torch.randn(2, 8, 5, 5)
    elif bad == "downsample_stride":
        block = FusedBottleneck(8, 4, stride=2, downsample=nn.Sequential(conv1x1(8, 16, 1), nn.BatchNorm2d(16)))
        x = torch.randn(2, 8, 5, 5)
    else:
        block, x = FusedBasicBlock(4, 4), torch.randn(2, 4, 2, 2)
        block.conv1.padding = (0, 0)
    block.train()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    text = "too small" if bad in ("too_small", "empty_height") else \
        "the identity branch gives shape .* needs a downsample"
    with pytest.raises(ValueError, match=type(block).__name__ + r"\(in_channels=.*" + text):
        block(x)
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a call that raised"


def test_block_function_takes_an_identity_or_a_fused_downsample_not_both(monkeypatch):
    """ResidualBlockFunction refuses both an identity tensor and a fused downsample branch
    (the join adds one of them; the other would get a wrong gradient), before any
    running statistic moves."""
    from resfused.autograd.block import ResidualBlockFunction

    _, fused = make_pair("bottleneck", 8, 4, 2, "standard")
    fused = fused.float().train()
    real = ResidualBlockFunction.apply
    monkeypatch.setattr(ResidualBlockFunction, "apply",
                        lambda spec, x, identity, *t: real(spec, x, torch.zeros(2, 16, 3, 3), *t))
    stats = {k: v.clone() for k, v in fused.state_dict().items() if "running" in k}
    with pytest.raises(ValueError, match="either an identity tensor or a fused downsample"):
        fused(torch.randn(2, 8, 5, 5))
    for k, v in stats.items():
        assert torch.equal(fused.state_dict()[k], v), f"{k} changed by a call that raised"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind,stride", [("bottleneck", 2), ("basic", 2), ("bottleneck", 3)])
def test_cpu_strided_downsample_backward_runs_on_its_grid(kind, stride, layout):
    """On the CPU a strided 1x1 downsample's backward is the stride-1 backward of
    x[:, :, ::s, ::s] (oneDNN's strided one is slower), its input gradient added into that
    grid of conv1's: no strided 1x1 reaches convolution_backward, and the gradients are
    torchvision's (odd sizes: the grid's last row and column are the input's)."""
    ref, fused = make_pair(kind, 6, 4, stride, "standard")
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    run_against_reference(fused.train(), ref.train(), x, layout, "cpu", "cpu")
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, pr.grad, 1e-4 * max(float(pr.grad.abs().max()), 1.0), 1e-4, what=f"grad {name}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = fused(x.to(fused.conv1.weight.dtype).to(memory_format=fmt).requires_grad_())
    with DispatchLog() as log:
        out.backward(torch.ones_like(out))
    seen = [(tuple(a[2].shape[-2:]), tuple(a[4]), tuple(a[1].shape))
            for op, a in log.calls if op == "aten.convolution_backward"]
    grid = (2, 6, len(range(0, 9, stride)), len(range(0, 7, stride)))
    assert ((1, 1), (1, 1), grid) in seen, seen
    assert all(s == (1, 1) for k, s, _ in seen if k == (1, 1)), seen


def test_saved_bytes_below_torchvision():
    """Memory-efficient blocks keep x, the pre-BN conv outputs and per-channel stats only."""
    torch.manual_seed(0)
    ref, fused = make_pair("bottleneck", 32, 8, 1, None)
    ref = ref.float()
    _, keep = make_pair("bottleneck", 32, 8, 1, None, memory_efficient=False)
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    params = list(ref.parameters()) + list(fused.parameters()) + list(keep.parameters())
    eager = saved_bytes(lambda: ref(x), params)
    mine = saved_bytes(lambda: fused(x), params)
    kept = saved_bytes(lambda: keep(x), params)
    # eager keeps x, y1, a1, y2, a2, y3, out; memory-efficient keeps x, y1, y2, y3, out and
    # per-channel statistics (a few hundred bytes); memory_efficient=False also keeps a1, a2.
    act = 4 * 8 * 16 * 16 * 4
    assert eager - mine == 2 * act, f"eager {eager} B, fused {mine} B"
    assert 0 <= kept - mine - 2 * act < 1024, f"memory_efficient=False {kept} B vs {mine} B"


@pytest.mark.parametrize("bad", ["channels", "ndim", "device", "dtype"])
def test_block_rejects_bad_input_and_changes_nothing(bad):
    _, fused = make_pair("bottleneck", 8, 4, 2, "standard")
    fused.train()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    x = {"channels": torch.randn(2, 6, 5, 5), "ndim": torch.randn(8, 5, 5),
         "device": torch.randn(2, 8, 5, 5, device="meta"), "dtype": torch.randn(2, 8, 5, 5, dtype=torch.float64)}[bad]
    exc = {"channels": ValueError, "ndim": ValueError, "device": RuntimeError, "dtype": TypeError}[bad]
    text = {"channels": r"FusedBottleneck\(in_channels=8, out_channels=16, stride=2\): expected input of shape "
                        r"\[N, 8, H, W\]",
            "ndim": r"expected 4-D input \[N, 8, H, W\]", "device": "input is on meta",
            "dtype": "input dtype torch.float64"}[bad]
    with pytest.raises(exc, match=text):
        fused(x)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a call that raised"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("cpu", "cuda")], ids=case_id)
def test_block_forward_launches(case):
    """A training Bottleneck with its downsample: four convolutions, per BN the statistics
    pass, the coefficient op and (fused into the join for the last two) the apply pass,
    and one increment for all four batch counters (a launch each on a GPU, paid in host time)."""
    backend, device = case
    _, fused = make_pair("bottleneck", 8, 4, 2, "standard")
    fused = fused.float().to(device).train()
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    with resfused.use_backend(backend), DispatchLog() as log:
        fused(x)
    counts = {op: log.ops.count(op) for op in set(log.ops)}
    assert counts == {"aten._foreach_add_": 1, "aten.convolution": 4, "resfused_C.bn_stats": 4,
                      "resfused_C.bn_coef": 4, "resfused_C.bn_act_fwd": 3}, log.ops
    assert all(int(m.num_batches_tracked) == 1 for m in fused.modules() if isinstance(m, nn.BatchNorm2d))


def test_batch_counting_matches_separate_calls():
    """advance_batch_norms (one increment for a block's counters) gives each BN the
    momentum and count that calling it on its own would: a cumulative one (momentum=None)
    read after its own increment, a BN standing twice counting two batches with 1/(n+1)
    then 1/(n+2), a frozen BN and an eval BN counting none."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from resfused.nn.bn_act import advance_batch_norms

    cum, fixed, frozen, evaluated = nn.BatchNorm2d(3, momentum=None), nn.BatchNorm2d(3), FrozenBatchNorm2d(3), \
        nn.BatchNorm2d(3, momentum=None).eval()
    assert advance_batch_norms([cum, fixed, frozen, evaluated]) == [1.0, 0.1, 0.0, 0.0]
    assert advance_batch_norms([cum, cum, fixed]) == [1 / 2, 1 / 3, 0.1]
    assert [int(cum.num_batches_tracked), int(fixed.num_batches_tracked), int(evaluated.num_batches_tracked)] == \
        [3, 2, 0]


def _block_step(fused, x, ones_grad=True):
    """Output, input gradient, parameter gradients and state of one forward+backward."""
    fused.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(x.requires_grad)
    out = fused(xi)
    if out.requires_grad:
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape))
    grads = {n: p.grad for n, p in fused.named_parameters()}
    return out, xi.grad, grads, {k: v.clone() for k, v in fused.state_dict().items()}


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
@pytest.mark.parametrize("cfg", BLOCK_CONFIGS, ids=lambda c: f"{c[0]}-s{c[3]}-{c[4]}-g{c[5]}-d{c[7]}")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval", "frozen", "keep", "no_x_grad", "bf16", "conv_bias"])
def test_native_block_matches_the_python_path(monkeypatch, case, cfg, layout, mode):
    """On the cpu and cuda backends a block's forward and backward run as one call each of
    resfused_C.block_fwd / block_bwd (csrc/block.cpp): the same ops in the same order as
    the Python path (with the composites off), so outputs, gradients and running
    statistics are bit for bit the same (deterministic convolutions on a GPU);
    memory_efficient=False keeps the activations, frozen BNs (no parameter gradient), an
    input that does not require grad, and bfloat16 (BN parameters in bfloat16 too: their
    gradients take that dtype), and convolutions with a bias."""
    backend, device = case
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    from resfused.autograd import bn_act as autograd_bn_act
    from resfused.autograd import block as autograd_block

    kind, inplanes, planes, stride, ds, groups, base_width, dilation = cfg
    _, fused = make_pair(kind, inplanes, planes, stride, ds, groups, base_width, dilation,
                         memory_efficient=mode != "keep")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float64
    fused = fused.to(device, dtype).train(mode != "eval")
    if mode == "frozen":
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
    if mode == "conv_bias":
        for m in fused.modules():
            if isinstance(m, nn.Conv2d):
                m.bias = nn.Parameter(torch.randn(m.out_channels, dtype=dtype, device=device))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, inplanes, 7, 6, dtype=dtype).to(device, memory_format=fmt).requires_grad_(mode != "no_x_grad")
    python_block = copy.deepcopy(fused)
    calls = []
    real_fwd, real_bwd = autograd_block._native_forward, autograd_block._native_backward
    monkeypatch.setattr(autograd_block, "_native_forward", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(autograd_block, "_native_backward", lambda *a: calls.append("bwd") or real_bwd(*a))
    with resfused.use_backend(backend):
        native = _block_step(fused, x)
        assert calls == ["fwd", "bwd"], calls
        monkeypatch.setattr(autograd_bn_act, "_COMPOSITE_BACKENDS", ())
        python = _block_step(python_block, x)
        assert calls == ["fwd", "bwd"], calls
    (out_n, dx_n, g_n, s_n), (out_p, dx_p, g_p, s_p) = native, python
    assert out_n.dtype == dtype and out_n.is_contiguous(memory_format=fmt)
    assert torch.equal(out_n, out_p)
    assert (dx_n is None) == (dx_p is None) == (mode == "no_x_grad")
    assert dx_n is None or torch.equal(dx_n, dx_p)
    assert g_n.keys() == g_p.keys()
    for name in g_n:
        assert (g_n[name] is None) == (g_p[name] is None), name
        if g_n[name] is not None:
            assert g_n[name].dtype == g_p[name].dtype == dtype, name
            assert torch.equal(g_n[name], g_p[name]), name
    for k in s_n:
        assert torch.equal(s_n[k], s_p[k]), k


def test_native_block_takes_a_spec_built_with_lists(monkeypatch):
    """A ConvSpec built with lists (unhashable) runs the native block as a tuple-built one
    does, with the same result (its arguments are then worked out per call, not remembered)."""
    from resfused.autograd.block import ConvSpec, ResidualBlockFunction

    _, fused = make_pair("bottleneck", 8, 4, 2, "standard")
    fused = fused.float().train()
    x = torch.randn(2, 8, 5, 5)
    real = ResidualBlockFunction.apply
    listed = lambda spec: spec._replace(  # noqa: E731
        convs=tuple(ConvSpec(list(c.stride), list(c.padding), list(c.dilation), c.groups) for c in spec.convs))
    outs = []
    for make in (lambda spec: spec, listed):
        block = copy.deepcopy(fused)
        monkeypatch.setattr(ResidualBlockFunction, "apply", lambda spec, *a: real(make(spec), *a))
        with resfused.use_backend("cpu"):
            outs.append((block(x), {k: v.clone() for k, v in block.state_dict().items()}))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(v, outs[1][1][k]) for k, v in outs[0][1].items())
