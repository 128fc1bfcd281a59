"""The fused modules under the tools users run on torchvision models: hooks on inner
modules (feature taps, pruning), FX tracing (``create_feature_extractor``),
``torch.jit.trace``, the meta device, ``torch.func`` transforms, double backward, gradient
accumulation with separate ``.grad`` tensors, ``nn.SyncBatchNorm`` outside a process
group, and ``fold`` of blocks it cannot fold or with gradients wanted. Each gives
torchvision's numbers or a clear error."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
import torchvision
from torch import nn
from torchvision.models.densenet import DenseNet, _DenseBlock, _DenseLayer, _Transition
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import BasicBlock, Bottleneck

import resfused
from resfused.convert import FoldedBlock
from utils import assert_close, backend_cases, case_id, randomise_bns


def _pair(name: str):
    torch.manual_seed(0)
    if name == "resnet":
        tv = torchvision.models.resnet18(num_classes=5)
        taps = ["layer1.0.bn2", "layer2.0.downsample.1", "layer3.1.conv1"]
    else:
        tv = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5)
        taps = ["features.denseblock1.denselayer2.conv2", "features.denseblock1.denselayer1",
                "features.transition1.norm"]
    randomise_bns(tv)
    return tv, resfused.convert(copy.deepcopy(tv)), taps


def _fused_node_count(out: torch.Tensor) -> int:
    """How many fused autograd nodes the graph behind ``out`` holds."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__.startswith(("ResidualBlockFunction", "DenseBlockFunction", "TransitionFunction"))
        stack.extend(f for f, _ in fn.next_functions)
    return count


