"""The fused ResNet stem: ``maxpool(relu(bn1(conv1(x))))`` with BN, ReLU and max pooling as
one node (``FusedResNet``, ``bn_relu_maxpool``), against torchvision's modules."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import resfused
from resfused.nn.stem import FusedResNet, stem_fusable
from resfused.ops import bn_act as ops
from utils import DEVICES, TOLERANCES, assert_close, backend_cases, case_id, interpreted

CASES = backend_cases()
WINDOWS = [([3, 3], [2, 2], [1, 1]), ([2, 2], [2, 2], [0, 0]), ([3, 2], [2, 1], [1, 0]), ([1, 1], [1, 1], [0, 0])]


def _input(shape, dtype, device, layout):
    torch.manual_seed(0)
    x = torch.randn(*shape, device=device).to(dtype)
    x[0, 0, :3, :4] = 0.5   # ties inside windows: the first maximum must win
    x[-1, -1, 1, 1] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: "k{}s{}p{}".format(*(f"{a}{b}" for a, b in w)))
def test_bn_relu_maxpool_is_the_apply_pass_then_aten_pooling(case, layout, dtype, window):
    """Values and indices bit for bit those of bn_act_fwd followed by aten's
    max_pool2d_with_indices on the same backend: ties take the first maximum in row-major
    order, a NaN wins, a negative scale is honoured, and the layout is kept."""
    backend, device = case
    x = _input((2, 5, 9, 11), dtype, device, layout)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    affine = torch.stack([torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)]).to(acc)
    affine[0, 2] = -0.75
    k, s, p = window
    out, idx = ops.bn_relu_maxpool(x, affine, k, s, p, backend)
    a = ops.bn_act_fwd(x, affine, None, None, True, backend)
    ref, ref_idx = torch.ops.aten.max_pool2d_with_indices(a, k, s, p)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert out.dtype == dtype and idx.dtype == torch.int64
    assert out.is_contiguous(memory_format=ops.memory_format_of(x))


def _stems(device, layout, dtype=torch.float64):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(num_classes=4).to(device, dtype)
    with torch.no_grad():
        tv.bn1.weight.uniform_(-1, 2)  # a negative scale too
        tv.bn1.bias.normal_()
        tv.bn1.running_mean.normal_()
        tv.bn1.running_var.uniform_(0.5, 2)
    fused = resfused.convert(copy.deepcopy(tv))
    x = torch.randn(3, 3, 20, 18, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        tv, fused = tv.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
    return tv, fused, x


def _stem(model, x):
    return model.maxpool(model.relu(model.bn1(model.conv1(x))))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_stem_matches_torchvision(case, layout, train):
    """FusedResNet's stem against torchvision's modules, fp64, two steps: output, gradients of
    the input, conv1 and bn1, running statistics and the batch count."""
    backend, device = case
    dtype = torch.float32 if interpreted(*case) else torch.float64
    tv, fused, x = _stems(device, layout, dtype)
    tv.train(train)
    fused.train(train)
    tol, gtol = TOLERANCES[dtype]["fwd"], TOLERANCES[dtype]["bwd"]
    with resfused.use_backend(backend):
        for step in range(2):
            xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            y = fused.conv1(xs[1])
            assert stem_fusable(fused.bn1, fused.relu, fused.maxpool, y)
            outs = [_stem(tv, xs[0]), fused.stem(y)]
            assert_close(outs[1], outs[0], *tol, f"output, step {step}")
            assert outs[1].is_contiguous(memory_format=ops.memory_format_of(x))
            g = torch.randn_like(outs[0])
            outs[0].backward(g)
            outs[1].backward(g)
            assert_close(xs[1].grad, xs[0].grad, *gtol, "input gradient")
            for name in ("conv1.weight", "bn1.weight", "bn1.bias"):
                a, b = fused.get_parameter(name).grad, tv.get_parameter(name).grad
                assert_close(a, b, *gtol, name)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close(getattr(fused.bn1, name), getattr(tv.bn1, name), *tol, name)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_resnet_whole_model_and_saved_bytes(device):
    """The whole converted model matches torchvision's (fp64, train); the stem saves less
    for backward: the BN-ReLU output is not kept."""
    from resfused.memory import saved_bytes

    tv, fused, x = _stems(device, "nchw")
    out_tv, out_f = tv(x), fused(x)
    assert_close(out_f, out_tv, 1e-9, 1e-9, "logits")
    out_tv.sum().backward()
    out_f.sum().backward()
    assert_close(fused.conv1.weight.grad, tv.conv1.weight.grad, 1e-8, 1e-8, "conv1 grad")
    y = fused.conv1(x).detach().requires_grad_()
    fused_bytes = saved_bytes(lambda: fused.stem(y))
    eager_bytes = saved_bytes(lambda: tv.maxpool(tv.relu(tv.bn1(y))))
    act = y.numel() * y.element_size()
    assert fused_bytes <= eager_bytes - act + 1024, (fused_bytes, eager_bytes, act)


def test_unfusable_stems_run_torchvisions_modules():
    """Hooks on bn1, relu or maxpool, another norm or pooling, a subclass of ReLU, ceil
    mode: torchvision's modules run one by one (each hook fires), with the same result."""
    tv, fused, x = _stems("cpu", "nchw")
    y = fused.conv1(x)
    assert stem_fusable(fused.bn1, fused.relu, fused.maxpool, y)
    seen = []
    for name in ("bn1", "relu", "maxpool"):
        h = getattr(fused, name).register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
        assert not stem_fusable(fused.bn1, fused.relu, fused.maxpool, y)
        assert_close(fused(x), tv(x), 1e-9, 1e-9, name)
        h.remove()
    assert seen == ["BatchNorm2d", "ReLU", "MaxPool2d"]

    class LeakyAsRelu(nn.ReLU):
        def forward(self, t):
            return torch.nn.functional.leaky_relu(t, 0.1)

    for attr, module in (("maxpool", nn.MaxPool2d(3, 2, 1, ceil_mode=True)), ("maxpool", nn.AvgPool2d(3, 2, 1)),
                         ("maxpool", nn.MaxPool2d(3, 2, 1, dilation=2)), ("relu", LeakyAsRelu()),
                         ("bn1", torchvision.ops.FrozenBatchNorm2d(64).double())):
        a, b = copy.deepcopy(tv), copy.deepcopy(fused)
        setattr(a, attr, module)
        setattr(b, attr, copy.deepcopy(module))
        if attr == "bn1":
            b.bn1.load_state_dict(a.bn1.state_dict())
        assert not stem_fusable(b.bn1, b.relu, b.maxpool, y), attr
        assert_close(b(x), a(x), 1e-9, 1e-9, f"{attr} = {type(module).__name__}")


