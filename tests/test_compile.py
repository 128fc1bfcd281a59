"""torch.compile of fused models: one graph (no graph break) in training and eval, and the
same outputs, gradients and running statistics as the uncompiled model."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck

import resfused
from utils import assert_close, backend_cases, case_id, interpreted, randomise_bns

CASES = [c for c in backend_cases() if not interpreted(*c)]


def _resnet18():
    return randomise_bns(resfused.models.resnet18(num_classes=10), bias=0.2, running_stats=False)


def _densenet():
    tv = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2,
                                     num_classes=10)
    return resfused.convert(randomise_bns(tv, bias=0.2, running_stats=False))


def _converted_resnet():
    return resfused.convert(randomise_bns(torchvision.models.resnet18(num_classes=10), bias=0.2,
                                          running_stats=False))


MODELS = {"resnet18": _resnet18, "densenet": _densenet, "convert(torchvision resnet18)": _converted_resnet}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("training", [True, False])
def test_no_graph_break(case, name, training):
    backend, device = case
    torch.manual_seed(0)
    model = MODELS[name]().to(device).train(training)
    x = torch.randn(2, 3, 32, 32, device=device)
    with resfused.use_backend(backend):
        explanation = torch._dynamo.explain(model)(x)
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, f"{name}: graph breaks: {reasons}"
    assert explanation.graph_count == 1


# On a GPU (where each compile costs the GPU check's time budget) channels_last only, the
# layout GPU training uses; both layouts on the CPU.
MATCH_PARAMS = [pytest.param(case, name, layout, id=f"{layout}-{name}-{case_id(case)}")
                for case in CASES for name in MODELS
                for layout in (["channels_last"] if case[1] == "cuda" else ["nchw", "channels_last"])]


@pytest.mark.parametrize("case,name,layout", MATCH_PARAMS)
def test_compiled_matches_uncompiled(case, name, layout):
    """fullgraph=True (aot_eager: the graph capture and autograd of torch.compile, without
    code generation): two training steps then eval, against the uncompiled model."""
    backend, device = case
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = MODELS[name]().to(device).to(memory_format=fmt)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with resfused.use_backend(backend):
        for step in range(3):
            training = step < 2
            model.train(training)
            ref.train(training)
            x = torch.randn(2, 3, 32, 32, device=device).contiguous(memory_format=fmt)
            out, out_ref = compiled(x), ref(x)
            assert_close(out, out_ref, 1e-5, 1e-5, f"{name} step {step} output")
            if training:
                out.square().sum().backward()
                out_ref.square().sum().backward()
                for (pn, p), q in zip(model.named_parameters(), ref.parameters()):
                    assert_close(p.grad, q.grad, 1e-4, 1e-4, f"{name} step {step} grad {pn}")
                    p.grad = q.grad = None
            for (bn, b), c in zip(model.named_buffers(), ref.buffers()):
                if b.dtype.is_floating_point:
                    assert_close(b, c, 1e-6, 1e-5, f"{name} step {step} buffer {bn}")
                else:
                    assert torch.equal(b, c), f"{name} step {step} buffer {bn}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inductor_bottleneck(case):
    """The default compiler (inductor) on one fused bottleneck with a stride-2 downsample:
    forward, input and parameter gradients, running statistics."""
    backend, device = case
    torch.manual_seed(0)
    ds = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16))
    block = resfused.convert(torch.nn.Sequential(Bottleneck(8, 4, stride=2, downsample=ds))).to(device)
    randomise_bns(block, bias=0.2, running_stats=False)
    ref = copy.deepcopy(block)
    x = torch.randn(2, 8, 9, 9, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with resfused.use_backend(backend):
        out = torch.compile(block, fullgraph=True)(x)
        out_ref = ref(xr)
        out.square().sum().backward()
        out_ref.square().sum().backward()
    assert_close(out, out_ref, 1e-5, 1e-5, "output")
    assert_close(x.grad, xr.grad, 1e-4, 1e-4, "input grad")
    for (pn, p), q in zip(block.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, 1e-4, 1e-4, f"grad {pn}")
    for (bn, b), c in zip(block.named_buffers(), ref.buffers()):
        assert_close(b.double(), c.double(), 1e-6, 1e-5, f"buffer {bn}")


def test_cuda_prefix_view_rule_traces():
    """The cuda backend's prefix-view rule (which a dense block asks while torch.compile
    traces it) needs no data pointer: fake tensors have none."""
    from resfused.ops import bn_act as ops

    def rule(buf):
        return buf * 2 if ops.reads_as_is("cuda", buf[:, :16]) else buf

    buf = torch.randn(2, 24, 3, 5).contiguous(memory_format=torch.channels_last)
    assert ops.reads_as_is("cuda", buf[:, :16]) and not ops.reads_as_is("cuda", buf[:, :6])
    assert ops.reads_as_is("cuda", torch.randn(2, 24, 3, 5)[:, :6])  # NCHW: any prefix
    compiled = torch.compile(rule, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(buf), buf * 2)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dynamic", [None, True])
def test_training_compiles_once_per_symbolic_size(case, dynamic):
    """In training too, new batch and spatial sizes reuse symbolic graphs: the fused
    modules compile no more often than torchvision's (BN statistics counts stay integers,
    which torch.compile keeps symbolic, rather than floats made from the sizes, which it
    specialises: one recompilation per size, and ``fullgraph=True`` failing at the
    recompile limit). Outputs, gradients and running statistics equal the uncompiled
    module's."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torchvision.models.densenet import _DenseBlock, _Transition

    backend, device = case
    torch.manual_seed(0)
    tv = torch.nn.Sequential(Bottleneck(8, 2), _DenseBlock(2, 8, 2, 2, 0.0), _Transition(12, 8),
                             torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.ReLU()))
    tv = randomise_bns(tv).to(device).train()
    model = resfused.convert(copy.deepcopy(tv))
    eager = copy.deepcopy(model)
    sizes = ((2, 6), (3, 6), (4, 6), (5, 8), (3, 10))
    counts = []
    for m in (tv, model):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(m, fullgraph=True, backend=counter, dynamic=dynamic)
        with resfused.use_backend(backend):
            for n, hw in sizes:
                x = torch.randn(n, 8, hw, hw, device=device)
                out = compiled(x)
                if m is model:
                    want = eager(x)
                    assert_close(out, want, 1e-5, 1e-5, f"batch {n}, {hw}x{hw}")
                    want.square().mean().backward()
                out.square().mean().backward()
        counts.append(counter.frame_count)
    assert counts[1] <= counts[0], f"compiled {counts[1]} times, torchvision's modules {counts[0]}"
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        assert_close(a.float(), b.float(), 1e-5, 1e-5, k)
    for (k, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, 1e-4, 1e-4, f"grad {k}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", ["resnet18", "densenet"])