@pytest.mark.parametrize("name", ["resnet", "densenet"])
@pytest.mark.parametrize("training", [False, True])
def test_hooks_on_inner_modules_fire_with_torchvision_values(name, training):
    """A forward hook on a module inside a fused block (a feature tap) fires with
    torchvision's value: the block runs torchvision's forward while such a hook is there,
    and the fused path again once it is removed."""
    tv, fu, taps = _pair(name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # (training: batch statistics of 2x1x1 in layer4)
    got = {}
    for model, tag in ((tv, "tv"), (fu, "fu")):
        model.double().train(training)
        modules = dict(model.named_modules())
        handles = [modules[t].register_forward_hook(lambda m, i, o, t=t, tag=tag: got.__setitem__((tag, t), o))
                   for t in taps]
        got[(tag, "out")] = model(x)
        for h in handles:
            h.remove()
    for t in taps + ["out"]:
        assert (("fu", t)) in got, f"hook on {t} did not fire"
        assert_close(got[("fu", t)], got[("tv", t)], 1e-9, 1e-9, t)
    # the blocks holding a tap ran torchvision's forward, the others stayed fused; and all
    # are fused again once the hooks are gone
    # (denselayer1, hooked itself, is called by torchvision's block forward: a fused layer)
    assert _fused_node_count(got[("fu", "out")]) == {"resnet": 5, "densenet": 2}[name]
    assert _fused_node_count(fu(x)) == {"resnet": 8, "densenet": 3}[name]


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_a_forward_replaced_on_an_inner_instance_is_called(name):
    """A submodule whose forward was replaced on its instance (``m.forward = ...``, as
    accelerate's hooks do) is called with it, as torchvision calls it: the block holding
    it runs torchvision's forward, the others stay fused; a synchronized block in training
    (which cannot call it) raises, naming it."""
    tv, fu, taps = _pair(name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    calls = []
    outs = []
    for model in (tv, fu):
        model.double().train()
        for t in taps:
            m = dict(model.named_modules())[t]
            m.forward = lambda *a, f=m.forward, t=t: calls.append(t) or f(*a) * 1.5
        out = model(x)
        out.sum().backward()
        outs.append((out, model.conv1.weight.grad if name == "resnet" else model.features.conv0.weight.grad))
    assert_close(outs[1][0], outs[0][0], 1e-9, 1e-9, "output")
    # (training BNs over 2 values in the last stage amplify float64 rounding: 1e-8 here)
    assert_close(outs[1][1], outs[0][1], 1e-6, 1e-6, "stem conv weight gradient")
    assert sorted(calls[len(calls) // 2:]) == sorted(calls[:len(calls) // 2]), calls
    assert _fused_node_count(outs[1][0]) == {"resnet": 5, "densenet": 2}[name]

    from resfused.nn.bn_act import runs_unfused

    block = resfused.convert(BasicBlock(8, 8), sync_bn=True).train()
    block.bn1.forward = lambda inp, f=block.bn1.forward: f(inp)
    with pytest.raises(RuntimeError, match="submodule 'bn1' was replaced on the instance"):
        runs_unfused(block, torch.randn(2, 8, 5, 5))  # (as the block's forward asks it in a process group)


def test_pruned_conv_inside_a_block_trains_as_torchvision():
    """``torch.nn.utils.prune`` applies its mask in a pre-forward hook on the conv: the
    pruned weight is what the block uses, step after step, as in torchvision."""
    tv, fu, _ = _pair("resnet")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for model in (tv, fu):
        model.double()
        prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.5)
        prune.l1_unstructured(model.layer2[0].downsample[0], "weight", amount=0.3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (tv, fu)]
    for _ in range(2):
        outs = []
        for model, opt in zip((tv, fu), opts):
            opt.zero_grad()
            out = model(x)
            out.square().mean().backward()
            opt.step()
            outs.append(out)
        assert_close(outs[1], outs[0], 1e-9, 1e-9, "pruned model output")
    assert_close(fu.layer1[0].conv1.weight_orig, tv.layer1[0].conv1.weight_orig, 1e-9, 1e-9, "pruned weight")


@pytest.mark.parametrize("name", ["resnet", "densenet"])
@pytest.mark.parametrize("how", ["create_feature_extractor", "symbolic_trace", "jit.trace"])
def test_tracers_record_torchvision_ops(name, how):
    """FX (``create_feature_extractor``, ``symbolic_trace``) and ``torch.jit.trace`` record
    the fused models as torchvision's ops, with torchvision's outputs."""
    tv, fu, taps = _pair(name)
    tv.eval()
    fu.eval()
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for model in (tv, fu):
        if how == "create_feature_extractor":
            outs.append(create_feature_extractor(model, {taps[0]: "tap"})(x)["tap"])
        elif how == "symbolic_trace":
            outs.append(torch.fx.symbolic_trace(model)(x))
        else:
            outs.append(torch.jit.trace(model, x, check_trace=False)(x))
    assert_close(outs[1], outs[0], 1e-5, 1e-5, how)


def test_batch_norm_act_traces_with_fx():
    """BatchNormAct2d (the stem BN of a synchronized convert) is no FX leaf: it traces as
    F.batch_norm + add + ReLU."""
    torch.manual_seed(0)
    model = resfused.convert(randomise_bns(torchvision.models.resnet18(num_classes=5)), sync_bn=True).eval()
    assert isinstance(model.bn1, resfused.nn.BatchNormAct2d)
    x = torch.randn(2, 3, 32, 32)
    got = create_feature_extractor(model, {"layer1": "l1"})(x)["l1"]
    assert_close(got, model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))), 1e-5, 1e-5, "layer1")
    bn = randomise_bns(nn.Sequential(resfused.nn.BatchNormAct2d(4))).eval()
    y = torch.randn(2, 4, 3, 3)
    assert_close(torch.fx.symbolic_trace(bn)(y), bn(y), 1e-6, 1e-6, "traced BatchNormAct2d")


