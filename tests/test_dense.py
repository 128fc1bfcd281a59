"""FusedDenseBlock / FusedDenseLayer / FusedTransition and the fused DenseNets against
torchvision's: outputs, input and parameter gradients and running statistics, on every
backend this machine runs; gradcheck; dropout; bad input; saved bytes."""
from __future__ import annotations

import itertools
import re

import pytest
import torch
import torchvision
from torchvision.models.densenet import _DenseBlock, _DenseLayer, _Transition

import resfused
from resfused.memory import model_saved_bytes, saved_bytes
from resfused.nn import FusedDenseBlock, FusedDenseLayer, FusedTransition
from utils import (DispatchLog, assert_close, backend_cases, case_id, check_no_grad_and_inference_mode, gradcheck_module,
                   interpreted, paired_for_sgd, randomise_bns, rel_tol, run_against_reference,
                   sgd_step_against_reference)

CASES = backend_cases()
NATIVE = [c for c in CASES if not interpreted(*c)]


def make_block_pair(num_layers=3, c0=5, bn_size=2, growth=3, drop_rate=0.0, ref_memory_efficient=False):
    ref = randomise_bns(_DenseBlock(num_layers, c0, bn_size, growth, drop_rate, ref_memory_efficient))
    fused = FusedDenseBlock(num_layers, c0, bn_size, growth, drop_rate)
    fused.load_state_dict(ref.state_dict())
    return ref.double(), fused


_NORM1 = re.compile(r"(^|\.)denselayer\d+\.norm1\.")


def _checkpointed_norm1(name: str, b: torch.Tensor, br: torch.Tensor, ref_me: bool) -> bool:
    """torchvision's memory_efficient=True recomputes norm1 under checkpointing in backward,
    so its norm1 running statistics are updated twice per training step (ours: once, as its
    memory_efficient=False does; checked in the ref_me=False cases). Those buffers are not
    compared; their batch counts document the double update."""
    if not (ref_me and _NORM1.search(name)):
        return False
    if not b.is_floating_point():
        assert int(br) == 2 * int(b), f"{name}: torchvision checkpointing counts {int(br)}, we count {int(b)}"
    return True


def _compare_modules(fused, ref, what, fwd_tol=1e-5, bwd_tol=1e-4, ref_me=False):
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        scale = float(pr.grad.abs().max())
        assert_close(p.grad, pr.grad, bwd_tol * max(scale, 1.0), bwd_tol, what=f"{what} grad {name}")
    for (name, b), (_, br) in zip(fused.named_buffers(), ref.named_buffers()):
        if _checkpointed_norm1(name, b, br, ref_me):
            continue
        if b.is_floating_point():
            assert_close(b, br, fwd_tol, fwd_tol, what=f"{what} buffer {name}")
        else:
            assert torch.equal(b.cpu(), br.cpu()), f"{what} buffer {name}: {b} != {br}"


def _block_params():
    out = []
    for case in CASES:
        if interpreted(*case):  # the interpreter is slow: one small block, two settings
            out.append(pytest.param(case, "nchw", True, False, id=f"{case_id(case)}-nchw-tr1-refme0"))
            out.append(pytest.param(case, "channels_last", False, False,
                                    id=f"{case_id(case)}-channels_last-tr0-refme0"))
            continue
        for layout, training, ref_me in itertools.product(["nchw", "channels_last"], [True, False], [False, True]):
            out.append(pytest.param(case, layout, training, ref_me,
                                    id=f"{case_id(case)}-{layout}-tr{int(training)}-refme{int(ref_me)}"))
    return out


@pytest.mark.parametrize("case,layout,training,ref_me", _block_params())
def test_block_matches_torchvision(case, layout, training, ref_me):
    backend, device = case
    ref, fused = make_block_pair(ref_memory_efficient=ref_me)
    fused = fused.to(device).train(training)
    ref.train(training)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64) * 1.5 + 0.2
    run_against_reference(fused, ref, x, layout, device, backend)
    _compare_modules(fused, ref, "block", ref_me=ref_me)