def test_fused_stem_bad_input_changes_nothing():
    """A wrong channel count or ndim: a clear error naming the BN, no statistic moved."""
    _, fused, x = _stems("cpu", "nchw")
    bn = fused.bn1
    before = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    pool = fused.maxpool
    with pytest.raises(ValueError, match=r"BatchNorm2d\(64\) expected input with 64 channels"):
        from resfused.nn.stem import bn_relu_pool

        bn_relu_pool(bn, pool, torch.randn(2, 32, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 4D input"):
        fused.stem(torch.randn(64, 20, 18, dtype=torch.float64))
    after = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_convert_and_revert_swap_the_model_class_only():
    tv = torchvision.models.resnet18()
    keys = {k: v.clone() for k, v in tv.state_dict().items()}
    resfused.convert(tv)
    assert type(tv) is FusedResNet and isinstance(tv.relu, nn.ReLU) and isinstance(tv.maxpool, nn.MaxPool2d)
    assert all(torch.equal(keys[k], v) for k, v in tv.state_dict().items()) and set(keys) == set(tv.state_dict())
    resfused.revert(tv)
    assert type(tv) is torchvision.models.ResNet


def test_feature_extraction_sees_the_stem_modules():
    """FX tracing (create_feature_extractor) records bn1, relu and maxpool as torchvision's."""
    from torchvision.models.feature_extraction import create_feature_extractor

    tv, fused, x = _stems("cpu", "nchw")
    fused.eval()
    tv.eval()
    ext = create_feature_extractor(fused, {"relu": "relu", "maxpool": "pool"})
    feats = ext(x)
    ref = create_feature_extractor(tv, {"relu": "relu", "maxpool": "pool"})(x)
    assert feats["relu"].shape == ref["relu"].shape and feats["pool"].shape == ref["pool"].shape
    assert_close(feats["pool"], ref["pool"], 1e-9, 1e-9, "pool")


@pytest.mark.parametrize("backend", ["cpu", "eager"])
@pytest.mark.parametrize("window, msg", [
    (([4, 1], [2, 1], [1, 0]), "output would be empty"),   # floor((1 + 2 - 4) / 2) + 1 = 0 rows
    (([3, 3], [2, 2], [2, 1]), "padding <= kernel_size / 2"),
    (([3, 3], [0, 2], [1, 1]), "stride > 0"),
    (([3], [2, 2], [1, 1]), "kernel_size must have two values"),
])
def test_bn_relu_maxpool_bad_window(backend, window, msg):
    """A window aten's pooling refuses: a ValueError naming the argument, from every path
    (the cpu kernel, the apply pass + aten, the fake kernel), never a result of another
    shape."""
    x = torch.randn(1, 2, 1, 5)
    aff = torch.stack([torch.ones(2), torch.zeros(2)])
    with pytest.raises(ValueError, match=msg):
        ops.bn_relu_maxpool(x, aff, *window, backend)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(ValueError, match=msg):
        torch.ops.resfused.bn_relu_maxpool(torch.empty(1, 2, 1, 5), torch.empty(2, 2), *window, backend)


def test_bn_relu_maxpool_window_past_2_24_elements():
    """A window of more than 2**24 elements (the cpu kernel numbers them in fp32) takes the
    apply pass + aten's pooling: the index of the maximum is exact."""
    K = (1 << 24) + 3
    x = torch.zeros(1, 1, 1, K)
    x[0, 0, 0, K - 2] = 5.0
    out, idx = ops.bn_relu_maxpool(x, torch.tensor([[1.0], [0.0]]), [1, K], [1, 1], [0, 0], "cpu")
    assert int(idx) == K - 2 and float(out) == 5.0


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, stride=[], padding=1), nn.MaxPool2d([3], [2], [1]),
                                  nn.MaxPool2d((3, 2), (2, 1), (1, 0))], ids=["empty-stride", "one-value", "pairs"])
