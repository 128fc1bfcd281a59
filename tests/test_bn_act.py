"""Fused BatchNorm(+residual)+activation against a float64 eager-PyTorch oracle, on every
backend this machine can run (cuda and triton on a GPU, triton through the interpreter on
a CPU-only machine, cpu, eager)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import resfused
from resfused import functional as RF
from resfused.ops import bn_act as RF_ops
from utils import (TOLERANCES, DispatchLog, assert_close, assert_low_precision, backend_cases, case_id,
                   interpreted)

CASES = backend_cases()
SHAPES = [(2, 1, 5, 3), (2, 3, 5, 7), (1, 7, 3, 5), (3, 64, 5, 5), (2, 65, 3, 3)]
LAYOUTS = ["nchw", "channels_last", "noncontig"]
RESIDUALS = [None, "plain", "bn"]


def make_input(shape, layout, dtype, device):
    """Fresh random data in the requested layout; 'noncontig' is a strided view."""
    n, c, h, w = shape
    if layout == "noncontig":
        base = torch.randn(n, c, h, 2 * w, dtype=torch.float64) * 1.5 + 0.3
        t = base[..., ::2]
    else:
        t = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3
    t = t.to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def make_bn(c, affine, device, dtype=torch.float32):
    """(running_mean, running_var, weight, bias), random, not 0/1."""
    rm = (torch.randn(c, dtype=torch.float64) * 0.2).to(device, dtype)
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).to(device, dtype)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(device, dtype) if affine else None
    b = (torch.randn(c, dtype=torch.float64) * 0.3).to(device, dtype) if affine else None
    return rm, rv, w, b


def clone_bn(bn, device=None, dtype=None):
    return tuple(None if t is None else t.detach().clone().to(device=device or t.device, dtype=dtype or t.dtype)
                 for t in bn)


def reference(x, residual, bn_x, bn_r, residual_kind, training, momentum, eps, relu):
    """Eager PyTorch: F.batch_norm, + residual (or + F.batch_norm(residual)), ReLU."""
    rm, rv, w, b = bn_x
    out = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual_kind == "plain":
        out = out + residual
    elif residual_kind == "bn":
        rrm, rrv, rw, rb = bn_r
        out = out + F.batch_norm(residual, rrm, rrv, rw, rb, training, momentum, eps)
    return torch.relu(out) if relu else out


def ours(x, residual, bn_x, bn_r, residual_kind, training, momentum, eps, relu, backend):
    act = "relu" if relu else "identity"
    if residual_kind == "bn":
        return RF.dual_batch_norm_act(x, residual, bn_x, bn_r, training, momentum, eps, activation=act,
                                      backend=backend)
    rm, rv, w, b = bn_x
    return RF.batch_norm_act(x, rm, rv, w, b, training, momentum, eps, residual=residual, activation=act,
                             backend=backend)


def run_case(backend, device, shape, layout, dtype, residual_kind, affine, training, relu, momentum=0.1,
             eps=1e-5, param_dtype=torch.float32):
    """Run ours, the fp64 oracle and (for low precision) eager in the same dtype; return all three."""
    c = shape[1]
    pdt = torch.float64 if dtype == torch.float64 else param_dtype
    x = make_input(shape, layout, dtype, device)
    res = make_input(shape, layout, dtype, device) if residual_kind else None
    bn_x = make_bn(c, affine, device, pdt)
    bn_r = make_bn(c, affine, device, pdt) if residual_kind == "bn" else (None,) * 4
    grad = make_input(shape, layout, dtype, device)

    def run(fn, to_dtype, to_device, **kw):
        xx = x.detach().to(to_device, to_dtype).requires_grad_()
        rr = None if res is None else res.detach().to(to_device, to_dtype).requires_grad_()
        p_dtype = torch.float64 if to_dtype == torch.float64 else pdt
        bx = clone_bn(bn_x, to_device, p_dtype)
        br = clone_bn(bn_r, to_device, p_dtype)
        params = [t for t in (bx[2], bx[3], br[2], br[3]) if t is not None]
        for t in params:
            t.requires_grad_()
        out = fn(xx, rr, bx, br, residual_kind, training, momentum, eps, relu, **kw)
        inputs = [xx] + ([rr] if rr is not None else []) + params
        grads = torch.autograd.grad(out, inputs, grad.to(to_device, to_dtype))
        running = [t for t in (bx[0], bx[1], br[0], br[1]) if t is not None]
        return out, grads, running

    mine = run(ours, dtype, device, backend=backend)
    oracle = run(reference, torch.float64, "cpu")
    eager = run(reference, dtype, device) if dtype in (torch.float16, torch.bfloat16) else None
    return x, mine, oracle, eager


def check_against_oracle(dtype, mine, oracle, eager, x):
    out, grads, running = mine
    o_out, o_grads, o_running = oracle
    assert out.dtype == x.dtype
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
    names = ["grad x", "grad residual", "grad params"]
    if dtype in TOLERANCES:
        tol = TOLERANCES[dtype]
        assert_close(out, o_out, *tol["fwd"], what="forward")
        for i, (g, og) in enumerate(zip(grads, o_grads)):
            assert_close(g, og, *tol["bwd"], what=f"backward input {i} ({names[min(i, 2)]})")
        for i, (r, orr) in enumerate(zip(running, o_running)):
            assert_close(r, orr, *tol["fwd"], what=f"running stat {i}")
    else:
        e_out, e_grads, e_running = eager
        assert_low_precision(out, e_out, o_out, "forward")
        for i, (g, eg, og) in enumerate(zip(grads, e_grads, o_grads)):
            assert_low_precision(g, eg, og, f"backward input {i}", floor=1e-6)
        for i, (r, er, orr) in enumerate(zip(running, e_running, o_running)):
            assert_low_precision(r, er, orr, f"running stat {i}", floor=1e-6)


def _full_matrix():
    return list(itertools.product(SHAPES, LAYOUTS, RESIDUALS, [True, False], [True, False], [True, False]))


def _interpreter_matrix():
    """The Triton interpreter is slow: every shape, layout and residual kind, the rest rotating."""
    out = []
    for i, (shape, layout, residual) in enumerate(itertools.product(SHAPES[1:], LAYOUTS, RESIDUALS)):
        out.append((shape, layout, residual, i % 2 == 0, i % 3 != 1, i % 4 != 3))
    return out


def _matrix_for(case):
    return _interpreter_matrix() if interpreted(*case) else _full_matrix()


PARAMS = [pytest.param(case, *m, id=f"{case_id(case)}-{m[0]}-{m[1]}-{m[2]}-aff{int(m[3])}-tr{int(m[4])}-relu{int(m[5])}")
          for case in CASES for m in _matrix_for(case)]


@pytest.mark.parametrize("case,shape,layout,residual,affine,training,relu", PARAMS)
def test_fp32_matches_oracle(case, shape, layout, residual, affine, training, relu):
    backend, device = case
    x, mine, oracle, eager = run_case(backend, device, shape, layout, torch.float32, residual, affine, training, relu)
    check_against_oracle(torch.float32, mine, oracle, eager, x)


LOWP = [pytest.param(case, dtype, shape, layout, residual,
                     id=f"{case_id(case)}-{str(dtype)[6:]}-{shape}-{layout}-{residual}")
        for case in CASES
        for dtype in (torch.float64, torch.bfloat16, torch.float16)
        for shape, layout, residual in ([((2, 7, 5, 3), "channels_last", "bn"), ((3, 65, 7, 5), "nchw", "plain")]
                                        if interpreted(*case) else
                                        itertools.product([(2, 7, 5, 3), (4, 64, 9, 7), (3, 65, 7, 5)],
                                                          ["nchw", "channels_last"], RESIDUALS))]


@pytest.mark.parametrize("case,dtype,shape,layout,residual", LOWP)
def test_other_dtypes_match_oracle(case, dtype, shape, layout, residual):
    backend, device = case
    for training in (True, False):
        x, mine, oracle, eager = run_case(backend, device, shape, layout, dtype, residual, True, training, True)
        check_against_oracle(dtype, mine, oracle, eager, x)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_module_matches_batchnorm2d_over_steps(case, momentum, affine, track):
    """BatchNormAct2d vs nn.BatchNorm2d + add + ReLU: 5 training steps then eval; same
    running statistics, num_batches_tracked, outputs and gradients throughout."""
    import resfused
    backend, device = case
    steps = 2 if interpreted(*case) else 5
    ref = torch.nn.BatchNorm2d(7, momentum=momentum, affine=affine, track_running_stats=track).double()
    mine = resfused.BatchNormAct2d(7, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    mine.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    assert set(mine.state_dict()) == set(ref.state_dict())
    with resfused.use_backend(backend):
        for step in range(steps + 1):
            if step == steps:
                ref.eval()
                mine.eval()
            x = torch.randn(4, 7, 5, 3, dtype=torch.float64) * 2 + 1
            r = torch.randn(4, 7, 5, 3, dtype=torch.float64)
            xo = x.float().to(device).requires_grad_()
            xr = x.clone().requires_grad_()
            out = mine(xo, r.float().to(device))
            expected = torch.relu(ref(xr) + r)
            assert_close(out, expected, 1e-5, 1e-5, what=f"step {step} output")
            g = torch.randn_like(expected)
            out.backward(g.float().to(device))
            expected.backward(g)
            assert_close(xo.grad, xr.grad, 1e-4, 1e-4, what=f"step {step} grad x")
            if affine:
                assert_close(mine.weight.grad, ref.weight.grad, 1e-4, 1e-4, what=f"step {step} grad weight")
                assert_close(mine.bias.grad, ref.bias.grad, 1e-4, 1e-4, what=f"step {step} grad bias")
                mine.weight.grad = mine.bias.grad = ref.weight.grad = ref.bias.grad = None
    for name, buf in ref.named_buffers():
        got = dict(mine.named_buffers())[name]
        if buf.is_floating_point():
            assert_close(got, buf, 1e-6, 1e-6, what=f"buffer {name}")
        else:
            assert torch.equal(got.cpu(), buf), f"buffer {name}: {got} != {buf}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nan_and_inf_propagate_like_eager(case):
    backend, device = case
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    x[1, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    r = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    r[2, 3, 1, 1] = float("-inf")
    for training in (True, False):
        rm, rv, w, b = make_bn(4, True, "cpu", torch.float64)
        expected = torch.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training) + r)
        got = RF.batch_norm_act(x.float().to(device), rm.float().to(device), rv.float().to(device),
                                w.float().to(device), b.float().to(device), training, residual=r.float().to(device),
                                backend=backend)
        assert_close(got, expected, 1e-5, 1e-5, what=f"nan/inf training={training}")
        assert torch.equal(torch.isinf(got.cpu()), torch.isinf(expected)), "inf positions differ"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual_kind", ["plain", "bn"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradients_at_nan_and_inf_match_eager(case, layout, residual_kind, training):
    """relu's backward passes the gradient where the output is NaN (threshold_backward), and
    in eval the input gradient does not depend on x, so it stays finite at an infinite x.
    9 channels and 35 pixels: the CPU kernels' vector loops and their scalar tails."""
    backend, device = case
    shape = (2, 9, 5, 7)
    x = torch.randn(shape, dtype=torch.float64)
    r = torch.randn(shape, dtype=torch.float64)
    x[1, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    x[1, 8, 4, 6] = float("-inf")
    r[0, 3, 1, 1] = float("inf")
    r[1, 8, 0, 5] = float("nan")
    r[0, 5, 3, 2] = float("-inf")
    g = torch.randn(shape, dtype=torch.float64)
    bn_x = make_bn(9, True, "cpu", torch.float64)
    bn_r = make_bn(9, True, "cpu", torch.float64)

    def leaves(dtype, dev):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xs = [t.to(dev, dtype).contiguous(memory_format=fmt).clone().requires_grad_() for t in (x, r)]
        bns = [clone_bn(bn, dev, dtype) for bn in (bn_x, bn_r)]
        for bn in bns:
            bn[2].requires_grad_()
            bn[3].requires_grad_()
        return xs, bns

    (xe, re), (be, bre) = leaves(torch.float64, "cpu")
    expected = reference(xe, re, be, bre, residual_kind, training, 0.1, 1e-5, True)
    expected.backward(g)
    (xo, ro), (bo, bro) = leaves(torch.float32, device)
    got = ours(xo, ro, bo, bro, residual_kind, training, 0.1, 1e-5, True, backend)
    got.backward(g.float().to(device))
    tol = TOLERANCES[torch.float32]["bwd"]
    named = [("x", xo, xe), ("residual", ro, re), ("weight", bo[2], be[2]), ("bias", bo[3], be[3])]
    if residual_kind == "bn":
        named += [("residual weight", bro[2], bre[2]), ("residual bias", bro[3], bre[3])]
    for name, a, e in named:
        assert_close(a.grad, e.grad, *tol, what=f"grad {name}")
        assert torch.equal(torch.isinf(a.grad.cpu()), torch.isinf(e.grad)), f"grad {name}: inf positions differ"
    if not training:  # the elements next to NaN/inf outputs: finite, eager's values
        assert torch.isfinite(xo.grad).all() and torch.isfinite(ro.grad).all()
    for a, e in [(bo[0], be[0]), (bo[1], be[1])]:
        # a channel with an inf: eager's CPU mean is inf, a Welford mean NaN; both non-finite
        fin = torch.isfinite(e)
        assert_close(a.cpu()[fin], e[fin], 1e-6, 1e-6, what="running statistics")
        assert not torch.isfinite(a.cpu()[~fin]).any(), "running statistics: a non-finite channel became finite"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("residual_kind", [None, "bn"])
def test_eval_gradient_ignores_a_non_finite_running_mean(case, residual_kind):
    """In eval the input gradient is grad * weight * invstd: it reads neither x nor the
    running mean, so a running mean made NaN or inf (by an earlier training batch with an
    inf) leaves the gradient finite, as in eager PyTorch (the output is NaN there)."""
    backend, device = case
    shape = (2, 9, 5, 7)
    x = torch.randn(shape, dtype=torch.float64)
    r = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    bn_x = make_bn(9, True, "cpu", torch.float64)
    bn_r = make_bn(9, True, "cpu", torch.float64)
    bn_x[0][1], bn_x[0][4] = float("nan"), float("inf")
    bn_r[0][2] = float("-inf")

    def run(dtype, dev, mine):
        xs = [t.to(dev, dtype).clone().requires_grad_() for t in (x, r)]
        bns = [clone_bn(bn, dev, dtype) for bn in (bn_x, bn_r)]
        args = (xs[0], xs[1], bns[0], bns[1], residual_kind, False, 0.1, 1e-5, False)
        out = ours(*args, backend) if mine else reference(*args)
        out.backward(g.to(dev, dtype))
        return xs

    (xo, ro), (xe, re) = run(torch.float32, device, True), run(torch.float64, "cpu", False)
    assert torch.isfinite(xe.grad).all()
    assert_close(xo.grad, xe.grad, *TOLERANCES[torch.float32]["bwd"], what="grad x")
    if residual_kind:
        assert_close(ro.grad, re.grad, *TOLERANCES[torch.float32]["bwd"], what="grad residual")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_zero_size_batch_behaves_like_batchnorm2d(case, layout):
    import resfused
    backend, device = case
    ref = torch.nn.BatchNorm2d(3)
    mine = resfused.BatchNormAct2d(3, activation="identity").to(device)
    with torch.no_grad():
        for m in (ref, mine):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(2.0)
    x = torch.randn(0, 3, 4, 4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xo = x.to(device).requires_grad_()
    with resfused.use_backend(backend):
        out = mine(xo)
        out.sum().backward()
    expected = ref(x.requires_grad_())
    expected.sum().backward()
    assert out.shape == expected.shape
    assert torch.equal(mine.running_mean.cpu(), ref.running_mean)
    assert torch.equal(mine.running_var.cpu(), ref.running_var)
    assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked)
    assert xo.grad.shape == x.shape
    assert torch.equal(mine.weight.grad.cpu(), ref.weight.grad)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_fp64(case, residual, training, layout):
    """fp64 gradcheck on tiny shapes, every backend (Triton through the interpreter here)."""
    backend, device = case
    shape = (2, 3, 3, 2)
    x = make_input(shape, layout, torch.float64, device).requires_grad_()
    r = make_input(shape, layout, torch.float64, device).requires_grad_() if residual else None
    rm, rv, w, b = make_bn(3, True, device, torch.float64)
    rrm, rrv, rw, rb = make_bn(3, True, device, torch.float64)
    w.requires_grad_()
    b.requires_grad_()
    rw.requires_grad_()
    rb.requires_grad_()

    if residual == "bn":
        def fn(x, r, w, b, rw, rb):
            return RF.dual_batch_norm_act(x, r, (rm.clone(), rv.clone(), w, b), (rrm.clone(), rrv.clone(), rw, rb),
                                          training, backend=backend)
        inputs = (x, r, w, b, rw, rb)
    else:
        def fn(x, w, b, *r):
            return RF.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, residual=r[0] if r else None,
                                     backend=backend)
        inputs = (x, w, b) + ((r,) if r is not None else ())
    # the relu kink: keep inputs away from it so finite differences are meaningful
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_from", ["out", "recompute"])
def test_reduce_writes_dz(case, layout, dtype, mask_from):
    """bn_act_bwd_reduce(write_dz=True) returns the same sums as without, and dz equal
    (exactly) to grad_out masked by relu; an apply pass on dz with relu=False gives the
    apply pass's dx on grad_out."""
    from resfused.ops import bn_act as ops

    backend, device = case
    if dtype not in __import__("resfused")._backend.SUPPORTED_DTYPES[backend]:
        pytest.skip(f"{backend} does not support {dtype}")
    shape = (2, 65, 5, 3)
    x, r, g = (make_input(shape, layout, dtype, device) for _ in range(3))
    c = shape[1]
    affine = torch.stack([torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)])
    stats = torch.stack([torch.randn(c, device=device), torch.rand(c, device=device) + 0.5])
    coef = torch.randn(4, c, device=device)
    out = ops.bn_act_fwd(x, affine, r, None, True, backend)
    out_arg, res_arg = (out, None) if mask_from == "out" else (None, r)
    sums, dz = ops.bn_act_bwd_reduce(g, x, affine, stats, res_arg, None, None, out_arg, True, True, backend)
    sums_ref, empty = ops.bn_act_bwd_reduce(g, x, affine, stats, res_arg, None, None, out_arg, True, False, backend)
    assert empty.numel() == 0
    assert torch.equal(sums, sums_ref)
    assert dz.dtype == x.dtype and dz.shape == x.shape
    assert dz.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                            else torch.contiguous_format)
    assert torch.equal(dz, torch.where(out > 0, g, torch.zeros_like(g)))
    dx, _ = ops.bn_act_bwd_apply(dz, x, affine, coef, None, None, None, None, False, backend)
    dx_ref, _ = ops.bn_act_bwd_apply(g, x, affine, coef, res_arg, None, None, out_arg, True, backend)
    assert torch.equal(dx, dx_ref)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 7, 5, 3), (2, 16, 1, 1), (1, 5, 4, 4), (2, 16, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_prefix_views(case, layout, shape, dtype, monkeypatch):
    """x = wide[:, :C] (a dense block's prefix): every op (with a residual, dz written)
    gives exactly what it gives on a contiguous copy of x, and the backends read the view
    in place (no copy made; the triton kernels are handed the view itself): cpu, triton
    and cuda always in NCHW (H*W > 1), and in channels_last (cuda: where C and the row
    stride are multiples of 16 bytes)."""
    from resfused import _backend
    from resfused.ops import bn_act as ops

    backend, device = case
    if dtype not in _backend.SUPPORTED_DTYPES[backend]:
        pytest.skip(f"{backend} does not support {dtype}")
    n, c, h, w = shape
    wide = make_input((n, c + 8, h, w), layout, dtype, device)
    x = wide[:, :c]
    xc = x.contiguous(memory_format=ops.memory_format_of(x))
    g, r = (make_input(shape, layout, dtype, device) for _ in range(2))
    affine = torch.stack([torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)])
    stats = torch.stack([torch.randn(c, device=device), torch.rand(c, device=device) + 0.5])
    coef = torch.randn(4, c, device=device)

    def run(xx):
        out = ops.bn_act_fwd(xx, affine, r, None, True, backend)
        sums, dz = ops.bn_act_bwd_reduce(g, xx, affine, stats, r, None, None, None, True, True, backend)
        dx, dres = ops.bn_act_bwd_apply(g, xx, affine, coef, r, None, None, None, True, backend)
        return out, sums, dz, dx, dres

    got, want = run(x), run(xc)
    for name, a, b in zip(("out", "sums", "dz", "dx", "dres"), got, want):
        if name == "sums":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert a.is_contiguous(memory_format=ops.memory_format_of(xc)), name
            assert torch.equal(a, b), name
    in_place = backend in ("cpu", "triton") or (backend == "cuda" and (layout == "nchw" and h * w > 1
                                                                       or c * x.element_size() % 16 == 0))
    if in_place and n * h * w > 1 and n > 1:
        assert backend in ops.PREFIX_VIEW_BACKENDS and ops.is_prefix_view(x)
        from torch.profiler import ProfilerActivity, profile

        launched = []
        if backend == "triton":  # the interpreter copies every operand: check what is launched
            from resfused.triton import bn_act as tbn

            launch = tbn._launch
            monkeypatch.setattr(tbn, "_launch", lambda name, grid, args, geo=None: (
                launched.append((name, args[0] if name.startswith("fwd") else args[1])),
                launch(name, grid, args, geo))[-1])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(x)
        if backend == "triton":
            xs = [t for name, t in launched if name != "colsum"]
            assert len(xs) == 3
            assert all(t.data_ptr() == x.data_ptr() and t.stride() == x.stride() for t in xs), \
                "the triton backend did not hand the prefix view itself to its kernels"
        if not interpreted(backend, device):
            copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
            assert not copies, f"the {backend} backend copied the prefix view: {copies}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_prefix_view_odd_batch_stride(case):
    """An NCHW channel-prefix view whose batch stride is not a whole number of channel
    planes (only as_strided makes one): each backend reads it in place or copies it, and
    every op gives what it gives on a contiguous copy."""
    from resfused.ops import bn_act as ops

    backend, device = case
    shape, strides = (2, 3, 2, 2), (13, 4, 2, 1)
    x = torch.as_strided(torch.randn(26, device=device), shape, strides)
    assert ops.is_prefix_view(x)
    xc = x.contiguous()
    g = torch.randn(shape, device=device)
    affine = torch.stack([torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)])
    stats = torch.stack([torch.randn(3, device=device), torch.rand(3, device=device) + 0.5])
    coef = torch.randn(4, 3, device=device)
    got, want = ([ops.bn_act_fwd(xx, affine, None, None, True, backend),
                  ops.bn_act_bwd_reduce(g, xx, affine, stats, None, None, None, None, True, True, backend)[1],
                  ops.bn_act_bwd_apply(g, xx, affine, coef, None, None, None, None, True, backend)[0]]
                 for xx in (x, xc))
    for a, b in zip(got, want):
        assert a.is_contiguous() and torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 7, 5, 3), (2, 16, 3, 5), (2, 65, 3, 3), (3, 7, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mask", ["recompute", "out", "none"])
def test_apply_accumulates_into_a_prefix(case, layout, shape, dtype, mask, monkeypatch):
    """bn_act_bwd_apply_acc adds the apply pass's dx into ``acc`` in place, rounded once
    (the contract: acc + dx in the accumulation dtype), where x and acc are the same
    channel prefix of two like buffers (a dense layer's prefix of the feature buffer and
    of the gradient buffer), and where they are whole tensors; the other channels of the
    gradient buffer are untouched. Backends that read the view hand both views to their
    kernels (no copy); a pair whose strides differ is still summed right."""
    from resfused import _backend
    from resfused.ops import bn_act as ops
    from resfused.ops import eager

    backend, device = case
    if dtype not in _backend.SUPPORTED_DTYPES[backend]:
        pytest.skip(f"{backend} does not support {dtype}")
    n, c, h, w = shape
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    wide = make_input((n, c + 8, h, w), layout, dtype, device)
    gwide = make_input((n, c + 8, h, w), layout, dtype, device)
    g = make_input(shape, layout, dtype, device)
    affine = torch.stack([torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)]).to(acc_t)
    coef = torch.randn(4, c, device=device, dtype=acc_t)
    relu = mask != "none"
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = ops.bn_act_fwd(wide[:, :c], affine, None, None, True, "eager") if mask == "out" else None
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 ** -7)
    called = []
    impl = ops._backend_impl
    monkeypatch.setattr(ops, "_backend_impl", lambda name, op: (called.append(op), impl(name, op))[-1])
    for x, acc in ((wide[:, :c], gwide[:, :c]),  # prefix views, as in a dense block
                   (wide[:, :c].contiguous(memory_format=fmt), gwide[:, :c].contiguous(memory_format=fmt)),
                   (wide[:, :c].contiguous(memory_format=fmt), gwide[:, :c])):  # strides differ
        before = gwide.clone()
        want = acc.clone()
        eager.bn_act_bwd_apply_acc(want, g, x, affine, coef, out, relu)
        called.clear()
        ops.bn_act_bwd_apply_acc(acc, g, x, affine, coef, out, relu, backend)
        assert_close(acc, want, tol, tol, f"acc ({'view' if ops.is_prefix_view(x) else 'dense'} x)")
        if acc.data_ptr() == gwide.data_ptr():  # the rest of the gradient buffer is untouched
            assert torch.equal(gwide[:, c:], before[:, c:])
        else:
            assert torch.equal(gwide, before)
        if backend != "eager" and acc.stride() == x.stride() and ops.reads_as_is(backend, x):
            assert called == ["bn_act_bwd_apply_acc"], called  # one pass: the backend's own
    # the views are read in place: no copy, one kernel launch for a view-reading backend
    x, acc = wide[:, :c], gwide[:, :c]
    if backend in ("cpu", "triton") and n * h * w > 1 and not interpreted(backend, device) \
            or (backend == "cuda" and (layout == "nchw" and h * w > 1 or c * x.element_size() % 16 == 0)):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ops.bn_act_bwd_apply_acc(acc, g, x, affine, coef, out, relu, backend)
        copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous",
                                                               "aten::add_")]
        assert not copies, f"the {backend} backend copied or added separately: {copies}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_apply_acc_rounds_once(case, dtype):
    """acc + dx is rounded once into acc's dtype on every path (one pass on the views, and
    the strides-differ path): here 1 + 2^-8 * (1 + 2^-9) rounds up to 1 + 2^-7 in bf16,
    where rounding dx first (to 2^-8) and then the sum (a tie, to even) gives 1."""
    from resfused import _backend
    from resfused.ops import bn_act as ops

    backend, device = case
    if dtype not in _backend.SUPPORTED_DTYPES[backend]:
        pytest.skip(f"{backend} does not support {dtype}")
    n, c, h, w = 2, 16, 3, 3
    eps = torch.finfo(dtype).eps  # 2^-7 (bf16), 2^-10 (fp16)
    wide = torch.randn(n, c + 16, h, w, device=device).to(dtype)
    g = torch.full((n, c, h, w), eps / 2, device=device, dtype=dtype)
    affine = torch.stack([torch.ones(c, device=device), torch.zeros(c, device=device)])
    coef = torch.zeros(4, c, device=device)
    coef[1] = 1 + eps / 4  # dx = g*k: mean, mdz and p are 0
    want = 1 + eps
    for x_view, acc_view in ((True, True), (True, False), (False, False)):
        gbuf = torch.ones(n, c + 16, h, w, device=device, dtype=dtype)
        acc = gbuf[:, :c] if acc_view else torch.ones(n, c, h, w, device=device, dtype=dtype)
        x = wide[:, :c] if x_view else wide[:, :c].contiguous()
        ops.bn_act_bwd_apply_acc(acc, g, x, affine, coef, None, False, backend)
        assert torch.all(acc == want), (x_view, acc_view, acc.flatten()[:4].tolist())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_apply_acc_bad_input_changes_nothing(case):
    from resfused.ops import bn_act as ops

    backend, device = case
    x = torch.randn(2, 3, 4, 4, device=device)
    g = torch.randn_like(x)
    affine = torch.randn(2, 3, device=device)
    coef = torch.randn(4, 3, device=device)
    for acc in (torch.randn(2, 4, 4, 4, device=device), torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)):
        before = acc.clone()
        with pytest.raises(ValueError, match="acc must match x"):
            ops.bn_act_bwd_apply_acc(acc, g, x, affine, coef, None, True, backend)
        assert torch.equal(acc, before)
    # acc sharing memory with an input: channels 1..3 of a buffer whose channels 0..2 are x
    buf = torch.randn(2, 5, 4, 4, device=device)
    before = buf.clone()
    for acc, xx, gg, what in ((buf[:, 1:4], buf[:, 0:3], g, "x"), (buf[:, 1:4], x, buf[:, 0:3], "grad_out")):
        with pytest.raises(ValueError, match=f"acc must not share memory with {what}"):
            ops.bn_act_bwd_apply_acc(acc, gg, xx, affine, coef, None, True, backend)
        assert torch.equal(buf, before)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "prefix"])