def test_batch_size_changes_recompile_with_dynamic_shapes(case, name):
    """A new batch size makes torch.compile recompile with a symbolic batch dimension
    (``dynamic=None``, the default), and ``dynamic=True`` traces symbolic sizes from the
    start: both trace with no graph break (``fullgraph=True``) and give the uncompiled
    outputs."""
    backend, device = case
    torch.manual_seed(0)
    model = MODELS[name]().to(device).eval()
    with resfused.use_backend(backend), torch.no_grad():
        for dynamic in (None, True):
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=dynamic)
            for n in (2, 3, 5):
                x = torch.randn(n, 3, 32, 32, device=device)
                assert_close(compiled(x), model(x), 1e-5, 1e-5, f"batch {n}, dynamic={dynamic}")


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_compiled_torch_func_transforms_run_torchvisions_ops(transform):
    """torch.compile of a torch.func transform over a fused block (in eval: in training a
    transform cannot update the captured running statistics, torchvision's neither)
    traces torchvision's ops, as the transform does uncompiled (the fused autograd nodes
    have no functorch rules), with no graph break, and gives the uncompiled results."""
    training = False
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    block = randomise_bns(resfused.convert(torch.nn.Sequential(Bottleneck(8, 2)))[0]).train(training)
    x = torch.randn(2, 8, 5, 5)
    if transform == "grad":
        params = dict(block.named_parameters())
        fn = grad(lambda p, xx: functional_call(block, p, (xx,)).square().sum())
        args = (params, x)
    else:
        fn = vmap(lambda xx: block(xx.unsqueeze(0)).squeeze(0))
        args = (x,)
    state = copy.deepcopy(block.state_dict())
    want = fn(*args)
    block.load_state_dict(state)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="eager")(*args)
    if transform == "grad":
        for k in want:
            assert_close(got[k], want[k], 1e-5, 1e-5, f"grad {k}")
    else:
        assert_close(got, want, 1e-5, 1e-5, "vmap output")
