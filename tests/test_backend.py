"""Backend choice: automatic per call, forced by use_backend or RESFUSED_BACKEND, and a
forced backend that cannot run raises with the reason and the fix (never falls back)."""
import os
import subprocess
import sys

import pytest
import torch

import resfused
from resfused import _backend
from resfused import functional as RF
from resfused.ops import eager


def test_extension_is_built_with_every_backend_it_can_have():
    ext, why = _backend.load_extension()
    assert ext is not None, f"resfused._C is missing: {why}"
    assert hasattr(torch.ops.resfused_C, "bn_act_fwd")
    want_cuda = torch.version.cuda is not None and os.environ.get("RESFUSED_SKIP_CUDA_BUILD", "0") != "1"
    assert ext.with_cuda == want_cuda, "CUDA kernels should be compiled and linked whenever torch is a CUDA build"
    if want_cuda:
        assert ext.cuda_archs, "the build records its CUDA archs"


def test_default_choice_per_device():
    assert resfused.select_backend(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        assert resfused.select_backend(torch.device("cuda")) == "cuda"


def test_use_backend_forces_and_restores(monkeypatch):
    calls = []
    real = eager.bn_act_fwd
    monkeypatch.setattr(eager, "bn_act_fwd", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 4, 4)
    with resfused.use_backend("eager"):
        assert resfused.select_backend(x.device) == "eager"
        RF.batch_norm_act(x, None, None, training=True)
    assert calls == [1]
    assert resfused.select_backend(x.device) == "cpu"
    RF.batch_norm_act(x, None, None, training=True)
    assert calls == [1], "outside the block the cpu backend runs"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("RESFUSED_BACKEND", "eager")
    assert resfused.select_backend(torch.device("cpu")) == "eager"
    monkeypatch.setenv("RESFUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RESFUSED_BACKEND='bogus'"):
        resfused.select_backend(torch.device("cpu"))


def test_forced_backend_that_cannot_run_raises_with_reason():
    x = torch.randn(2, 3, 4, 4)
    rm = torch.zeros(3)
    with resfused.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' was forced but cannot run here: .*CUDA tensors only"):
            RF.batch_norm_act(x, rm, torch.ones(3), training=True)
    assert torch.equal(rm, torch.zeros(3))
    with pytest.raises(ValueError, match="unknown backend"):
        with resfused.use_backend("tpu"):
            pass
    with pytest.raises(RuntimeError, match="unknown backend 'tpu'"):
        RF.batch_norm_act(x, None, None, training=True, backend="tpu")


def test_missing_extension_message_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_backend, "load_extension", lambda: (None, "resfused._C could not be imported (test)"))
    why = _backend.unavailable_reason("cpu", torch.device("cpu"))
    assert "setup.py build_ext --inplace" in why
    assert _backend.default_backend(torch.device("cpu")) == "eager"


def test_backward_uses_the_forward_backend(monkeypatch):
    calls = []
    real = eager.bn_act_bwd_apply
    monkeypatch.setattr(eager, "bn_act_bwd_apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with resfused.use_backend("eager"):
        out = RF.batch_norm_act(x, None, None, training=True)
    out.sum().backward()
    assert calls == [1]


def test_info_reports_build_and_choice():
    proc = subprocess.run([sys.executable, "-m", "resfused.info"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "torch" in proc.stdout and "resfused._C: built" in proc.stdout
    assert "cpu: uses cpu" in proc.stdout
    assert "convolutions of fused blocks: use_conv=" in proc.stdout and "Triton convs on cpu" in proc.stdout