@pytest.mark.parametrize("residual", [None, "plain", "bn"])
def test_cpu_kernels_across_slot_piece_and_flush_boundaries(layout, residual):
    """The cpu kernels on a tensor large enough for several work slots, several 2048-element
    pieces per NCHW row and several 256-row flush blocks per channels_last slot, with a
    channel count that leaves a scalar tail after the vector blocks (and x a channel-prefix
    view of a wider buffer): forward, running statistics and every gradient match the
    float64 oracle, and are bitwise the same on one thread as on two (slots depend on the
    size only)."""
    from resfused import use_backend

    shape = (6, 13, 80, 70)  # 436800 elements: 2 slots; H*W = 5600: 3 pieces per row
    if layout == "prefix":
        x0 = make_input((6, 21, 80, 70), "nchw", torch.float32, "cpu")[:, :13]
    else:
        x0 = make_input(shape, layout, torch.float32, "cpu")
    r0 = make_input(shape, "channels_last" if layout == "channels_last" else "nchw", torch.float32, "cpu") \
        if residual else None
    g = torch.randn(shape, dtype=torch.float64)
    bn = make_bn(13, True, "cpu")
    rbn = make_bn(13, True, "cpu") if residual == "bn" else None

    def run(dtype):
        x = x0.detach().to(dtype).requires_grad_()
        r = None if r0 is None else r0.detach().to(dtype).requires_grad_()
        rm, rv, w, b = [t.detach().clone().to(dtype) for t in bn]
        w.requires_grad_()
        b.requires_grad_()
        extra = []
        if rbn is not None:
            rrm, rrv, rw, rb = [t.detach().clone().to(dtype) for t in rbn]
            rw.requires_grad_()
            out = RF.dual_batch_norm_act(x, r, (rm, rv, w, b), (rrm, rrv, rw, rb), True)
            extra = [rrm, rrv]
        else:
            out = RF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r)
        out.backward(g.to(dtype).contiguous(memory_format=torch.channels_last)
                     if layout == "channels_last" else g.to(dtype))
        grads = [] if r is None else [r.grad] + ([] if rbn is None else [rw.grad])
        return [t.detach() for t in [out, x.grad, w.grad, b.grad, rm, rv] + extra + grads]

    n = torch.get_num_threads()
    try:
        with use_backend("cpu"):
            torch.set_num_threads(1)
            one = run(torch.float32)
            torch.set_num_threads(2)
            two = run(torch.float32)
    finally:
        torch.set_num_threads(n)
    with use_backend("eager"):
        ref = run(torch.float64)
    names = ["out", "grad x", "grad weight", "grad bias", "running_mean", "running_var"]
    names += ["residual running_mean", "residual running_var"] if rbn is not None else []
    names += ["grad residual"] + (["grad residual weight"] if rbn is not None else []) if residual else []
    assert len(names) == len(one) == len(two) == len(ref)
    for name, a, b, want in zip(names, one, two, ref):
        assert torch.equal(a, b), f"{name}: one thread and two threads differ"
        tol = 1e-5 if name == "out" or "running" in name else 1e-4
        assert_close(a, want, tol * max(float(want.abs().max()), 1.0), tol, what=name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(4, 8, 1, 1), (2, 1, 3, 3)], ids=["Nx8x1x1", "Nx1x3x3"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True])
