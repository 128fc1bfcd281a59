"""The Triton convolutions with BatchNorm fused into them (resfused.triton.conv, the
``resfused::conv_bn_*`` ops) and the fused blocks running on them (``use_conv``).

Kernels run under the Triton interpreter on this CPU machine and natively on a GPU (the
same tests, parametrised on device). Oracle: float64 on the CPU. fp32 lands within 1e-5
(TF32 off, as conftest sets on a GPU); fp16/bf16 within 2x eager PyTorch's own error in
that dtype against the same oracle (DESIGN.md §6), floored at one ulp of the result.
"""
from __future__ import annotations

import copy
import json
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import conv1x1

import resfused
from resfused import conv_select
from resfused._backend import unavailable_reason
from resfused.convert import FoldedBlock
from resfused.ops import conv as conv_ops
from utils import DEVICES, LOW_PRECISION_FACTOR, assert_close

pytest.importorskip("triton")

TRITON_DEVICES = [d for d in DEVICES if not unavailable_reason("triton", torch.device(d))]
pytestmark = pytest.mark.skipif(not TRITON_DEVICES, reason="triton cannot run here (no GPU and no interpreter)")

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation)
SHAPES = [
    (2, 5, 7, 9, 7, 3, 1, 1, 1),    # odd channels and sizes, padding at every border
    (2, 6, 9, 7, 5, 3, 2, 1, 1),    # stride 2
    (1, 3, 6, 5, 4, 3, 1, 2, 2),    # dilation 2, N = 1
    (2, 16, 5, 5, 32, 1, 1, 0, 1),  # 1x1, channels multiples of 16 (vectorised variant)
    (2, 7, 6, 6, 9, 1, 2, 0, 1),    # 1x1 stride 2 (a downsample)
    (1, 65, 3, 4, 17, 3, 1, 1, 1),  # several channel blocks per tap
    (2, 32, 9, 9, 32, 3, 1, 1, 1),  # aligned and more than one tile: the "large" tile config (on a CPU)
    (2, 4, 3, 1, 6, 3, 2, 1, 1),    # stride 2 over width 1: dgrad's odd-column phases are empty
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def shape_id(s):
    n, ci, h, w, co, k, st, p, d = s
    return f"{n}x{ci}x{h}x{w}-{co}-k{k}s{st}p{p}d{d}"


def _dt(d):
    return str(d).replace("torch.", "")


def _chan(t):
    return t.view(1, -1, 1, 1)


def _make(shape, dtype, device, seed=0):
    n, ci, h, w, co, k, st, p, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64) / (ci * k * k) ** 0.5
    aff = torch.stack([torch.rand(ci, generator=g, dtype=torch.float64) + 0.5,
                       torch.randn(ci, generator=g, dtype=torch.float64) * 0.5])
    cl = torch.channels_last

    def to(t):
        return t.to(device=device, dtype=dtype).contiguous(memory_format=cl)
    return x, wt, aff, to(x), to(wt).contiguous(), aff.float().to(device), (st, st), (p, p), (d, d)


def _check(ours, eager_lp, oracle, dtype, what):
    """fp32: 1e-5 of the largest value; fp16/bf16: within 2x eager's own error in dtype."""
    o = oracle.detach().double().cpu()
    scale = max(o.abs().max().item(), 1e-6)
    if dtype == torch.float32:
        assert_close(ours, o, 1e-5 * scale, 1e-5, what)
        return
    ours_err = (ours.detach().double().cpu() - o).abs().max().item()
    eager_err = (eager_lp.detach().double().cpu() - o).abs().max().item()
    floor = torch.finfo(dtype).eps * scale
    assert ours_err <= LOW_PRECISION_FACTOR * max(eager_err, floor), \
        f"{what}: error {ours_err:.3g} vs eager {_dt(dtype)} {eager_err:.3g} (floor {floor:.3g})"


def _oracle_act(x, aff, pro):
    return torch.relu(x * _chan(aff[0]) + _chan(aff[1])) if pro else x