@pytest.mark.parametrize("case", NATIVE, ids=case_id)
@pytest.mark.parametrize("shape,layout", [((3, 5, 5), "nchw"), ((1, 4, 3), "channels_last"),
                                          ((3, 1, 1), "channels_last"), ((2, 1, 4), "nchw")],
                         ids=["n3-5x5-nchw", "n1-4x3-cl", "n3-1x1-cl", "n2-1x4-nchw"])
def test_block_fp64_exact_and_running_stats_once(case, shape, layout):
    """In float64 the fused block equals torchvision's to rounding (the statistics cache
    computes each channel's stats once, on the channel as written, not on the concatenation);
    N = 1 and 1x1 maps (layouts that are NCHW and channels_last at once) included."""
    backend, device = case
    n, h, w = shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ref, fused = make_block_pair(num_layers=4, c0=6, growth=4)
    fused = fused.double().to(device).train()
    momentum_none = fused.denselayer2.norm1
    momentum_none.momentum = None
    ref.denselayer2.norm1.momentum = None
    with resfused.use_backend(backend):
        for _ in range(2):
            x = torch.randn(n, 6, h, w, dtype=torch.float64).contiguous(memory_format=fmt)
            xo = x.clone().to(device).requires_grad_()
            xr = x.clone().requires_grad_()
            out, expected = fused(xo), ref(xr)
            assert_close(out, expected, 1e-12, 1e-12, what="fp64 output")
            g = torch.randn_like(expected)
            out.backward(g.to(device))
            expected.backward(g)
            assert_close(xo.grad, xr.grad, 1e-11, 1e-11, what="fp64 grad x")
    _compare_modules(fused, ref, "fp64", fwd_tol=1e-12, bwd_tol=1e-10)
    assert int(fused.denselayer1.norm1.num_batches_tracked) == 2, "each BN counts each forward once"


@pytest.mark.parametrize("case", NATIVE, ids=case_id)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_three_layer_block(case, training):
    backend, device = case
    _, fused = make_block_pair(num_layers=3, c0=3, bn_size=2, growth=2)
    fused = fused.double().to(device).train(training)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    gradcheck_module(fused, x, backend)