def test_outputs_keep_x_strides_when_both_layouts_apply(case, shape, layout, residual):
    """At 1x1 spatial (ResNet's last stage on small images) or one channel, a tensor is
    contiguous in both layouts and only its strides say which it is. Outputs and gradients
    keep x's strides: with NCHW strides there, cuDNN computes a channels_last layer's
    weight gradient in NCHW and autograd copies it into the weight's layout every step."""
    backend, device = case
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def make():  # (.contiguous(memory_format=...) would keep a tensor that is contiguous both ways as it is)
        return torch.empty(shape, device=device, memory_format=fmt).copy_(torch.randn(shape, device=device))

    x = make().requires_grad_()
    r = make().requires_grad_() if residual else None
    w = torch.rand(shape[1], device=device, requires_grad=True)
    b = torch.randn(shape[1], device=device, requires_grad=True)
    rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
    seen = {}
    x.register_hook(lambda g: seen.__setitem__("grad x", g.stride()))
    if residual:
        r.register_hook(lambda g: seen.__setitem__("grad residual", g.stride()))
    out = RF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r, backend=backend)
    assert out.stride() == x.stride(), f"output strides {out.stride()} != x's {x.stride()}"
    out.backward(make())
    for what, stride in seen.items():
        assert stride == x.stride(), f"{what} strides {stride} != x's {x.stride()}"
    assert len(seen) == 1 + residual


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weight,bias,update", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("c", [1, 7, 300])
def test_bn_coef_matches_oracle(case, dtype, weight, bias, update, c):
    """The per-channel step (scale, shift, invstd, running-statistics update) against
    float64, in one launch on every backend."""
    backend, device = case
    g = torch.Generator().manual_seed(c)

    def vec(lo=-1.0, hi=1.0):
        return (torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(device)

    mean, var, w, b, rm, rv = vec(), vec(0.1, 2.0), vec(), vec(), vec(), vec(0.5, 2.0)
    args = [t.to(dtype) for t in (mean, var)] + [w.to(dtype) if weight else None, b.to(dtype) if bias else None]
    run_rm, run_rv = (rm.to(dtype, copy=True), rv.to(dtype, copy=True)) if update else (None, None)
    affine, stats = RF_ops.bn_coef(*args, run_rm, run_rv, 0.1, 1e-5, 5, backend)  # over 5 values: unbias 5/4
    inv = 1 / torch.sqrt(var + 1e-5)
    scale = w * inv if weight else inv
    shift = (b if bias else 0) - mean * scale
    tol = TOLERANCES[dtype]["fwd"]
    assert affine.dtype == stats.dtype == dtype and affine.shape == stats.shape == (2, c)
    assert_close(affine, torch.stack([scale, shift]), *tol, what="affine")
    assert_close(stats, torch.stack([mean, inv]), *tol, what="stats")
    if update:
        assert_close(run_rm, 0.1 * mean + 0.9 * rm, *tol, what="running_mean")
        assert_close(run_rv, 0.1 * var * 1.25 + 0.9 * rv, *tol, what="running_var")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bn_coef_updates_running_stats_of_another_dtype(case):
    """bf16 running statistics (allowed beside a bf16 input) are updated in float32 and
    rounded once, as eager's composition does."""
    backend, device = case
    mean, var = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    rm, rv = torch.randn(5, device=device).bfloat16(), (torch.rand(5, device=device) + 0.5).bfloat16()
    want_rm = (0.1 * mean + 0.9 * rm.float()).bfloat16()
    want_rv = (0.1 * (var * 2.0) + 0.9 * rv.float()).bfloat16()
    RF_ops.bn_coef(mean, var, None, None, rm, rv, 0.1, 1e-5, 2, backend)  # over 2 values: unbias 2
    assert rm.dtype == rv.dtype == torch.bfloat16
    assert torch.equal(rm, want_rm) and torch.equal(rv, want_rv)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("cpu", "cuda")], ids=case_id)
