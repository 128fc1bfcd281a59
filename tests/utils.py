"""Shared test helpers: the device/backend matrix, tolerance table and an explaining assert."""
from __future__ import annotations

import os

import torch

from resfused._backend import BACKENDS, unavailable_reason

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(include=BACKENDS):
    """(backend, device) pairs this machine can run; CUDA ones appear where a GPU exists."""
    cases = []
    for dev in DEVICES:
        for name in include:
            if not unavailable_reason(name, torch.device(dev)):
                cases.append((name, dev))
    return cases


def case_id(case):
    return f"{case[0]}-{case[1]}"


# Tolerances per dtype, forward and backward (atol, rtol), against a float64 oracle.
TOLERANCES = {
    torch.float64: {"fwd": (1e-10, 1e-10), "bwd": (1e-9, 1e-9)},
    torch.float32: {"fwd": (1e-5, 1e-5), "bwd": (1e-4, 1e-4)},
}
# bf16/fp16: our error against the oracle must be within this factor of eager PyTorch's own.
LOW_PRECISION_FACTOR = 2.0


def interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """allclose that says where and how badly it fails (worst element, index, fraction out)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ ({int(nan_a.sum())} vs {int(nan_e.sum())})"
    a = torch.where(nan_a, torch.zeros_like(a), a)
    e = torch.where(nan_e, torch.zeros_like(e), e)
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        idx = int(torch.argmax(err - bound))
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} ({100.0 * float(bad.float().mean()):.3f}%) elements out of "
            f"tolerance atol={atol} rtol={rtol}; worst at {pos}: got {a.flatten()[idx].item():.9g}, "
            f"expected {e.flatten()[idx].item():.9g} (|diff|={err.flatten()[idx].item():.3g})")


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    return float((a - e).abs().max()) if a.numel() else 0.0


def assert_low_precision(ours: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, what: str,
                         floor: float = 0.0, factor: float = LOW_PRECISION_FACTOR):
    """Our error against the fp64 oracle is at most ``factor`` x eager PyTorch's own.

    Results that are themselves fp32 (parameter gradients, running statistics of a
    low-precision input) may also sit within the fp32 tolerance of the oracle. Returns
    (our error, eager's error, the floor applied)."""
    if ours.dtype in TOLERANCES and ours.numel():
        atol, rtol = TOLERANCES[ours.dtype]["bwd"]
        floor = max(floor, atol + rtol * float(oracle.detach().abs().max()))
    ours_err = max_abs_err(ours, oracle)
    eager_err = max_abs_err(eager, oracle)
    assert ours_err <= factor * eager_err + floor, (
        f"{what}: error vs fp64 oracle {ours_err:.4g} > {factor} x eager's {eager_err:.4g}"
        f" (+ {floor:.2g})")
    return ours_err, eager_err, floor


#: A whole model's gradients and buffers: each tensor within this factor of eager's own
#: error (a broken tensor is off by orders of magnitude, not by a few), and all of them
#: together (root-sum-square of each tensor's error relative to its largest oracle value)
#: within LOW_PRECISION_FACTOR. A deep net amplifies rounding noise chaotically (BN over a
#: few values per channel in the last stage): the error of each tensor is then noise of
#: about eager's size, and the largest of hundreds of ratios of two such noises passes 2
#: by chance (one thread instead of two, or a correctly rounded sqrt, was enough).
MODEL_TENSOR_FACTOR = 8.0


def assert_model_low_precision(results, what: str, floor_rel: float = 0.0):
    """``results``: (name, ours, eager, oracle) for each tensor of a model (gradients,
    buffers). Each tensor's error against the fp64 oracle is at most MODEL_TENSOR_FACTOR x
    eager PyTorch's own (plus the dtype's floor, as in ``assert_low_precision``), and the
    root-sum-square of the errors beyond those floors, each relative to its tensor's
    largest oracle value, at most LOW_PRECISION_FACTOR x eager's."""
    ours_sq = eager_sq = 0.0
    for name, ours, eager, oracle in results:
        top = float(oracle.detach().abs().max()) if oracle.numel() else 0.0
        ours_err, eager_err, floor = assert_low_precision(ours, eager, oracle, f"{what} {name}", floor_rel * top,
                                                          MODEL_TENSOR_FACTOR)
        if top > 0:
            ours_sq += (max(ours_err - floor, 0.0) / top) ** 2
            eager_sq += (eager_err / top) ** 2
    assert ours_sq ** 0.5 <= LOW_PRECISION_FACTOR * eager_sq ** 0.5, (
        f"{what}: root-sum-square relative error vs fp64 oracle {ours_sq ** 0.5:.4g} > {LOW_PRECISION_FACTOR} x "
        f"eager's {eager_sq ** 0.5:.4g} over {len(results)} tensors")


def check_no_grad_and_inference_mode(ref, fused, x, device, backend):
    """A training forward under no_grad updates every running statistic exactly once, as
    the reference does; an eval forward under inference_mode matches the reference."""
    import resfused

    with resfused.use_backend(backend):
        with torch.no_grad():
            out = fused(x.float().to(device))
        expected = ref(x)
        assert_close(out, expected, 1e-5, 1e-5, what="no_grad output")
        for (name, b), (_, br) in zip(fused.named_buffers(), ref.named_buffers()):
            if b.is_floating_point():
                assert_close(b, br, 1e-5, 1e-5, what=f"buffer {name} after one forward")
            else:
                assert int(b) == 1 and int(br) == 1, f"{name}: num_batches_tracked must count one forward"
        fused.eval()
        ref.eval()
        with torch.inference_mode():
            out = fused(x.float().to(device))
        assert_close(out, ref(x), 1e-5, 1e-5, what="inference_mode output")


def randomise_bns(module, bias: float = 0.5, running_stats: bool = True):
    """BN parameters (and, by default, running statistics) away from their 1/0 defaults.
    Returns the module."""
    from torch import nn

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-bias, bias)
                if running_stats:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return module