@pytest.mark.parametrize("case", NATIVE, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dropout_matches_torchvision(case, layout):
    """Dropout on the new features, torchvision's semantics and its random stream: same
    seed, same mask (torchvision runs on the same device: a CUDA generator draws other
    numbers than the CPU one); backward applies the mask kept from forward."""
    backend, device = case
    ref, fused = make_block_pair(num_layers=3, drop_rate=0.4)
    ref = ref.to(device)
    fused = fused.double().to(device).train()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    xo = x.clone().to(device).contiguous(memory_format=fmt).requires_grad_()
    xr = x.clone().to(device).contiguous(memory_format=fmt).requires_grad_()
    with resfused.use_backend(backend):
        torch.manual_seed(7)
        out = fused(xo)
    torch.manual_seed(7)
    expected = ref(xr)
    assert_close(out, expected, 1e-12, 1e-12, what="dropout output")
    assert float((out[:, 5:] == 0).double().mean()) > 0.2, "dropout dropped nothing"
    g = torch.randn_like(expected)
    out.backward(g.to(device))
    expected.backward(g)
    assert_close(xo.grad, xr.grad, 1e-11, 1e-11, what="dropout grad x")
    _compare_modules(fused, ref, "dropout", fwd_tol=1e-12, bwd_tol=1e-10)
    # eval: no dropout
    fused.eval()
    ref.eval()
    with torch.no_grad(), resfused.use_backend(backend):
        assert_close(fused(xo), ref(xr), 1e-12, 1e-12, what="dropout eval output")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_grad_and_inference_mode(case):
    backend, device = case
    ref, fused = make_block_pair()
    fused = fused.to(device).train()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    check_no_grad_and_inference_mode(ref, fused, x, device, backend)


@pytest.mark.parametrize("case", NATIVE, ids=case_id)
@pytest.mark.parametrize("training", [True, False])
def test_layer_and_transition_match_torchvision(case, training):
    """A standalone FusedDenseLayer (Tensor or list input) and FusedTransition."""
    backend, device = case
    ref = randomise_bns(_DenseLayer(7, 3, 2, 0.0)).double().train(training)
    layer = FusedDenseLayer(7, 3, 2, 0.0)
    layer.load_state_dict(ref.state_dict())
    layer = layer.double().to(device).train(training)
    a, b = torch.randn(2, 4, 5, 6, dtype=torch.float64), torch.randn(2, 3, 5, 6, dtype=torch.float64)
    ao, bo = a.clone().to(device).requires_grad_(), b.clone().to(device).requires_grad_()
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    with resfused.use_backend(backend):
        out = layer([ao, bo])
    expected = ref([ar, br])
    assert_close(out, expected, 1e-12, 1e-12, what="layer output")
    g = torch.randn_like(expected)
    out.backward(g.to(device))
    expected.backward(g)
    assert_close(ao.grad, ar.grad, 1e-11, 1e-11, what="layer grad a")
    assert_close(bo.grad, br.grad, 1e-11, 1e-11, what="layer grad b")
    _compare_modules(layer, ref, "layer", fwd_tol=1e-12, bwd_tol=1e-10)

    tref = randomise_bns(_Transition(8, 4)).double().train(training)
    trans = FusedTransition(8, 4)
    trans.load_state_dict(tref.state_dict())
    trans = trans.double().to(device).train(training)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)  # odd sizes: the pool drops a row/column
    xo, xr = x.clone().to(device).requires_grad_(), x.clone().requires_grad_()
    with resfused.use_backend(backend):
        out = trans(xo)
    expected = tref(xr)
    assert_close(out, expected, 1e-12, 1e-12, what="transition output")
    g = torch.randn_like(expected)
    out.backward(g.to(device))
    expected.backward(g)
    assert_close(xo.grad, xr.grad, 1e-11, 1e-11, what="transition grad x")
    _compare_modules(trans, tref, "transition", fwd_tol=1e-12, bwd_tol=1e-10)


# (backend, layout, torchvision's memory_efficient): every backend meets both torchvision modes
# and both layouts without running the whole product (each case is a densenet121 in fp64).
MODEL_CASES = [(b, d, layout, me) for (b, d) in NATIVE if b in ("cpu", "eager")
               for layout, me in ([("nchw", False), ("channels_last", True)] if b == "cpu"
                                  else [("nchw", True), ("channels_last", False)])]


@pytest.mark.parametrize("backend,device,layout,ref_me", MODEL_CASES,
                         ids=[f"{b}-{d}-{lay}-refme{int(me)}" for b, d, lay, me in MODEL_CASES])
def test_densenet121_matches_torchvision_over_sgd_steps(backend, device, layout, ref_me):
    """Same state_dict; 3 SGD steps in training (outputs, input and parameter gradients,
    running statistics compared at every step), then eval; both in float64, tolerances
    relative to each tensor's largest value (see test_models.py)."""
    torch.manual_seed(0)
    ref = randomise_bns(torchvision.models.densenet121(num_classes=10, memory_efficient=ref_me), bias=0.2,
                        running_stats=False).double()
    mine = resfused.models.densenet121(num_classes=10).double()
    mine, fmt, opt_ref, opt_mine = paired_for_sgd(ref, mine, device, layout)
    with resfused.use_backend(backend):
        for step in range(4):
            sgd_step_against_reference(ref, mine, opt_ref, opt_mine, step < 3, device, fmt, f"step {step}")
            for (bn_name, b), (_, br) in zip(mine.named_buffers(), ref.named_buffers()):
                if _checkpointed_norm1(bn_name, b, br, ref_me):
                    if step == 2 and b.is_floating_point():  # eval then uses the same statistics in both
                        with torch.no_grad():
                            b.copy_(br)
                    continue
                if b.is_floating_point():
                    assert_close(b, br, *rel_tol(br, 1e-5), what=f"step {step} buffer {bn_name}")
                else:
                    assert torch.equal(b.cpu(), br), f"step {step} {bn_name}: {b} != {br}"


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_every_densenet_builder_has_torchvisions_keys(name):
    tv = getattr(torchvision.models, name)()
    model = getattr(resfused.models, name)()
    assert list(model.state_dict()) == list(tv.state_dict())
    assert all(type(m) in (FusedDenseBlock, FusedDenseLayer, FusedTransition)
               for m in model.modules() if isinstance(m, (_DenseBlock, _DenseLayer, _Transition)))
    model.load_state_dict(tv.state_dict())
    tv.load_state_dict(model.state_dict())