def test_a_bn_launches_only_its_passes(case):
    """Per training BN-ReLU(+residual): forward runs the statistics pass, the per-channel
    coefficient op and the apply pass (and num_batches_tracked's increment); backward the
    reduction pass, the per-channel coefficient op and the apply pass. On a GPU
    each op is a kernel launch paid in host time, which is what the fused calls were
    spending theirs on (benchmarks/results/gpu-check-nvidia-h200.md)."""
    backend, device = case
    m = resfused.nn.BatchNormAct2d(8).to(device).train()
    x = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    r = torch.randn(2, 8, 4, 4, device=device)
    with resfused.use_backend(backend):
        with DispatchLog() as fwd:
            out = m(x, r)
        with DispatchLog() as bwd:
            out.backward(torch.ones_like(out))
    assert fwd.ops == ["aten.add_", "resfused_C.bn_stats", "resfused_C.bn_coef", "resfused_C.bn_act_fwd"], fwd.ops
    assert bwd.ops == ["resfused_C.bn_act_bwd_reduce", "resfused_C.bn_grad_coef", "resfused_C.bn_act_bwd_apply"], \
        bwd.ops


NATIVE_CASES = [c for c in CASES if c[0] in ("cpu", "cuda")]


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("row", [1, 2])
@pytest.mark.parametrize("c", [1, 7, 300])
def test_bn_grad_coef_matches_the_python_sequence(case, dtype, training, row, c):
    """resfused_C.bn_grad_coef (one launch) gives the backward's coefficients that
    _grad_coefficients' three tensor ops give, bit for bit on the tensors' device:
    (mean, scale, sum_dz/n, sum_dz_xhat*invstd/n). (On a GPU ATen divides by a scalar as a
    product with its reciprocal; the CUDA kernel does the same.)"""
    from resfused.autograd.bn_act import _grad_coefficients

    backend, device = case
    resfused._backend.load_extension()
    stats, affine, sums = (torch.randn(k, c, dtype=dtype, device=device) for k in (2, 2, 3))
    count = 37
    got = torch.ops.resfused_C.bn_grad_coef(stats, affine, sums, row, training, count)
    want = _grad_coefficients(stats, affine, sums[0], sums[row], training, count)
    assert got.shape == (4, c) and got.dtype == dtype
    assert torch.equal(got, want)  # bit for bit: the native blocks' gradients rest on it
    # (its argument checks: test_native_argument_checks_raise_and_do_not_crash)