def run_against_reference(fused, ref, x, layout, device, backend):
    """Forward and backward of ``fused`` (fp32 on ``device``, in ``layout``) and ``ref``
    (x's dtype, CPU) on the same input and output gradient; checks the output (and that
    channels_last is kept) and the input gradient. Parameter and buffer checks are the caller's."""
    import resfused

    xo = x.float().to(device)
    if layout == "channels_last":
        xo = xo.contiguous(memory_format=torch.channels_last)
    xo.requires_grad_()
    xr = x.clone().requires_grad_()
    with resfused.use_backend(backend):
        out = fused(xo)
        expected = ref(xr)
        assert_close(out, expected, 1e-5, 1e-5, what="block output")
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
        g = torch.randn_like(expected)
        out.backward(g.float().to(device))
    expected.backward(g)
    assert_close(xo.grad, xr.grad, 1e-4, 1e-4, what="grad x")


def rel_tol(expected: torch.Tensor, rel: float):
    """(atol, rtol) relative to the tensor's largest magnitude."""
    return rel * max(float(expected.detach().abs().max()), 1e-12), rel


def paired_for_sgd(ref, mine, device, layout: str):
    """``mine`` loaded with ``ref``'s state_dict, on ``device`` in ``layout``, and an SGD
    optimizer (lr 0.01, momentum 0.9) for each: ``(mine, fmt, opt_ref, opt_mine)``."""
    mine.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    mine = mine.to(device).to(memory_format=fmt)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.01, momentum=0.9)
    return mine, fmt, opt_ref, opt_mine


def sgd_step_against_reference(ref, mine, opt_ref, opt_mine, training: bool, device, fmt, what: str):
    """One step of both models on the same random batch (cross-entropy, 10 classes):
    outputs, input gradient and every parameter gradient compared (float64 models, the
    fp32 tolerances relative to each tensor's largest value), then an SGD step when training."""
    import torch.nn.functional as F

    ref.train(training)
    mine.train(training)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    target = torch.randint(0, 10, (4,))
    xr = x.clone().requires_grad_()
    xm = x.clone().to(device).contiguous(memory_format=fmt).requires_grad_()
    out_ref = ref(xr)
    out = mine(xm)
    assert_close(out, out_ref, *rel_tol(out_ref, 1e-5), what=f"{what} output")
    loss_ref = F.cross_entropy(out_ref, target)
    loss = F.cross_entropy(out, target.to(device))
    opt_ref.zero_grad()
    opt_mine.zero_grad()
    loss_ref.backward()
    loss.backward()
    assert_close(xm.grad, xr.grad, *rel_tol(xr.grad, 1e-4), what=f"{what} input grad")
    for (pn, p), (_, pr) in zip(mine.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, pr.grad, *rel_tol(pr.grad, 1e-4), what=f"{what} grad {pn}")
    if training:
        opt_ref.step()
        opt_mine.step()


def gradcheck_module(module, x: torch.Tensor, backend: str) -> None:
    """fp64 gradcheck of ``module(x)`` with respect to x and every parameter (running
    statistics cloned per call, so each evaluation starts from the same buffers)."""
    import resfused

    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    buffers = {n: b for n, b in module.named_buffers()}

    def fn(x, *ps):
        state = dict(zip(names, ps))
        state.update({n: b.clone() for n, b in buffers.items()})
        with resfused.use_backend(backend):
            return torch.func.functional_call(module, state, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


#: view and alias ops: no kernel runs for them (left out of ``DispatchLog``)
VIEW_OPS = ("aten.detach", "aten.select", "aten.slice", "aten.view", "aten.alias", "aten.ones_like")


def DispatchLog():
    """A dispatch mode (``with DispatchLog() as log``) that records the name of every op
    run inside it, views left out (``log.ops``): on a GPU each is a kernel launch; and
    each such call's name and positional arguments (``log.calls``). It sees the ops
    called from Python and from resfused._C's composites alike."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func).rsplit(".", 1)[0]
            if not name.startswith(VIEW_OPS):
                self.ops.append(name)
                self.calls.append((name, args))
            return func(*args, **(kwargs or {}))

    return _Log()