FWD_MODES = {  # name: (prologue, bias, residual, relu, stats)
    "stats": (False, False, False, False, True),
    "prologue_stats": (True, False, False, False, True),
    "prologue": (True, False, False, False, False),
    "plain": (False, False, False, False, False),
    "bias": (False, True, False, False, False),
    "bias_relu": (False, True, False, True, False),
    "bias_res_relu": (False, True, True, True, False),
}


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("mode", list(FWD_MODES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv_fwd(shape, mode, dtype, device):
    pro, bias, res, relu, stats = FWD_MODES[mode]
    x64, w64, aff64, x, w, aff, st, pad, dil = _make(shape, dtype, device)
    co = w64.shape[0]
    b64 = torch.randn(co, dtype=torch.float64) if bias else None
    y64 = F.conv2d(_oracle_act(x64, aff64, pro), w64, None, st, pad, dil)
    r64 = torch.randn_like(y64) if res else None
    ref = y64 + (_chan(b64) if bias else 0) + (r64 if res else 0)
    ref = torch.relu(ref) if relu else ref
    r = r64.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) if res else None
    args = (list(st), list(pad), list(dil), aff if pro else None, b64.float().to(device) if bias else None, r, relu,
            stats, False)
    out, mean, var = conv_ops.conv_bn_fwd(x, w, *args, "triton")
    lp, lp_mean, lp_var = conv_ops.conv_bn_fwd(x.cpu(), w.cpu(), *[a.cpu() if torch.is_tensor(a) else a
                                                                     for a in args], "eager")
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    _check(out, lp, ref, dtype, f"conv fwd {mode}")
    if stats:
        # the statistics of the stored (rounded) output, as a separate BN pass would see it
        stored = out.double().cpu()
        assert_close(mean, stored.mean((0, 2, 3)), 1e-5, 1e-5, "epilogue mean")
        assert_close(var, stored.var((0, 2, 3), unbiased=False), 1e-5, 1e-4, "epilogue var")
    else:
        assert mean.numel() == 0 and var.numel() == 0


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "bn_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv_dgrad(shape, epilogue, dtype, device):
    x64, w64, aff64, x, w, aff, st, pad, dil = _make(shape, dtype, device)
    a64 = _oracle_act(x64, aff64, True).requires_grad_()
    y64 = F.conv2d(a64, w64, None, st, pad, dil)
    g64 = torch.randn_like(y64)
    y64.backward(g64)
    g = g64.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    stats64 = torch.stack([torch.randn(x64.shape[1], dtype=torch.float64) * 0.1,
                           torch.rand(x64.shape[1], dtype=torch.float64) + 0.5])
    bn = (x, aff, stats64.float().to(device)) if epilogue else (None, None, None)
    args = (list(x.shape), list(st), list(pad), list(dil))
    d, sums = conv_ops.conv_bn_dgrad(g, w, *args, *bn, False, "triton")
    lp_bn = tuple(t.cpu() if t is not None else None for t in bn)
    d_lp, sums_lp = conv_ops.conv_bn_dgrad(g.cpu(), w.cpu(), *args, *lp_bn, False, "eager")
    assert d.dtype == dtype and d.is_contiguous(memory_format=torch.channels_last)
    ref = a64.grad
    if not epilogue:
        _check(d, d_lp, ref, dtype, "dgrad")
        assert sums.numel() == 0
        return
    keep = (x64 * _chan(aff64[0]) + _chan(aff64[1])) > 0
    dz64 = torch.where(keep, ref, torch.zeros_like(ref))
    xhat = (x64 - _chan(stats64[0])) * _chan(stats64[1])
    _check(d, d_lp, dz64, dtype, "dgrad epilogue dz")
    _check(sums[0], sums_lp[0], dz64.sum((0, 2, 3)), dtype, "dgrad epilogue sum dz")
    _check(sums[1], sums_lp[1], (dz64 * xhat).sum((0, 2, 3)), dtype, "dgrad epilogue sum dz*xhat")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_conv_dgrad_epilogue_passes_the_gradient_at_nan(device):
    """relu's backward (threshold_backward) passes the gradient where its input is NaN: the
    dgrad epilogue's dz equals the convolution's input gradient there, as eager's."""
    shape = SHAPES[0]
    x64, w64, aff64, x, w, aff, st, pad, dil = _make(shape, torch.float32, device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 3, 0, 0] = float("inf")
    g = torch.randn(2, 7, 7, 9).to(device).contiguous(memory_format=torch.channels_last)
    stats = torch.stack([torch.zeros(5), torch.ones(5)]).to(device)
    args = (list(x.shape), list(st), list(pad), list(dil), x, aff, stats, False)
    d, sums = conv_ops.conv_bn_dgrad(g, w, *args, "triton")
    d_lp, sums_lp = conv_ops.conv_bn_dgrad(*[t.cpu() if torch.is_tensor(t) else t for t in (g, w, *args)], "eager")
    plain = torch.ops.aten.convolution_backward(g.cpu(), x.cpu(), w.cpu(), None, list(st), list(pad), list(dil),
                                                False, [0, 0], 1, [True, False, False])[0]
    assert d[0, 1, 2, 3].item() == pytest.approx(plain[0, 1, 2, 3].item(), rel=1e-5, abs=1e-6) != 0
    assert_close(d, d_lp, 1e-5, 1e-5, "dgrad epilogue dz with NaN/inf")
    assert_close(sums, sums_lp, 1e-4, 1e-4, "dgrad epilogue sums with NaN/inf")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv_wgrad(shape, prologue, dtype, device):
    x64, w64, aff64, x, w, aff, st, pad, dil = _make(shape, dtype, device)
    w_req = w64.clone().requires_grad_()
    y64 = F.conv2d(_oracle_act(x64, aff64, prologue), w_req, None, st, pad, dil)
    g64 = torch.randn_like(y64)
    y64.backward(g64)
    g = g64.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    args = (list(w.shape), list(st), list(pad), list(dil), aff if prologue else None, False)
    dw = conv_ops.conv_bn_wgrad(g, x, *args, "triton")
    dw_lp = conv_ops.conv_bn_wgrad(g.cpu(), x.cpu(), *[a.cpu() if torch.is_tensor(a) else a for a in args], "eager")
    assert dw.dtype == torch.float32 and dw.shape == w.shape
    _check(dw, dw_lp, w_req.grad, dtype, "wgrad")


def test_shapes_cover_both_tile_configs():
    from resfused.triton import conv as tconv

    x = torch.empty(0)  # a CPU tensor: the interpreter's stand-in SM count
    picked = {tconv._pick_config("fwd", torch.float32, n * h * w, co, x, (ci, co, h * w * ci, w * ci, ci))
              for n, ci, h, w, co, *_ in SHAPES}
    assert picked == {"large", "small"}


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_wgrad_split_reduction_is_deterministic(device):
    """The pixel reduction is split across programs and summed in a fixed order."""
    n = 4 if device == "cpu" else 64
    shape = (n, 16, 12, 12, 16, 3, 1, 1, 1)
    _, _, _, x, w, aff, st, pad, dil = _make(shape, torch.float32, device)
    g = torch.randn(n, 16, 12, 12, device=device).contiguous(memory_format=torch.channels_last)
    args = (g, x, list(w.shape), list(st), list(pad), list(dil), aff, False, "triton")
    a, b = conv_ops.conv_bn_wgrad(*args), conv_ops.conv_bn_wgrad(*args)
    assert torch.equal(a, b)


def test_stats_merge_is_sound_at_millions_of_values():
    """Per-tile (sum, M2 about the tile mean) merged with Chan's formula: the variance of
    4M values around 1000 stays accurate where one running sum of squares in fp32 fails."""
    from resfused.triton.conv import stats_finalize

    M, bm, C = 1 << 22, 128, 3
    v = (1000.0 + torch.randn(M, C, dtype=torch.float64) * torch.tensor([1.0, 0.1, 3.0], dtype=torch.float64))
    v32 = v.float()
    P = M // bm
    tiles = v32.view(P, bm, C)
    s1 = tiles.sum(1)
    m2 = ((tiles - (s1 / bm)[:, None, :]) ** 2).sum(1)
    mean, var = stats_finalize(torch.stack([s1, m2], 1), M, bm)
    truth = v32.double()
    assert_close(mean, truth.mean(0), 1e-4, 1e-7, "mean")
    assert_close(var, truth.var(0, unbiased=False), 0.0, 1e-4, "var")
    naive = (v32 * v32).sum(0) / M - (v32.sum(0) / M) ** 2  # one fp32 running sum of squares
    assert (naive.double() - truth.var(0, unbiased=False)).abs().max() > 10 * (var.double() - truth.var(
        0, unbiased=False)).abs().max()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_stats_epilogue_large_offset(device):
    """The forward epilogue's statistics of outputs with a large mean (1x1 conv of x ~ 1000)."""
    n = 1 if device == "cpu" else 512  # 4096 or 2M values per channel
    x = (1000 + torch.randn(n, 16, 64, 64, device=device)).contiguous(memory_format=torch.channels_last)
    w = (torch.rand(8, 16, 1, 1, device=device) / 16)
    out, mean, var = conv_ops.conv_bn_fwd(x, w, [1, 1], [0, 0], [1, 1], None, None, None, False, True, False,
                                          "triton")
    o = out.double()
    assert_close(mean, o.mean((0, 2, 3)), 1e-3, 1e-7, "mean")
    assert_close(var, o.var((0, 2, 3), unbiased=False), 1e-6, 1e-3, "var")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_conv_bad_input(device):
    from resfused.triton import conv as tconv

    x = torch.randn(2, 4, 5, 5, device=device)
    w = torch.randn(8, 4, 3, 3, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels_last"):
        tconv.conv_fwd(x[:, :, :, :4].contiguous().transpose(2, 3), w, (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="input channels"):
        tconv.conv_fwd(cl, torch.randn(8, 3, 3, 3, device=device), (1, 1), (1, 1), (1, 1))
    with pytest.raises(TypeError, match="float64"):
        tconv.conv_fwd(cl.double(), w.double(), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="weight"):
        tconv.conv_fwd(cl, w.half(), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="prologue"):
        tconv.conv_fwd(cl, w, (1, 1), (1, 1), (1, 1), prologue=torch.ones(2, 5, device=device))
    with pytest.raises(ValueError, match="too small"):
        tconv.conv_fwd(cl[:, :, :1, :1], w, (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="do not agree"):
        tconv.conv_dgrad(torch.randn(2, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last), w,
                         (2, 4, 5, 5), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="unknown backend"):
        conv_ops.conv_bn_fwd(cl, w, [1, 1], [1, 1], [1, 1], None, None, None, False, False, False, "cudnn")


def test_opcheck_conv_ops():
    from torch.library import opcheck

    dev = TRITON_DEVICES[0]
    for backend in ("eager", "triton"):
        _, _, _, x, w, aff, st, pad, dil = _make(SHAPES[1], torch.float32, dev)
        r = torch.randn(2, 5, 5, 4, device=dev).contiguous(memory_format=torch.channels_last)
        b = torch.randn(5, device=dev)
        opcheck(conv_ops.BY_NAME["conv_bn_fwd"], (x, w, list(st), list(pad), list(dil), aff, None, None, False, True,
                                                  False, backend))
        opcheck(conv_ops.BY_NAME["conv_bn_fwd"], (x, w, list(st), list(pad), list(dil), None, b, r, True, False,
                                                  False, backend))
        g = torch.randn(2, 5, 5, 4, device=dev).contiguous(memory_format=torch.channels_last)
        stats = torch.stack([torch.zeros(6), torch.ones(6)]).to(dev)
        opcheck(conv_ops.BY_NAME["conv_bn_dgrad"], (g, w, list(x.shape), list(st), list(pad), list(dil), x, aff,
                                                    stats, False, backend))
        opcheck(conv_ops.BY_NAME["conv_bn_wgrad"], (g, x, list(w.shape), list(st), list(pad), list(dil), aff, False,
                                                    backend))
    # float64 (the eager conv path; the Triton one takes fp32 and narrower): fp32 sums too
    d = torch.float64
    x, w = torch.randn(2, 4, 6, 5, dtype=d), torch.randn(6, 4, 3, 3, dtype=d)
    g = torch.randn(2, 6, 3, 3, dtype=d)
    aff = torch.stack([torch.rand(4, dtype=d) + 0.5, torch.randn(4, dtype=d)])
    stats = torch.stack([torch.randn(4, dtype=d), torch.rand(4, dtype=d) + 0.5])
    opcheck(conv_ops.BY_NAME["conv_bn_dgrad"], (g, w, list(x.shape), [2, 1], [1, 0], [1, 1], x, aff, stats, False,
                                                "eager"))


# ---- fused blocks on the Triton convolutions ------------------------------------------------


def _bottleneck_ds():
    return resfused.FusedBottleneck(8, 4, stride=2, downsample=nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16)))


BLOCKS = {
    "bottleneck_downsample": _bottleneck_ds,
    "bottleneck": lambda: resfused.FusedBottleneck(16, 4),
    "basic_odd": lambda: resfused.FusedBasicBlock(7, 7),
    "bottleneck_dilated": lambda: resfused.FusedBottleneck(16, 4, dilation=2),
}


def _randomize_bn(m):
    g = torch.Generator().manual_seed(1)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return m


def _assert_same_grads_and_buffers(a, b):
    """Module a (Triton convs) against b (library convs): parameter gradients and buffers."""
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert_close(p.grad, q.grad, 1e-5 * q.grad.abs().max().item(), 1e-4, f"grad {n}")
    for (n, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        assert_close(p, q, 1e-6, 1e-5, f"buffer {n}")


def _run_block(block, x, conv, grad):
    xi = x.clone().requires_grad_()
    with resfused.use_conv(conv):
        out = block(xi)
    out.backward(grad)
    return out, xi.grad


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_triton_conv_matches_library(name, train, device):
    """Same outputs, input and parameter gradients and running statistics (fp32) as the
    library-conv path, which the block tests hold to torchvision's."""
    base = _randomize_bn(BLOCKS[name]()).to(device).train(train)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x = torch.randn(2, base.conv1.in_channels, 7, 6, device=device).contiguous(memory_format=torch.channels_last)
    xb = x.clone().requires_grad_()
    with resfused.use_conv("library"):
        out_b = b(xb)
    g = torch.randn_like(out_b)
    out_b.backward(g)
    out_a, dx_a = _run_block(a, x, "triton", g)
    assert out_a.is_contiguous(memory_format=torch.channels_last)
    scale = out_b.abs().max().item()
    assert_close(out_a, out_b, 1e-5 * scale, 1e-5, "block output")
    assert_close(dx_a, xb.grad, 1e-5 * xb.grad.abs().max().item(), 1e-4, "block dx")
    _assert_same_grads_and_buffers(a, b)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval", "dropout"])
def test_dense_block_triton_conv_matches_library(mode, device):
    """A dense block whose conv1 reads its prefix of the feature buffer in place through
    norm1-relu1, and whose conv2 feeds the statistics cache from its epilogue: same
    output, gradients and running statistics as the library-conv path (fp32)."""
    base = _randomize_bn(resfused.FusedDenseBlock(3, 6, 2, 4, drop_rate=0.3 if mode == "dropout" else 0.0))
    base = base.to(device).train(mode != "eval")
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x = torch.randn(2, 6, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    outs = {}
    for conv, m in (("triton", a), ("library", b)):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same dropout masks
        with resfused.use_conv(conv):
            out = m(xi)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view_as(out))
        outs[conv] = (out, xi.grad)
    assert outs["triton"][0].is_contiguous(memory_format=torch.channels_last)
    for i, what in enumerate(("output", "dx")):
        ref = outs["library"][i]
        assert_close(outs["triton"][i], ref, 1e-5 * ref.abs().max().item(), 1e-5, f"dense {what}")
    _assert_same_grads_and_buffers(a, b)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_forced_triton_conv_dense_refuses_and_changes_nothing(device):
    m = _randomize_bn(resfused.FusedDenseBlock(2, 6, 2, 4, drop_rate=0.0)).to(device)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with resfused.use_conv("triton"), pytest.raises(RuntimeError, match="channels_last"):
        m(torch.randn(2, 6, 5, 5, device=device))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused call"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dt)
def test_block_triton_conv_low_precision(dtype, device):
    """fp16/bf16 block (forward and backward) within 2x the library path's own error
    against a float64 model."""
    base = _randomize_bn(_bottleneck_ds()).to(device)
    ref = copy.deepcopy(base).double().cpu()
    x64 = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    x = x64.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    xr = x64.clone().requires_grad_()
    with resfused.use_conv("library"):
        out_r = ref(xr)
    g64 = torch.randn_like(out_r)
    out_r.backward(g64)
    g = g64.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    results = {}
    for conv in ("triton", "library"):
        m = copy.deepcopy(base).to(dtype)
        out, dx = _run_block(m, x, conv, g)
        results[conv] = (out, dx, m.conv2.weight.grad, m.bn1.weight.grad)
    for i, (what, oracle) in enumerate((("out", out_r), ("dx", xr.grad), ("conv2.weight.grad", ref.conv2.weight.grad),
                                        ("bn1.weight.grad", ref.bn1.weight.grad))):
        _check(results["triton"][i], results["library"][i], oracle, dtype, what)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_forced_triton_conv_refuses_and_changes_nothing(device):
    m = _randomize_bn(resfused.FusedBottleneck(16, 4)).to(device)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    nchw = torch.randn(2, 16, 5, 5, device=device)
    with resfused.use_conv("triton"), pytest.raises(RuntimeError, match="channels_last"):
        m(nchw)
    grouped = _randomize_bn(resfused.FusedBottleneck(16, 4, groups=2, base_width=64)).to(device)
    with resfused.use_conv("triton"), pytest.raises(RuntimeError, match="groups"):
        grouped(nchw.contiguous(memory_format=torch.channels_last))
    with resfused.use_conv("triton"), pytest.raises(RuntimeError, match="float64"):
        m.double()(nchw.double().contiguous(memory_format=torch.channels_last))
    m.float()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused call"


def test_auto_conv_on_cpu_is_library_without_timing(monkeypatch):
    """On a CPU tensor "auto" is the library path, with nothing timed or cached."""
    calls = []
    monkeypatch.setattr(conv_select, "choose", lambda *a, **k: calls.append(a) or "triton")
    m = resfused.FusedBottleneck(16, 4)
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with resfused.use_conv("auto"):
        out = m(x)
    with resfused.use_conv("library"):
        ref = copy.deepcopy(m)(x)
    assert not calls
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_folded_block_triton_conv(device):
    """fold(): inner convs with bias + ReLU epilogues and the join (bias + residual + ReLU)
    in the last conv's epilogue, equal to the library path in fp32."""
    for make in (_bottleneck_ds, lambda: resfused.FusedBasicBlock(7, 7)):
        blk = FoldedBlock(_randomize_bn(make()).eval()).to(device)
        x = torch.randn(2, blk._convs()[0].in_channels, 7, 6, device=device).contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            with resfused.use_conv("triton"):
                a = blk(x)
            with resfused.use_conv("library"):
                b = blk(x)
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert_close(a, b, 1e-5 * b.abs().max().item(), 1e-5, "folded block")
        with resfused.use_conv("triton"), pytest.raises(RuntimeError, match="no_grad"):
            blk(x)  # gradients needed: the Triton path is inference-only


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_compiled_block_triton_conv(device):
    """torch.compile(fullgraph=True) of a block on the Triton convolutions: no graph break,
    same results."""
    m = _randomize_bn(_bottleneck_ds()).to(device)
    ref = copy.deepcopy(m)
    x = torch.randn(2, 8, 7, 6, device=device).contiguous(memory_format=torch.channels_last)
    with resfused.use_conv("triton"):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.sum().backward()
        expected = ref(x)
        expected.sum().backward()
    assert_close(out, expected, 1e-5, 1e-5, "compiled output")
    assert_close(m.conv2.weight.grad, ref.conv2.weight.grad, 1e-5, 1e-4, "compiled conv2 grad")


# ---- choosing the path ---------------------------------------------------------------------


@pytest.fixture
def weigh_here(monkeypatch):
    """Let "auto" weigh the Triton convolutions on this device (on a CPU: the interpreter)."""
    import resfused.nn.block as nb

    monkeypatch.setattr(nb, "_weighs_triton", lambda device: True)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESFUSED_CACHE_DIR", str(tmp_path))
    conv_select.clear_cache(memory_only=True)
    yield tmp_path
    conv_select.clear_cache(memory_only=True)


def test_use_conv_validates(monkeypatch):
    with pytest.raises(ValueError, match="triton, library|auto, triton, library"):
        with resfused.use_conv("cudnn"):
            pass
    monkeypatch.setenv("RESFUSED_CONV", "fast")
    with pytest.raises(ValueError, match="RESFUSED_CONV"):
        conv_select.forced_conv()
    monkeypatch.setenv("RESFUSED_CONV", "library")
    assert conv_select.forced_conv() == "library"
    with resfused.use_conv("triton"):
        assert conv_select.forced_conv() == "triton"
    assert conv_select.forced_conv() == "library"


def test_choose_times_once_and_caches(cache_dir):
    dev = torch.device("cpu")
    calls = {"library": 0, "triton": 0}

    def run(name, secs):
        def f():
            calls[name] += 1
            time.sleep(secs)
        return f
    runs = {"library": run("library", 0.02), "triton": run("triton", 0.0)}
    assert conv_select.choose("k1", dev, runs) == "triton"
    timed = dict(calls)
    assert timed["library"] >= 2 and timed["triton"] >= 2
    assert conv_select.choose("k1", dev, runs) == "triton"
    assert calls == timed  # cached: nothing timed again
    data = json.loads((cache_dir / "conv_choice.json").read_text())
    assert data["k1"]["choice"] == "triton" and set(data["k1"]["ms"]) == {"library", "triton"}
    conv_select.clear_cache(memory_only=True)  # a new process: read back from the file
    assert conv_select.cached("k1") == "triton"


def test_choose_skips_failing_candidate_and_respects_autotune_off(cache_dir, monkeypatch):
    dev = torch.device("cpu")

    def boom():
        raise torch.cuda.OutOfMemoryError("out of memory") if hasattr(torch.cuda, "OutOfMemoryError") \
            else RuntimeError("out of memory")
    assert conv_select.choose("k2", dev, {"library": lambda: None, "triton": boom}) == "library"
    assert "triton" in conv_select.entries()["k2"]["errors"]
    conv_select.clear_cache(memory_only=True)
    monkeypatch.setenv("RESFUSED_CONV_AUTOTUNE", "0")
    assert conv_select.choose("k3", dev, {"triton": lambda: None}) == "library"
    assert conv_select.cached("k3") is None


def test_corrupt_cache_is_ignored(cache_dir):
    (cache_dir / "conv_choice.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert conv_select.cached("anything") is None
    assert any("conv choice cache" in str(x.message) for x in w)


def test_auto_times_each_block_shape_once_and_keeps_the_model_unchanged(cache_dir, weigh_here, monkeypatch):
    dev = TRITON_DEVICES[0]
    timed = []
    real = conv_select._time_ms
    monkeypatch.setattr(conv_select, "_time_ms", lambda fn, device, reps=5: timed.append(1) or real(fn, device, 1))
    m = _randomize_bn(resfused.FusedBottleneck(16, 4)).to(dev)
    ref = copy.deepcopy(m)
    x = torch.randn(2, 16, 5, 5, device=dev).contiguous(memory_format=torch.channels_last)
    with resfused.use_conv("auto"):
        out = m(x)
        assert len(timed) == 2  # both paths timed, on copies
        m(x)
        assert len(timed) == 2  # the shape is cached now
    with resfused.use_conv("library"):
        expected = ref(x)
        ref(x)
    assert_close(out, expected, 1e-5, 1e-5, "auto output")
    for (n, p), (_, q) in zip(m.named_buffers(), ref.named_buffers()):
        assert_close(p, q, 1e-6, 1e-5, f"{n} (each forward updates it once; the timing runs never)")
    entries = conv_select.entries()
    assert len(entries) == 1 and next(iter(entries.values()))["choice"] in ("triton", "library")


@pytest.mark.parametrize("choice", ["triton", "library"])
def test_compiled_auto_uses_the_cached_choice(cache_dir, weigh_here, monkeypatch, choice):
    """While torch.compile traces, "auto" times nothing: it takes the cached choice, the
    one recorded for the block at any input size (the batch size turns symbolic when a
    new one makes torch.compile recompile with dynamic shapes)."""
    dev = TRITON_DEVICES[0]
    m = _randomize_bn(resfused.FusedBottleneck(16, 4)).to(dev)
    x = torch.randn(2, 16, 5, 5, device=dev).contiguous(memory_format=torch.channels_last)
    with resfused.use_conv("auto"):
        m(x)  # eager: timed and cached
    key = next(iter(conv_select.entries()))
    conv_select._memory[key]["choice"] = choice
    calls = []
    monkeypatch.setattr(conv_select, "choose", lambda *a, **k: calls.append(a) or "library")
    import resfused.autograd.block as ab

    seen = []
    real = ab._fused_conv
    monkeypatch.setattr(ab, "_fused_conv", lambda *a, **k: seen.append(1) or real(*a, **k))
    torch._dynamo.reset()
    with resfused.use_conv("auto"):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        traced = len(seen)
        out3 = compiled(torch.randn(3, 16, 5, 5, device=dev).contiguous(memory_format=torch.channels_last))
    assert not calls
    assert bool(traced) == (choice == "triton") and (len(seen) > traced) == (choice == "triton")
    assert out.shape == x.shape and out3.shape == (3, 16, 5, 5)
    assert conv_select.cached_any_size(key.replace("|x(2, 16, 5, 5)", "|x*")) == choice


def test_auto_timing_leaves_random_streams_and_checkpointing_alone(cache_dir, weigh_here):
    """The timing runs draw dropout noise and run backward inside the caller's forward:
    the caller's random stream and saved-tensor hooks (non-reentrant checkpointing) are
    unaffected."""
    from torch.utils.checkpoint import checkpoint

    dev = TRITON_DEVICES[0]
    dense = _randomize_bn(resfused.FusedDenseBlock(2, 6, 2, 4, drop_rate=0.5)).to(dev)
    x = torch.randn(2, 6, 5, 5, device=dev).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    with resfused.use_conv("library"):
        ref = copy.deepcopy(dense)(x)
    after_ref = torch.rand(3)
    torch.manual_seed(3)
    with resfused.use_conv("auto"):
        out = copy.deepcopy(dense)(x)  # timed here, then run
    assert torch.equal(torch.rand(3), after_ref)
    assert torch.equal(out != 0, ref != 0)  # the same dropout masks
    conv_select.clear_cache()
    m = _randomize_bn(resfused.FusedBasicBlock(8, 8)).to(dev)
    xi = torch.randn(2, 8, 5, 5, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_()
    with resfused.use_conv("auto"):
        y = checkpoint(m, xi, use_reentrant=False)
    y.sum().backward()
    assert xi.grad is not None and len(conv_select.entries()) == 1


def test_choice_made_while_a_path_failed_stays_in_memory(cache_dir):
    def boom():
        raise RuntimeError("out of memory")
    assert conv_select.choose("k4", torch.device("cpu"), {"library": lambda: None, "triton": boom}) == "library"
    assert not (cache_dir / "conv_choice.json").exists()
    assert conv_select.cached("k4") == "library"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_block_triton_conv_under_autocast(device):
    """bf16 autocast: convs in bf16 on the Triton path too, BN parameters and running
    statistics fp32, within the low-precision rule of the library path's error."""
    base = _randomize_bn(_bottleneck_ds()).to(device)
    ref = copy.deepcopy(base).double().cpu()
    x = torch.randn(2, 8, 7, 6, device=device).contiguous(memory_format=torch.channels_last)
    with resfused.use_conv("library"):
        expected = ref(x.double().cpu())
    outs = {}
    for conv in ("triton", "library"):
        m = copy.deepcopy(base)
        with resfused.use_conv(conv), torch.autocast(device, dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
        assert m.bn2.running_mean.dtype == torch.float32
        outs[conv] = (out, m.bn2.running_var)
    _check(outs["triton"][0], outs["library"][0], expected, torch.bfloat16, "autocast output")
    _check(outs["triton"][1], outs["library"][1], ref.bn2.running_var, torch.bfloat16, "autocast running var")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transition_triton_conv_matches_library(train, device):
    """A transition whose 1x1 conv reads x through relu(bn(.)) in its prologue (never
    written): same output, gradients and running statistics as the library-conv path."""
    from torchvision.models.densenet import _Transition

    base = _randomize_bn(resfused.convert(_Transition(12, 6))).to(device).train(train)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x = torch.randn(2, 12, 6, 7, device=device).contiguous(memory_format=torch.channels_last)
    res = {}
    for conv, m in (("triton", a), ("library", b)):
        xi = x.clone().requires_grad_()
        with resfused.use_conv(conv):
            out = m(xi)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view_as(out))
        res[conv] = (out, xi.grad)
    for i, what in enumerate(("output", "dx")):
        ref = res["library"][i]
        assert_close(res["triton"][i], ref, 1e-5 * ref.abs().max().item(), 1e-5, f"transition {what}")
    _assert_same_grads_and_buffers(a, b)
    with resfused.use_conv("triton"), pytest.raises(RuntimeError, match="channels_last"):
        a(torch.randn(2, 12, 6, 7, device=device))


def test_auto_times_transitions_without_touching_them(cache_dir, weigh_here):
    from torchvision.models.densenet import _Transition

    dev = TRITON_DEVICES[0]
    t = _randomize_bn(resfused.convert(_Transition(12, 6))).to(dev)
    ref = copy.deepcopy(t)
    x = torch.randn(2, 12, 6, 7, device=dev).contiguous(memory_format=torch.channels_last)
    with resfused.use_conv("auto"):
        out = t(x)
    with resfused.use_conv("library"):
        expected = ref(x)
    assert_close(out, expected, 1e-5, 1e-5, "auto transition")
    assert_close(t.norm.running_var, ref.norm.running_var, 1e-6, 1e-5, "running var (updated once)")
    assert [k for k in conv_select.entries() if "|transition|" in k]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_densenet_on_triton_convs_trains_like_the_library_path(device):
    """A small DenseNet (dense blocks and a transition on the Triton convolutions; the stem
    and classifier in the library) through two SGD steps and eval: outputs, parameter
    gradients and running statistics match the library-conv path (fp32)."""
    import torchvision

    torch.manual_seed(0)
    base = resfused.convert(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16,
                                                        bn_size=2, num_classes=10))
    base = base.to(device).to(memory_format=torch.channels_last)
    models = {"triton": copy.deepcopy(base), "library": copy.deepcopy(base)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        train = step < 2
        x = torch.randn(4, 3, 32, 32, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (4,), generator=g).to(device)
        outs = {}
        for k, m in models.items():
            m.train(train)
            with resfused.use_conv(k), torch.set_grad_enabled(train):
                outs[k] = m(x)
                if train:
                    opts[k].zero_grad()
                    F.cross_entropy(outs[k], target).backward()
        ref = outs["library"]
        assert_close(outs["triton"], ref, 1e-5 * ref.abs().max().item(), 1e-5, f"step {step} output")
        if train:
            for (n, p), (_, q) in zip(models["triton"].named_parameters(), models["library"].named_parameters()):
                assert_close(p.grad, q.grad, 1e-6 + 1e-5 * q.grad.abs().max().item(), 1e-4, f"step {step} grad {n}")
            for o in opts.values():
                o.step()
    for (n, p), (_, q) in zip(models["triton"].named_buffers(), models["library"].named_buffers()):
        assert_close(p, q, 1e-6, 1e-5, f"buffer {n}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_one_by_one_spatial_input_counts_as_channels_last(device):
    """At 1x1 spatial size NCHW and channels_last are the same memory (a ResNet's last stage
    at small inputs): the Triton path takes it."""
    m = _randomize_bn(resfused.FusedBasicBlock(8, 8)).to(device)
    lib = copy.deepcopy(m)
    x = torch.randn(4, 8, 1, 1, device=device)
    with resfused.use_conv("triton"):
        out = m(x)
    with resfused.use_conv("library"):
        ref = lib(x)
    assert_close(out, ref, 1e-5, 1e-4, "1x1 block output")  # BN over 4 values: mildly ill-conditioned


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("P", [1, 17, 65, 4097])
def test_tile_stats_merge_keeps_float64_precision_about_a_pivot(device, P):
    """The conv statistics merge (one launch up to 64 tiles, chunks and then their merge
    above): the variance of values around 1e4 within fp32 rounding of a float64 Chan merge
    of the same per-tile partials, a short last tile included."""
    from resfused.triton.bn_act import tile_stats

    torch.manual_seed(P)
    rows, C = 64, 130
    count = (P - 1) * rows + 37
    y = 1e4 + torch.randn(count, C, dtype=torch.float64)
    n = torch.full((P, 1), float(rows), dtype=torch.float64)
    n[-1] = count - (P - 1) * rows
    tiles = [y[p * rows:(p + 1) * rows].float().double() for p in range(P)]
    s1 = torch.stack([t.sum(0) for t in tiles]).float()
    m2 = torch.stack([((t - t.sum(0) / len(t)) ** 2).sum(0) for t in tiles]).float()
    mean, var = tile_stats(torch.stack([s1, m2], 1).to(device), count, rows)
    w1, w2 = s1.double(), m2.double()
    ref_mean = w1.sum(0) / count
    ref_var = (w2.sum(0) + (n * (w1 / n - ref_mean) ** 2).sum(0)) / count
    assert_close(var.cpu(), ref_var, 0.0, 3e-7, "var")
    assert_close(mean.cpu(), ref_mean, 0.0, 1e-7, "mean")