_NATIVE_ERRORS = [  # (call, the exception's type, words its message must hold), on device d
    ("C_.bn_stats(x[0])", "RuntimeError", "4-D"),
    ("C_.bn_act_fwd(x, torch.randn(2, 4, device=d), None, None, True)", "RuntimeError", "affine"),
    ("C_.bn_act_fwd(x, aff, x[:1], None, True)", "RuntimeError", "residual"),
    ("C_.bn_act_bwd_apply_acc(x[:1], x, x, aff, torch.randn(4, 3, device=d), None, True)", "RuntimeError",
     "acc must match x"),
    ("C_.bn_coef(st[0], st[1].half(), None, None, None, None, 0.1, 1e-5, 1.0)", "RuntimeError", "dtype"),
    ("C_.bn_grad_coef(st, aff, sums, 3, True, 5)", "RuntimeError", "row must be 1 or 2"),
    ("C_.bn_grad_coef(st, aff.half(), sums, 1, True, 5)", "RuntimeError", "stats' dtype"),
    ("C_.bn_stats_coef(x, None, None, torch.zeros(3, device=d), None, True, 0.1, 1e-5)", "ValueError",
     "go together"),
]
_NATIVE_ERROR_SCRIPT = """
import sys, torch, resfused
resfused._backend.load_extension()
C_, d = torch.ops.resfused_C, sys.argv[1]
x = torch.randn(2, 3, 4, 4, device=d)
aff, st = C_.bn_stats_coef(x, None, None, None, None, True, 0.1, 1e-5)
sums = torch.randn(3, 3, device=d)
for call in sys.argv[2:]:
    try:
        eval(call)
        print("returned", flush=True)
    except (RuntimeError, ValueError) as e:
        print(type(e).__name__, str(e).splitlines()[0], flush=True)
"""


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_argument_checks_raise_and_do_not_crash(case):
    """Each native op's own argument checks raise a Python exception that says what is
    wrong, on every device, in a process of its own so that a crash is a failure naming
    the call, not the end of the test run."""
    import os
    import subprocess
    import sys

    backend, device = case
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-X", "faulthandler", "-c", _NATIVE_ERROR_SCRIPT, device,
            *(call for call, _, _ in _NATIVE_ERRORS)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:  # a crash: the native stack, where gdb can give it
        import shutil

        stack = ""
        if shutil.which("gdb"):
            g = subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 40", "--args", *argv], env=env,
                               capture_output=True, text=True, timeout=600)
            stack = g.stdout[-6000:]
        pytest.fail(f"exit status {proc.returncode} after {lines}:\n{proc.stderr[-4000:]}\n{stack}")
    assert len(lines) == len(_NATIVE_ERRORS), lines
    for (call, kind, words), line in zip(_NATIVE_ERRORS, lines):
        assert line.startswith(kind + " ") and words in line, (call, line)