def test_builder_arguments_pass_through_and_convert_revert_round_trip():
    m = resfused.models.densenet121(bn_size=2, drop_rate=0.1, num_classes=7, memory_efficient=True)
    assert m.features.denseblock2.denselayer1.drop_rate == 0.1 and m.classifier.out_features == 7
    assert m.features.denseblock1.denselayer1.conv1.out_channels == 64
    assert m.features.denseblock1.denselayer1.memory_efficient is True  # torchvision's attribute, untouched
    torch.manual_seed(0)
    model = randomise_bns(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3, 2, 2),
                                                      num_init_features=16, num_classes=5),
                          bias=0.2, running_stats=False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert resfused.convert(model) is model
    assert type(model.features.denseblock1) is FusedDenseBlock
    assert type(model.features.transition1) is FusedTransition
    assert not model.training and not model.features.denseblock1.denselayer1.training
    with torch.no_grad():
        assert_close(model(x), expected, 1e-5, 1e-5, what="converted output")
    assert resfused.revert(model) is model
    assert type(model.features.denseblock1) is _DenseBlock
    assert type(model.features.denseblock1.denselayer1) is _DenseLayer
    assert type(model.features.transition1) is _Transition
    assert model.features.denseblock1.denselayer1.memory_efficient is False
    with torch.no_grad():
        assert_close(model(x), expected, 0, 0, what="reverted output")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_block_saved_bytes_are_the_buffer_y1_and_per_channel_tensors():
    """The node keeps the feature buffer (the block output), each layer's conv1 output and
    per-channel statistics — nothing of the norm1 scratch or relu2."""
    _, fused = make_block_pair(num_layers=4, c0=8, bn_size=4, growth=4)
    fused.train()
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    got = saved_bytes(lambda: fused(x), list(fused.parameters()))
    plane = 2 * 10 * 10 * 4
    expected = plane * (8 + 4 * 4) + 4 * plane * 16  # buffer + four y1 (bn_size * growth = 16 channels)
    assert 0 <= got - expected < 4096, f"saved {got} B, expected {expected} B + per-channel tensors"