def test_synchronized_blocks_keep_the_fused_path_with_hooks():
    """A hook inside a block whose BNs are synchronized: torchvision's forward would
    normalise with local statistics, so in training the fused path stays (in eval, with
    running statistics, the hook gets torchvision's forward)."""
    from resfused.nn.bn_act import runs_unfused

    block = resfused.convert(BasicBlock(8, 8), sync_bn=True).train()
    block.bn1.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(2, 8, 5, 5)
    assert not runs_unfused(block, x)
    assert runs_unfused(block.eval(), x)


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_meta_device_gives_torchvision_shapes(name):
    tv, fu, _ = _pair(name)
    x = torch.randn(2, 3, 32, 32, device="meta")
    assert fu.to("meta")(x).shape == tv.to("meta")(x).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_torch_func_grad_matches_torchvision(name):
    tv, fu, _ = _pair(name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for model in (tv, fu):
        model.double().eval()
        params = dict(model.named_parameters())
        grads.append(torch.func.grad(lambda p, xx: torch.func.functional_call(model, p, (xx,)).square().sum())(
            params, x))
    for k in grads[0]:
        assert_close(grads[1][k], grads[0][k], 1e-9, 1e-9, k)


def _modules_for_double_backward():
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    return {"bottleneck": (Bottleneck(4, 2, stride=2, downsample=ds), 4),
            "dense_block": (_DenseBlock(2, 4, 2, 3, 0.0, False), 4),
            "transition": (torchvision.models.densenet._Transition(4, 2), 4),
            "batch_norm_act": (None, 4)}


@pytest.mark.parametrize("kind", ["bottleneck", "dense_block", "transition", "batch_norm_act"])
@pytest.mark.parametrize("how", ["penalty", "constant_cotangent", "parameters", "functional_jvp"])
def test_double_backward_raises_instead_of_a_wrong_gradient(kind, how):
    """A fused node's backward is not itself differentiable: asked for a graph of the
    gradient (``create_graph=True``: a gradient penalty, whatever its cotangent; gradients
    of the parameters for a MAML-style outer step; torch.autograd.functional.jvp, which
    differentiates a vector-Jacobian product) it raises at once, where autograd's lazy
    once-differentiable error would be skipped and the second derivative silently zero
    or missing. First derivatives are unaffected."""
    module, c = _modules_for_double_backward()[kind]
    fused = resfused.nn.BatchNormAct2d(c) if module is None else resfused.convert(module)
    fused.double()
    x = torch.randn(2, c, 6, 6, dtype=torch.float64, requires_grad=True)
    match = "is once differentiable: its backward cannot run with create_graph=True"
    if how == "functional_jvp":
        with pytest.raises(RuntimeError, match=match):
            torch.autograd.functional.jvp(fused, x.detach(), torch.randn_like(x))
    else:
        out = fused(x)
        loss = out.sum() if how == "constant_cotangent" else out.square().sum()
        wrt = list(fused.parameters()) if how == "parameters" else [x]
        with pytest.raises(RuntimeError, match=match):
            torch.autograd.grad(loss, wrt, create_graph=True)
    x.grad = None
    fused(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", ["bottleneck", "dense_block", "transition", "batch_norm_act"])
@pytest.mark.parametrize("case", backend_cases(), ids=case_id)
@pytest.mark.parametrize("training", [True, False])
def test_vectorized_jacobian_matches_torchvision(kind, case, training):
    """A backward under vmap (``jacobian(vectorize=True)``, ``grad(..., is_grads_batched=True)``)
    gets a batch of output gradients: the fused nodes take their Python path (the one-call
    block composites have no batching rule) and add a dense layer's input gradient out of
    place, giving torchvision's Jacobian. The Triton kernels take no batched tensors: a
    node that ran them says so."""
    backend, device = case
    module, c = _modules_for_double_backward()[kind]
    torch.manual_seed(0)
    if module is None:
        ref = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        fused = resfused.nn.BatchNormAct2d(c)
        fused.load_state_dict(ref[0].state_dict())
    else:
        ref = randomise_bns(module)
        fused = resfused.convert(copy.deepcopy(ref))
    ref, fused = ref.double().train(training), fused.double().to(device).train(training)
    x = torch.randn(2, c, 3, 3, dtype=torch.float64)
    want = torch.autograd.functional.jacobian(ref, x, vectorize=True)
    with resfused.use_backend(backend):
        if backend == "triton":
            with pytest.raises(RuntimeError, match="a backward under vmap .* runs on the cpu, cuda and eager"):
                torch.autograd.functional.jacobian(fused, x.to(device), vectorize=True)
            return
        got = torch.autograd.functional.jacobian(fused, x.to(device), vectorize=True)
    assert_close(got.cpu(), want, 1e-12, 1e-12, "jacobian")


@pytest.mark.parametrize("kind", ["bottleneck", "dense_block", "transition", "batch_norm_act"])
def test_forward_mode_ad_matches_torchvision(kind):
    """Forward-mode AD (dual tensors under ``torch.autograd.forward_ad.dual_level``): the
    fused modules run torchvision's ops, whose jvp rules give the tangent."""
    import torch.autograd.forward_ad as fwAD

    module, c = _modules_for_double_backward()[kind]
    torch.manual_seed(0)
    if module is None:
        ref = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        fused = resfused.nn.BatchNormAct2d(c)
    else:
        ref = randomise_bns(module)
        fused = resfused.convert(copy.deepcopy(ref))
    ref, fused = ref.double().train(), fused.double().train()
    x = torch.randn(2, c, 5, 5, dtype=torch.float64)
    t = torch.randn_like(x)
    tangents = []
    for m in (fused, ref):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    assert_close(tangents[0], tangents[1], 1e-12, 1e-12, "tangent")
    fused(x).sum().backward()  # and the fused path again outside it


def test_bias_gradients_are_separate_tensors():
    """The join's two BNs (bn3 and the downsample's) both get Σdy as their bias gradient:
    each parameter's ``.grad`` is its own tensor, so accumulation over two backward calls,
    clipping and GradScaler unscaling act on each once, as in torchvision; likewise the
    two bias gradients of ``dual_batch_norm_act``."""
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(16, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    tv = Bottleneck(16, 16, stride=2, downsample=ds)
    fu = resfused.convert(copy.deepcopy(tv))
    x = torch.randn(2, 16, 8, 8)
    for model in (tv, fu):
        model(x).sum().backward()
        model(x).square().sum().backward()  # accumulated into the same .grad
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert fu.bn3.bias.grad.data_ptr() != fu.downsample[1].bias.grad.data_ptr()
    for (k, p), (_, q) in zip(tv.named_parameters(), fu.named_parameters()):
        assert_close(q.grad, p.grad, 1e-6, 1e-4, k)

    w, b, rw, rb = (torch.randn(8, requires_grad=True) for _ in range(4))
    y, r = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    resfused.functional.dual_batch_norm_act(y, r, (None, None, w, b), (None, None, rw, rb), training=True) \
        .sum().backward()
    assert b.grad.data_ptr() != rb.grad.data_ptr()
    b.grad.mul_(2)
    assert_close(rb.grad, b.grad / 2, 0, 0, "the residual BN's bias gradient after doubling the other")


@pytest.mark.parametrize("kind", ["basic", "bottleneck", "dense"])
@pytest.mark.parametrize("order", ["sync_then_convert", "convert_then_sync"])
def test_sync_batchnorm_inside_a_block_outside_a_process_group(kind, order):
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` and ``convert``, either order, in a single
    process without torch.distributed initialised: the blocks (ResNet, dense, transition)
    stay fused and compute local statistics, as nn.SyncBatchNorm itself does."""
    torch.manual_seed(0)
    if kind == "dense":
        block = nn.Sequential(_DenseBlock(2, 8, 2, 4, 0.0), _Transition(16, 8))
    else:
        block = BasicBlock(8, 8) if kind == "basic" else Bottleneck(8, 2)
    randomise_bns(block)
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(block))
    if order == "sync_then_convert":
        fu = resfused.convert(copy.deepcopy(tv))
    else:
        fu = nn.SyncBatchNorm.convert_sync_batchnorm(resfused.convert(copy.deepcopy(block)))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in fu.modules()) == \
        sum(isinstance(m, nn.SyncBatchNorm) for m in tv.modules())
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    out_fu, out_tv = fu(x), tv(x)
    assert _fused_node_count(out_fu) == (2 if kind == "dense" else 1)
    assert_close(out_fu, out_tv, 1e-5, 1e-5, "output")
    g_fu, = torch.autograd.grad(out_fu.square().sum(), x)
    g_tv, = torch.autograd.grad(out_tv.square().sum(), x)
    assert_close(g_fu, g_tv, 1e-4, 1e-4, "input gradient")
    for (name, b), (_, bt) in zip(fu.named_buffers(), tv.named_buffers()):
        assert_close(b.float(), bt.float(), 1e-6, 1e-6, name)


def test_dense_block_refuses_norm1s_synchronized_over_different_groups(monkeypatch):
    """A fused dense block shares one statistics cache between its layers' norm1: layers
    synchronizing over different groups (or some not at all) are a clear error, raised
    before any running statistic moves."""
    torch.manual_seed(0)
    block = resfused.convert(_DenseBlock(2, 8, 2, 4, 0.0))
    block.denselayer2.norm1 = nn.SyncBatchNorm(12)
    monkeypatch.setattr(type(block), "_sync_group",
                        lambda self, bn: object() if isinstance(bn, nn.SyncBatchNorm) else None)
    before = copy.deepcopy(block.state_dict())
    with pytest.raises(ValueError, match="different process groups"):
        block(torch.randn(2, 8, 5, 5))
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())


def test_fold_keeps_blocks_it_cannot_fold_and_gives_gradients():
    """``fold`` folds only standard blocks: one with another activation or norm layer is
    kept as it is and the model still equals its eval output; a folded model called with
    gradients wanted gives eval's gradients (the join then runs in standard ops)."""
    torch.manual_seed(0)
    relu6 = randomise_bns(resfused.models.resnet18(num_classes=5))
    for m in relu6.modules():
        if isinstance(m, resfused.FusedBasicBlock):
            m.relu = nn.ReLU6(inplace=True)
    group_norm = torchvision.models.resnet18(num_classes=5, norm_layer=lambda c: nn.GroupNorm(4, c))
    x = torch.randn(2, 3, 32, 32) * 4
    for model in (relu6, group_norm):
        model.eval()
        folded = resfused.fold(model)
        assert not any(isinstance(m, FoldedBlock) for m in folded.modules())
        with torch.no_grad():
            assert_close(folded(x), model(x), 1e-4, 1e-4, "kept blocks")

    model = randomise_bns(torchvision.models.resnet18(num_classes=5)).eval()
    folded = resfused.fold(model)
    assert sum(isinstance(m, FoldedBlock) for m in folded.modules()) == 8
    grads = []
    for m in (model, folded):
        xx = x.clone().requires_grad_()
        m(xx)[:, 0].sum().backward()
        grads.append((xx.grad, m.fc.weight.grad))
    assert_close(grads[1][0], grads[0][0], 1e-4 * grads[0][0].abs().max().item(), 1e-4, "input gradient")
    assert_close(grads[1][1], grads[0][1], 1e-4 * grads[0][1].abs().max().item(), 1e-4, "fc gradient")


class _ScaledBN(nn.BatchNorm2d):
    """A BN subclass computing something else than BN."""

    def forward(self, x):
        return super().forward(x) * 2.0


class _ClampReLU(nn.ReLU):
    def forward(self, x):
        return x.clamp(0, 0.1)


def _with_subclass(which: str) -> nn.Module:
    if which == "block_bn":
        return BasicBlock(4, 4, norm_layer=_ScaledBN)
    if which == "block_bn_act":  # resfused's own BN with its activation, as a block's norm layer
        return BasicBlock(4, 4, norm_layer=resfused.BatchNormAct2d)
    if which == "block_relu":
        m = BasicBlock(4, 4)
        m.relu = _ClampReLU()
        return m
    if which == "dense_relu":
        m = _DenseBlock(2, 4, 2, 2, 0.0, False)
        m.denselayer1.relu2 = _ClampReLU()
        return m
    m = _Transition(4, 2)
    m.relu = _ClampReLU()
    return m


@pytest.mark.parametrize("which", ["block_bn", "block_bn_act", "block_relu", "dense_relu", "transition_relu"])
@pytest.mark.parametrize("training", [False, True])
def test_subclasses_with_their_own_forward_run_torchvisions_forward(which, training):
    """A BN or ReLU subclass that overrides forward is not the op a fused module applies
    in its place: such a module runs torchvision's forward (the same numbers, running
    statistics included), as for any other non-standard layer."""
    torch.manual_seed(0)
    tv = randomise_bns(_with_subclass(which)).double().train(training)
    fused = resfused.convert(copy.deepcopy(tv))
    assert type(fused) is not type(tv)  # converted: the fused module decides per call
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64) * 5
    assert_close(fused(x), tv(x), 1e-12, 1e-12, "output")  # (a dense block fuses its other layers)
    for (k, a), b in zip(fused.state_dict().items(), tv.state_dict().values()):
        assert_close(a, b, 1e-12, 1e-12, k)


def test_fold_is_exact_in_float64_and_folds_a_block_or_a_stem_it_can():
    """In float64 a folded block equals the eval block to float64 rounding (its join's bias
    is kept in float64); ``fold`` of a block on its own gives a FoldedBlock; a ResNet whose
    stem BN has no running statistics keeps that BN and folds its blocks."""
    torch.manual_seed(0)
    block = randomise_bns(Bottleneck(8, 2, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 8, 1, 2, bias=False),
                                                                               nn.BatchNorm2d(8))))
    block = block.double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    folded = resfused.fold(block)
    assert isinstance(folded, FoldedBlock) and folded.affine.dtype == torch.float64
    with torch.no_grad():
        assert_close(folded(x), block(x), 1e-12, 1e-12, "folded float64 block")
    model = randomise_bns(torchvision.models.resnet18(num_classes=3))
    model.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
    model.eval()
    folded = resfused.fold(model)
    assert isinstance(folded.bn1, nn.BatchNorm2d)
    assert sum(isinstance(m, FoldedBlock) for m in folded.modules()) == 8
    xs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(folded(xs), model(xs), 1e-4, 1e-4, "stem kept")
    # a block held twice (tied) is folded in both slots, still one module
    tied = randomise_bns(Bottleneck(8, 2)).double().eval()
    pair = nn.Sequential(tied, tied)
    folded = resfused.fold(pair)
    assert isinstance(folded[0], FoldedBlock) and folded[1] is folded[0]
    xt = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close(folded(xt), pair(xt), 1e-12, 1e-12, "tied blocks")
    # convert(sync_bn=True) makes the stem BN a BatchNormAct2d(activation="identity"): folded too
    synced = resfused.convert(randomise_bns(torchvision.models.resnet18(num_classes=3)), sync_bn=True).eval()
    folded = resfused.fold(synced)
    assert isinstance(folded.bn1, nn.Identity)
    with torch.no_grad():
        assert_close(folded(xs), synced(xs), 1e-4, 1e-4, "synced model's stem folded")


def test_standalone_dense_layer_returns_its_own_contiguous_features():
    torch.manual_seed(0)
    tv = _DenseLayer(4, 3, 2, 0.0, False)
    fu = resfused.convert(copy.deepcopy(tv))
    for n, fmt in ((2, torch.contiguous_format), (2, torch.channels_last), (1, torch.contiguous_format)):
        xf = torch.randn(n, 4, 8, 8).contiguous(memory_format=fmt)
        out = fu.to(memory_format=fmt)(xf)
        assert out.is_contiguous(memory_format=fmt)
        assert out.untyped_storage().nbytes() == out.numel() * out.element_size()
        assert_close(out, tv(xf), 1e-5, 1e-5, "new features")