def _with_and_without_composites(monkeypatch, fn):
    """fn() through the composites of resfused._C, then through the Python sequence of ops."""
    from resfused.autograd import bn_act as A

    first = fn()
    monkeypatch.setattr(A, "_COMPOSITE_BACKENDS", ())
    return first, fn()


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype,stat_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("others", ["same", "other"])
def test_composites_match_the_python_sequence(case, layout, dtype, stat_dtype, training, residual, others,
                                              monkeypatch):
    """A BN-ReLU(+add) through resfused._C's composites (bn_stats_coef, bn_act_bwd: the
    per-BN sequences as one call each) gives what the Python sequence of the same ops gives:
    outputs and running statistics bit for bit, gradients to the rounding of the backward's
    coefficients (one op there, three here). ``others``: the residual and the output
    gradient in x's layout, or in the other one / a strided view (the op layer's
    conversions, which the composites make too)."""
    backend, device = case
    shape = (3, 6, 4, 5)
    other = {"nchw": "channels_last", "channels_last": "noncontig"}[layout] if others == "other" else layout
    x0 = make_input(shape, layout, dtype, device)
    r0 = make_input(shape, other, dtype, device)
    bn_x0 = make_bn(6, True, device, stat_dtype)
    bn_r0 = make_bn(6, True, device, stat_dtype)
    g = make_input(shape, other, dtype, device)

    def run():
        x = x0.clone().requires_grad_()
        r = r0.clone().requires_grad_()
        bn_x, bn_r = clone_bn(bn_x0), clone_bn(bn_r0)
        for t in bn_x[2:] + bn_r[2:]:
            t.requires_grad_()
        with resfused.use_backend(backend):
            out = ours(x, r if residual else None, bn_x, bn_r, residual, training, 0.1, 1e-5, True, "auto")
        out.backward(g)
        grads = [x.grad, r.grad if residual else None] + [t.grad for t in bn_x[2:] + (bn_r[2:] if residual == "bn"
                                                                                      else ())]
        return out.detach(), bn_x[:2] + (bn_r[:2] if residual == "bn" else ()), grads

    (out_c, stats_c, grads_c), (out_p, stats_p, grads_p) = _with_and_without_composites(monkeypatch, run)
    assert torch.equal(out_c, out_p)
    for a, b in zip(stats_c, stats_p):
        assert a.dtype == stat_dtype and torch.equal(a, b)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=1.6e-2, atol=1e-5)
    for a, b in zip(grads_c, grads_p):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (4, 6, 1, 1), (1, 4, 1, 3), (0, 6, 3, 3)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("wanted", ["x", "params", "none"])