def test_densenet121_saved_bytes_below_torchvision():
    """DESIGN.md §6 measure, the issue's setting: densenet121, batch 4, 224x224, fp32, training:
    at most 0.30x torchvision's eager model and below its memory_efficient=True (checkpointing)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    eager = model_saved_bytes(torchvision.models.densenet121().train(), x)
    checkpointed = model_saved_bytes(torchvision.models.densenet121(memory_efficient=True).train(), x)
    mine = model_saved_bytes(resfused.models.densenet121().train(), x)
    mib = 2 ** 20
    msg = (f"resfused {mine / mib:.1f} MiB, torchvision {eager / mib:.1f} MiB, "
           f"torchvision memory_efficient {checkpointed / mib:.1f} MiB")
    assert mine <= 0.30 * eager, msg
    assert mine < checkpointed, msg


@pytest.mark.parametrize("which,bad", [(which, bad) for which in ("block", "layer", "transition")
                                       for bad in ("channels", "ndim", "device", "dtype", "single_value",
                                                   "empty_height", "empty_width")]
                         + [("block", "layer_dtype"), ("block", "norm_dtype"), ("transition", "pool_too_small"),
                            ("block", "norm_eps"), ("transition", "norm_eps"), ("block", "norm_size"),
                            ("transition", "bias_size")])
def test_rejects_bad_input_and_changes_nothing(which, bad):
    if which == "block":
        _, module = make_block_pair(num_layers=2, c0=8)
        name = r"FusedDenseBlock\(num_layers=2, num_input_features=8, growth_rate=3\)\.denselayer1"
    elif which == "layer":
        module = FusedDenseLayer(8, 3, 2, 0.0)
        name = r"FusedDenseLayer\(num_input_features=8, growth_rate=3\)"
    else:
        module = FusedTransition(8, 4)
        name = r"FusedTransition\(num_input_features=8, num_output_features=4\)"
    module.train()
    if bad == "layer_dtype":
        module.denselayer2.conv1.double()
    if bad == "norm_dtype":
        module.denselayer2.norm1.double()
    if bad == "norm_eps":  # F.batch_norm's rule: positive in training
        (module.denselayer2.norm2 if which == "block" else module.norm).eps = 0.0
    if bad == "norm_size":
        module.denselayer2.norm1.running_var = torch.ones(10)
    if bad == "bias_size":
        module.conv.bias = torch.nn.Parameter(torch.zeros(3))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = {"channels": torch.randn(2, 6, 5, 5), "ndim": torch.randn(8, 5, 5),
         "device": torch.randn(2, 8, 5, 5, device="meta"), "dtype": torch.randn(2, 8, 5, 5, dtype=torch.float64),
         "single_value": torch.randn(1, 8, 1, 1), "empty_height": torch.randn(2, 8, 0, 5),
         "empty_width": torch.randn(2, 8, 5, 0), "layer_dtype": torch.randn(2, 8, 5, 5),
         "norm_dtype": torch.randn(2, 8, 5, 5), "norm_eps": torch.randn(2, 8, 5, 5),
         "norm_size": torch.randn(2, 8, 5, 5), "bias_size": torch.randn(2, 8, 5, 5),
         "pool_too_small": torch.randn(2, 8, 1, 4)}[bad]
    exc = {"channels": ValueError, "ndim": ValueError, "device": RuntimeError, "dtype": TypeError,
           "single_value": ValueError, "empty_height": ValueError, "empty_width": ValueError,
           "layer_dtype": TypeError, "norm_dtype": TypeError, "pool_too_small": ValueError, "norm_eps": ValueError,
           "norm_size": ValueError, "bias_size": ValueError}[bad]
    text = {"channels": r": expected input of shape \[N, 8, H, W\]", "ndim": r": expected 4-D input \[N, 8, H, W\]",
            "device": ": input is on meta", "dtype": ": input dtype torch.float64",
            "single_value": ": expected more than 1 value per channel",
            "empty_height": r": input of spatial size \(0, 5\) is too small",
            "empty_width": r": input of spatial size \(5, 0\) is too small",
            "layer_dtype": r": input dtype torch.float32 does not match denselayer2.conv1's weight dtype "
                           r"torch.float64",
            "norm_dtype": r": denselayer2.norm1's tensors are torch.float64 but the block runs in torch.float32",
            "pool_too_small": r": input of spatial size \(1, 4\) is too small for the transition's average pool",
            "norm_eps": (r": denselayer2.norm2.eps" if which == "block" else r": norm.eps") +
                        r" must be positive when normalising with batch statistics \(training\), got 0.0",
            "norm_size": r": denselayer2.norm1's weight, bias and running statistics must have one value per "
                         r"channel \(11\), got shape \(10,\)",
            "bias_size": r": conv's bias must have one value per output channel \(4\), got shape \(3,\)"}[bad]
    with pytest.raises(exc, match=name + text):
        module(x)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a call that raised"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_layers_read_their_prefix_in_place(case, layout, monkeypatch):
    """Each layer's BN kernels get its channel prefix of the feature buffer as the view
    itself, forward and backward, and no scratch is gathered, on every backend whose
    kernels read such views: cpu and cuda (whose blocks run in C++, which hands the views
    to the kernels: cuda's here have C a multiple of 16 bytes) and triton (through the
    Python op layer); the eager backend gathers into one scratch per block."""
    from resfused.autograd import dense as D
    from resfused.ops import bn_act as ops

    backend, device = case
    block = FusedDenseBlock(3, 8, 2, 4, 0.0).to(device)  # prefixes of 8, 12 and 16 channels
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 8, 5, 3, device=device).contiguous(memory_format=fmt).requires_grad_()
    scratches, handed = [], []
    prefix_scratch, kernel_x = D._prefix_scratch, ops._kernel_x
    monkeypatch.setattr(D, "_prefix_scratch", lambda *a: scratches.append(prefix_scratch(*a)) or scratches[-1])

    def spy(t, f, b):
        name, kx = kernel_x(t, f, b)
        if ops.is_prefix_view(t):
            handed.append(kx is t)
        return name, kx

    monkeypatch.setattr(ops, "_kernel_x", spy)
    accumulated = []  # (x, acc) handed to a backend's accumulating apply: both prefix views?
    backend_impl = ops._backend_impl

    def impl_spy(name, op):
        fn = backend_impl(name, op)
        if op != "bn_act_bwd_apply_acc":
            return fn

        def run(acc, g, xk, *rest):
            accumulated.append((ops.is_prefix_view(xk), ops.is_prefix_view(acc)))
            return fn(acc, g, xk, *rest)
        return run

    monkeypatch.setattr(ops, "_backend_impl", impl_spy)
    with resfused.use_backend(backend), resfused.use_conv("library"), DispatchLog() as log:
        block(x).sum().backward()
    if backend in ops.NATIVE_BACKENDS:
        # the block runs in C++ (csrc/dense.cpp), which hands the kernels the views
        # themselves: what reaches them through the dispatcher shows it
        assert scratches == [] and handed == [] and accumulated == []
        fwd = [ops.is_prefix_view(a[0]) for op, a in log.calls if op == "resfused_C.bn_act_fwd"]
        red = [ops.is_prefix_view(a[1]) for op, a in log.calls if op == "resfused_C.bn_act_bwd_reduce"]
        acc = [(ops.is_prefix_view(a[2]), ops.is_prefix_view(a[0]))
               for op, a in log.calls if op == "resfused_C.bn_act_bwd_apply_acc"]
        # forward: norm1 of layers 2 and 3 (layer 1 reads x); backward: relu1's recompute
        # and norm1's reduction of all three, as views
        assert fwd.count(True) == 2 + 3 and red.count(True) == 3, (fwd, red)
        assert acc == [(True, True)] * 3
        return
    assert len(scratches) == 2  # one decision in forward, one in backward
    if backend == "triton":
        assert scratches == [None, None]
        # forward: norm1 of layers 2 and 3; backward: recompute and reduce of all three
        assert handed == [True] * (2 + 2 * 3)
        # and each layer's apply adds its prefix gradient into the gradient buffer's own
        # prefix in the kernel, reading x's prefix in place
        assert accumulated == [(True, True)] * 3
    else:
        assert all(s is not None for s in scratches) and not handed
        assert accumulated == []  # eager adds itself; a gathered prefix's gradient is added after


@pytest.mark.parametrize("case", backend_cases(("cpu", "cuda")), ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval", "dropout", "frozen", "no_x_grad", "bf16", "no_grad", "1x1"])
def test_native_dense_block_matches_the_python_path(monkeypatch, case, layout, mode):
    """On the cpu and cuda backends a dense block's forward and backward run as one call
    each of resfused_C.dense_fwd / dense_bwd (csrc/dense.cpp): the same ops in the same
    order as the Python path (with the composites off), so the output, gradients and
    running statistics are bit for bit the same (deterministic convolutions on a GPU):
    eval, dropout (the same random stream), frozen BNs, an input that does not require
    grad, bfloat16 (BN parameters in bfloat16 too: their gradients take that dtype) and a
    forward under no_grad (nothing kept). Five channels in and a growth of three: on a GPU
    in channels_last the prefixes are ones the kernels cannot read in place (copied); at
    1x1 too, where a copied prefix is contiguous both ways and the gradient buffer's prefix
    has other strides."""
    backend, device = case
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    import copy

    from resfused.autograd import bn_act as autograd_bn_act
    from resfused.autograd import dense as autograd_dense

    dtype = torch.bfloat16 if mode == "bf16" else torch.float64
    block = FusedDenseBlock(3, 5, 2, 3, 0.25 if mode == "dropout" else 0.0)
    randomise_bns(block)
    block = block.to(device, dtype).train(mode != "eval")
    if mode == "frozen":
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.requires_grad_(False)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    hw = (1, 1) if mode == "1x1" else (6, 5)
    x = torch.randn(2, 5, *hw, dtype=dtype).to(device, memory_format=fmt)
    python_block = copy.deepcopy(block)
    calls = []
    real_fwd, real_bwd = autograd_dense._native_forward, autograd_dense._native_backward
    monkeypatch.setattr(autograd_dense, "_native_forward", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(autograd_dense, "_native_backward", lambda *a: calls.append("bwd") or real_bwd(*a))

    def step(b):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_(mode not in ("no_x_grad", "no_grad"))
        with torch.set_grad_enabled(mode != "no_grad"):
            out = b(xi)
        if out.requires_grad:
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype, device=device).reshape(out.shape))
        return out, xi.grad, {n: p.grad for n, p in b.named_parameters()}, \
            {k: v.clone() for k, v in b.state_dict().items()}

    with resfused.use_backend(backend):
        native = step(block)
        expected_calls = ["fwd"] if mode == "no_grad" else ["fwd", "bwd"]
        assert calls == expected_calls, calls
        monkeypatch.setattr(autograd_bn_act, "_COMPOSITE_BACKENDS", ())
        python = step(python_block)
        assert calls == expected_calls, calls
    (out_n, dx_n, g_n, s_n), (out_p, dx_p, g_p, s_p) = native, python
    assert out_n.dtype == dtype and out_n.is_contiguous(memory_format=fmt)
    assert torch.equal(out_n, out_p)
    assert (dx_n is None) == (dx_p is None) == (mode in ("no_x_grad", "no_grad"))
    assert dx_n is None or torch.equal(dx_n, dx_p)
    for name in g_n:
        assert (g_n[name] is None) == (g_p[name] is None), name
        if g_n[name] is not None:
            assert g_n[name].dtype == dtype and torch.equal(g_n[name], g_p[name]), name
    for k in s_n:
        assert torch.equal(s_n[k], s_p[k]), k
    if mode == "dropout":
        assert (out_n[:, 5:] == 0).any()  # the dropout ran


def test_native_dense_block_takes_a_spec_built_with_lists(monkeypatch):
    """A dense block spec whose ConvSpecs hold lists (unhashable) runs the native block,
    forward and backward, as a tuple-built one does, with the same result."""
    import copy

    from resfused.autograd.block import ConvSpec
    from resfused.autograd.dense import DenseBlockFunction

    block = FusedDenseBlock(2, 4, 2, 3, 0.0).train()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    real = DenseBlockFunction.apply

    def listed(spec):
        conv = lambda c: ConvSpec(list(c.stride), list(c.padding), list(c.dilation), c.groups)  # noqa: E731
        return spec._replace(layers=tuple(ls._replace(conv1=conv(ls.conv1), conv2=conv(ls.conv2))
                                          for ls in spec.layers))
    results = []
    for make in (lambda spec: spec, listed):
        b = copy.deepcopy(block)
        monkeypatch.setattr(DenseBlockFunction, "apply", lambda spec, *a: real(make(spec), *a))
        with resfused.use_backend("cpu"):
            out = b(x)
            gx, = torch.autograd.grad(out.sum(), x)
        results.append((out, gx, {k: v.clone() for k, v in b.state_dict().items()}))
    (o1, g1, s1), (o2, g2, s2) = results
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    assert all(torch.equal(v, s2[k]) for k, v in s1.items())