def test_fused_stem_takes_torchvisions_pooling_argument_forms(pool):
    """Pooling arguments as aten takes them (an empty stride is the kernel size; one value
    stands for both dimensions): the fused stem runs and matches torchvision."""
    tv, fused, x = _stems("cpu", "nchw")
    tv.maxpool, fused.maxpool = pool, copy.deepcopy(pool)
    assert stem_fusable(fused.bn1, fused.relu, fused.maxpool, fused.conv1(x))
    assert_close(fused(x), tv(x), 1e-9, 1e-9, "logits")


@pytest.mark.parametrize("device", DEVICES)
def test_folded_stem_runs_relu_and_pooling_in_one_pass_for_inference(device):
    """fold() folds bn1 into conv1 (bn1 becomes nn.Identity): without gradients the stem's
    ReLU and pooling run as one pass (scale 1, shift 0), equal to ReLU then max pooling;
    with a gradient wanted, torchvision's modules."""
    tv, fused, x = _stems(device, "nchw")
    folded = resfused.fold(fused)
    y = folded.conv1(x)
    assert type(folded.bn1) is nn.Identity
    assert not stem_fusable(folded.bn1, folded.relu, folded.maxpool, y.detach().requires_grad_())
    with torch.no_grad():
        assert stem_fusable(folded.bn1, folded.relu, folded.maxpool, y)
        assert torch.equal(folded.stem(y), folded.maxpool(torch.relu(y)))
        assert_close(folded(x), tv.eval()(x), 1e-9, 1e-9, "folded logits")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_densenet_stem_matches_torchvision(case):
    """FusedDenseNet runs features' norm0 → relu0 → pool0 as one node: logits, gradients
    and running statistics as torchvision's (two training steps); with a hook on
    ``features`` torchvision's Sequential runs (the hook fires), with the same values."""
    from resfused.nn.stem import run_sequential

    backend, device = case
    dtype = torch.float32 if interpreted(*case) else torch.float64
    torch.manual_seed(5)
    tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                     num_classes=3).to(device, dtype)
    fused = resfused.convert(copy.deepcopy(tv))
    assert type(fused) is resfused.nn.FusedDenseNet
    x = torch.randn(2, 3, 24, 20, device=device, dtype=dtype)
    seq = fused.features
    assert stem_fusable(seq.norm0, seq.relu0, seq.pool0, seq.conv0(x))
    tol, gtol = TOLERANCES[dtype]["fwd"], TOLERANCES[dtype]["bwd"]
    with resfused.use_backend(backend):
        for step in range(2):
            out_tv, out_f = tv(x), fused(x)
            assert_close(out_f, out_tv, *tol, f"logits, step {step}")
            out_tv.sum().backward()
            out_f.sum().backward()
            for name in ("features.conv0.weight", "features.norm0.weight", "features.norm0.bias"):
                assert_close(fused.get_parameter(name).grad, tv.get_parameter(name).grad, *gtol, name)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close(getattr(fused.features.norm0, name), getattr(tv.features.norm0, name), *tol, name)
        seen = []
        h = fused.features.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert_close(fused(x), tv(x), *tol, "with a hook on features")
        h.remove()
    assert seen == [torch.Size([2, 16, 3, 2])]
    assert_close(run_sequential(seq, x), tv.features(x), *tol, "run_sequential")
    resfused.revert(fused)
    assert type(fused) is torchvision.models.DenseNet


def test_run_sequential_keeps_sequential_semantics():
    """A None slot in features raises nn.Sequential's own error (nothing is skipped); an
    integer input to a folded stem's ReLU and pooling runs torchvision's modules."""
    from resfused.nn.stem import run_sequential

    seq = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2))
    seq[1] = None
    with pytest.raises(TypeError):
        run_sequential(seq, torch.randn(2, 3, 4, 4))
    y = torch.randint(-5, 5, (1, 2, 4, 4))
    with torch.no_grad():
        assert not stem_fusable(nn.Identity(), nn.ReLU(), nn.MaxPool2d(2), y)