@pytest.mark.parametrize("residual", [None, "plain", "bn"])
def test_composites_match_the_python_sequence_at_the_edges(case, shape, layout, training, wanted, residual,
                                                           monkeypatch):
    """The same agreement at shapes contiguous in both layouts (C == 1, H*W == 1), an empty
    batch (no running-statistics update), and with only some gradients wanted (the
    backward's reduction or apply pass left out), running statistics strided and in
    another dtype than the accumulation dtype."""
    backend, device = case
    if training and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("one value per channel: rejected in training")
    c = shape[1]
    x0 = make_input(shape, layout, torch.float32, device)
    r0 = make_input(shape, layout, torch.float32, device)
    g = make_input(shape, "noncontig", torch.float32, device)

    def run():
        x = x0.clone().requires_grad_(wanted == "x")
        r = r0.clone()
        bn_x = (torch.zeros(2 * c, device=device)[::2].fill_(0.3), torch.ones(c, device=device),
                torch.rand(c, device=device).requires_grad_(wanted == "params"),
                torch.randn(c, device=device).requires_grad_(wanted == "params"))
        bn_r = clone_bn(make_bn(c, True, device))
        with resfused.use_backend(backend):
            out = ours(x, r if residual else None, bn_x, bn_r, residual, training, 0.1, 1e-5, True, "auto")
        if out.requires_grad:
            out.backward(g)
        return out.detach(), bn_x[:2] + bn_r[:2], [x.grad] + [t.grad for t in bn_x[2:]]

    torch.manual_seed(0)
    (out_c, stats_c, grads_c) = run()
    from resfused.autograd import bn_act as A

    monkeypatch.setattr(A, "_COMPOSITE_BACKENDS", ())
    torch.manual_seed(0)
    (out_p, stats_p, grads_p) = run()
    assert torch.equal(out_c, out_p)
    for a, b in zip(stats_c, stats_p):
        assert torch.equal(a, b)
    for a, b in zip(grads_c, grads_p):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_composite_argument_errors(case):
    """The composites' own checks: what the Python sequence raised as ValueError stays one."""
    from resfused.autograd.bn_act import bn_act_backward

    backend, device = case
    resfused._backend.load_extension()
    x = torch.randn(2, 3, 4, 4, device=device)
    affine, stats = torch.ops.resfused_C.bn_stats_coef(x, None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="plain residual needs `out`"):
        bn_act_backward(x, x, None, affine, stats, True, True, backend, need_dx=True, need_sums=True,
                        plain_residual_grad=True, residual=x)
    with pytest.raises(ValueError, match="needs residual, res_affine and res_stats"):
        torch.ops.resfused_C.bn_act_bwd(x, x, None, affine, stats, x, None, stats, True, True, False, True, True,
                                        False)
    with pytest.raises(ValueError, match="go together"):
        torch.ops.resfused_C.bn_stats_coef(x, None, None, torch.zeros(3, device=device), None, True, 0.1, 1e-5)
