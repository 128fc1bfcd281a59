"""What each (case, provider) runs: the timed call, the checked call and the memory hooks.

``make_shared(case, device)`` builds what every provider of a case shares (inputs, the
weights as a state_dict, gradients of the output), from fixed seeds;
``make_instance(case, provider, shared, device)`` builds one provider's ``Instance``. The
eager fp32 reference of a low-precision case is ``make_instance(case, "eager", shared,
device, reference=True)``: same weights and inputs, fp32, no autocast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cases import COMPILED, DTYPES, RESFUSED_EXTRA, Case, block_params

# How many bytes of each op-level tensor the op must read or write at least (each tensor
# once): the numerator of the GB/s column. N = elements of x.
#   join fwd: x, r in, out | fwd+bwd: + grad_out in, grad_x, grad_r out
#   bn_relu fwd: x in, out | fwd+bwd: + grad_out in, grad_x out
#   apply: x, r in, out
OP_TENSORS_MOVED = {("join", "fwd"): 3, ("join", "fwd_bwd"): 6, ("bn_relu", "fwd"): 2, ("bn_relu", "fwd_bwd"): 4,
                    ("apply", "fwd"): 3}


def op_bytes_moved(case: Case) -> int:
    n = 1
    for s in case.shape:
        n *= s
    return OP_TENSORS_MOVED[(case.name, case.mode)] * n * torch.empty((), dtype=DTYPES[case.dtype]).element_size()


def memory_format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def provider_memory_format(case: Case, provider: str) -> str:
    """eager / eager_cl are NCHW / channels_last by name (blocks and models); every other
    provider, and every op-level provider, runs in the case's memory format."""
    if case.level != "op" and provider == "eager":
        return "nchw"
    if case.level != "op" and provider == "eager_cl":
        return "channels_last"
    return case.memory_format


def resfused_backend(provider: str) -> Optional[str]:
    """The elementwise backend a resfused provider forces ("auto": resfused's own choice);
    None for a provider that is not resfused."""
    if not provider.startswith("resfused["):
        return None
    name = provider[len("resfused["):-1]
    return "auto" if name in RESFUSED_EXTRA else name


def resfused_conv(provider: str) -> str:
    """The ``use_conv`` choice of a resfused provider."""
    return {"resfused[tconv]": "triton", "resfused[auto]": "auto", "resfused[compile]": "auto"}.get(provider, "library")


@dataclass
class Instance:
    """One provider's callables for one case."""

    run: Callable[[], object]                       # the timed call
    check: Callable[[], Dict[str, Tensor]]          # one call; its results are compared with eager's
    saved_exclude: Sequence[Tensor] = ()            # storages not counted as saved activations
    measure_saved: bool = True                      # saved-for-backward bytes can be measured around check()
    static: Callable[[], int] = lambda: 0           # bytes of parameters, buffers and optimizer state
    clear: Callable[[], None] = lambda: None        # drop gradients (before a peak-memory measurement)
    probe: Optional[Callable[[int], None]] = None   # max_batch: one training step at a batch size
    keep: List[object] = field(default_factory=list)  # objects the instance owns (freed with it)


class Shared:
    """What the providers of one case share: inputs, weights, output gradients (fixed seeds)."""

    def __init__(self, case: Case, device: torch.device):
        self.case = case
        self.device = device
        self.dtype = DTYPES[case.dtype]
        self._grads: Dict[tuple, Tensor] = {}
        self._inputs: Dict[tuple, Tensor] = {}
        gen = torch.Generator().manual_seed(0)
        # The big tensors are drawn where they live: a CPU generator makes tens of millions
        # of numbers a second, seconds per case at a GPU's shapes (on the CPU: the same draw).
        big = _generator(device, 0, gen)
        self.x = torch.randn(case.shape, generator=big, device=device)      # fp32, NCHW master copy
        self.state: Optional[dict] = None
        if case.level == "op":
            c = case.shape[1]
            self.r = torch.randn(case.shape, generator=big, device=device)
            self.weight = (torch.rand(c, generator=gen) + 0.5).to(device)
            self.bias = (torch.randn(c, generator=gen) * 0.1).to(device)
            self.running_mean = (torch.randn(c, generator=gen) * 0.1).to(device)
            self.running_var = (torch.rand(c, generator=gen) + 0.5).to(device)
        elif case.level == "block":
            self.state = _randomised_state(build_block(case, "eager"), gen)
        else:
            self.target = torch.randint(0, 1000, (case.batch,), generator=gen).to(device)
            self.state = _randomised_state(build_model(case, "eager"), gen)

    def input(self, dtype: torch.dtype, fmt: str, which: str = "x") -> Tensor:
        """The case input ``which`` ("x" or "r") in dtype and memory format (cached)."""
        key = (which, dtype, fmt)
        if key not in self._inputs:
            src = self.x if which == "x" else self.r
            self._inputs[key] = src.to(dtype).contiguous(memory_format=memory_format(fmt))
        return self._inputs[key]

    def grad_for(self, out: Tensor) -> Tensor:
        """A fixed random gradient for an output shaped like ``out`` (same values for every
        provider, in out's dtype and memory format)."""
        fmt = "channels_last" if (out.dim() == 4 and not out.is_contiguous()
                                  and out.is_contiguous(memory_format=torch.channels_last)) else "nchw"
        key = (tuple(out.shape), out.dtype, fmt)
        if key not in self._grads:
            gen = _generator(self.device, 1)
            g = torch.randn(tuple(out.shape), generator=gen, device=self.device).to(out.dtype)
            self._grads[key] = g.contiguous(memory_format=memory_format(fmt)) if out.dim() == 4 else g
        return self._grads[key]


def _generator(device: torch.device, seed: int, cpu: Optional[torch.Generator] = None) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (``cpu``, when given, on the CPU)."""
    if device.type == "cpu":
        return cpu if cpu is not None else torch.Generator().manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def _randomised_state(module: nn.Module, gen: torch.Generator) -> dict:
    """The module's state_dict with BN weights and biases drawn at random (not 1 and 0), so
    the correctness check exercises them."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for name, mod in module.named_modules():
        if isinstance(mod, nn.BatchNorm2d) and mod.affine:
            prefix = f"{name}." if name else ""
            c = mod.num_features
            state[prefix + "weight"] = torch.rand(c, generator=gen) + 0.5
            state[prefix + "bias"] = torch.randn(c, generator=gen) * 0.1
    return state


def _autocast(case: Case, device: torch.device, reference: bool):
    dtype = DTYPES[case.dtype]
    if reference or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _backend_ctx(provider: str):
    backend = resfused_backend(provider)
    if backend is None:
        yield
        return
    import resfused

    with resfused.use_backend(None if backend == "auto" else backend), resfused.use_conv(resfused_conv(provider)):
        yield


def _tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _maybe_compile(provider: str, fn):
    if provider not in COMPILED:
        return fn
    return torch.compile(fn)


# ---------------------------------------------------------------------------------------------
# op level

def _op_instance(case: Case, provider: str, sh: Shared, device: torch.device, reference: bool) -> Instance:
    from .. import functional as RF
    from ..ops import bn_act as ops

    dtype = torch.float32 if reference else sh.dtype
    fmt = case.memory_format
    grad = case.mode == "fwd_bwd" or (case.mode == "fwd" and case.name != "apply")
    x = sh.input(dtype, fmt).detach().clone().requires_grad_(grad)
    r = sh.input(dtype, fmt, "r").detach().clone().requires_grad_(grad)
    w = sh.weight.clone().requires_grad_(grad)
    b = sh.bias.clone().requires_grad_(grad)
    rm, rv = sh.running_mean.clone(), sh.running_var.clone()
    backend = resfused_backend(provider)
    leaves = (x, r, w, b)

    if case.name == "apply":
        scale, shift = w.detach(), b.detach()
        affine = torch.stack([scale, shift])
        s4, t4 = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
        if backend is not None:
            def fwd():
                return ops.bn_act_fwd(x, affine, r, None, True, backend)
        else:
            def fwd():  # the eager composition, fp32 arithmetic like torch's own BN apply
                return (x * s4).add_(t4).add_(r).relu_().to(x.dtype)
    elif backend is not None:
        residual = r if case.name == "join" else None

        def fwd():
            return RF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, residual=residual, backend=backend)
    elif case.name == "join":
        def fwd():
            return torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + r)
    else:
        def fwd():
            return torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
    fwd = _maybe_compile(provider, fwd)

    def clear():
        for t in leaves:
            t.grad = None

    if case.mode == "fwd_bwd":
        def call():
            out = fwd()
            out.backward(sh.grad_for(out))
            return out

        def results(out):
            res = {"out": out.detach(), "grad_x": x.grad, "grad_weight": w.grad, "grad_bias": b.grad}
            if case.name == "join":
                res["grad_r"] = r.grad
            return res

        run, check = _train_fns(call, clear, results)
    else:
        ctx = torch.no_grad if case.name == "apply" else contextlib.nullcontext

        def run():
            with ctx():
                fwd()

        def check():
            with ctx():
                return {"out": fwd().detach()}

    return Instance(run=run, check=check, saved_exclude=(w, b, rm, rv), clear=clear,
                    measure_saved=provider not in COMPILED and case.name != "apply",
                    static=lambda: _tensor_bytes((w, b, rm, rv)), keep=[x, r])


def _train_fns(call: Callable, clear: Callable, results: Callable):
    """``run`` (forward + backward, gradients cleared) and ``check`` (the same, returning
    ``results(out)``: output and gradients, taken before they are cleared)."""
    def run():
        call()
        clear()

    def check():
        res = results(call())
        clear()
        return res

    return run, check


# ---------------------------------------------------------------------------------------------
# block level

def build_block(case: Case, provider: str) -> nn.Module:
    """torchvision's block for eager providers (``memory_efficient=True`` for tv_memeff), the
    resfused subclass with the same constructor for resfused providers."""
    from torchvision.models.densenet import _DenseBlock
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from ..nn import FusedBasicBlock, FusedBottleneck, FusedDenseBlock

    fused = resfused_backend(provider) is not None
    p = block_params(case.name, case.variant)
    if case.name == "bottleneck":
        return (FusedBottleneck if fused else Bottleneck)(p["inplanes"], p["planes"])
    if case.name == "basicblock":
        return (FusedBasicBlock if fused else BasicBlock)(p["inplanes"], p["planes"])
    return (FusedDenseBlock if fused else _DenseBlock)(p["num_layers"], p["num_input_features"], p["bn_size"],
                                                       p["growth_rate"], drop_rate=0.0,
                                                       memory_efficient=provider == "tv_memeff")


def _block_instance(case: Case, provider: str, sh: Shared, device: torch.device, reference: bool) -> Instance:
    fmt = "nchw" if reference else provider_memory_format(case, provider)
    module = build_block(case, "eager" if reference else provider)
    module.load_state_dict(sh.state)
    module = module.to(device).to(memory_format=memory_format(fmt)).train()
    x = sh.input(torch.float32, fmt).detach().clone().requires_grad_()
    model = _maybe_compile(provider, module)
    autocast = lambda: _autocast(case, device, reference)  # noqa: E731
    backend = lambda: _backend_ctx(provider)  # noqa: E731

    def clear():
        module.zero_grad(set_to_none=True)
        x.grad = None

    def call():
        with backend():
            with autocast():
                out = model(x)
            out.backward(sh.grad_for(out))
        return out

    run, check = _train_fns(call, clear, lambda out: {"out": out.detach(), "grad_x": x.grad})
    return Instance(run=run, check=check, saved_exclude=list(module.parameters()) + list(module.buffers()),
                    measure_saved=provider not in COMPILED, clear=clear,
                    static=lambda: _tensor_bytes(list(module.parameters()) + list(module.buffers())),
                    keep=[module, model, x])


# ---------------------------------------------------------------------------------------------
# model level

def build_model(case: Case, provider: str) -> nn.Module:
    import torchvision

    if resfused_backend(provider) is not None:
        from .. import models

        return getattr(models, case.name)()
    kwargs = {"memory_efficient": True} if provider == "tv_memeff" else {}
    return getattr(torchvision.models, case.name)(**kwargs)


def _model_instance(case: Case, provider: str, sh: Shared, device: torch.device, reference: bool) -> Instance:
    fmt = "nchw" if reference else provider_memory_format(case, provider)
    mf = memory_format(fmt)
    module = build_model(case, "eager" if reference else provider)
    module.load_state_dict(sh.state)
    module = module.to(device).to(memory_format=mf)
    model = _maybe_compile(provider, module)
    x = sh.input(torch.float32, fmt)
    first = next(module.parameters())
    autocast = lambda: _autocast(case, device, reference)  # noqa: E731
    backend = lambda: _backend_ctx(provider)  # noqa: E731
    params_and_buffers = list(module.parameters()) + list(module.buffers())

    if case.mode == "inference":
        module.eval()

        def infer():
            with backend(), torch.inference_mode(), autocast():
                return model(x)

        return Instance(run=infer, check=lambda: {"logits": infer().clone()}, measure_saved=False,
                        static=lambda: _tensor_bytes(params_and_buffers), keep=[module, model])

    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    def step(inp: Tensor, target: Tensor):
        opt.zero_grad(set_to_none=True)
        with backend():
            with autocast():
                logits = model(inp)
                loss = F.cross_entropy(logits, target)
            loss.backward()
        opt.step()
        return logits, loss

    def static():
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]
        return _tensor_bytes(params_and_buffers + state)

    def clear():
        opt.zero_grad(set_to_none=True)

    if case.mode == "saved":
        def forward():
            with backend(), autocast():
                return model(x)

        return Instance(run=forward, check=lambda: {"logits": forward().detach()},
                        saved_exclude=params_and_buffers, static=static, clear=clear, keep=[module, model, opt])

    def check():
        logits, loss = step(x, sh.target)
        return {"loss": loss.detach().reshape(1), "logits": logits.detach(), "grad_first_conv": first.grad.clone()}

    def probe(batch: int):
        gen = _generator(device, 2)
        inp = torch.randn((batch,) + tuple(case.shape[1:]), generator=gen, device=device).contiguous(memory_format=mf)
        target = torch.randint(0, 1000, (batch,), generator=gen, device=device)
        step(inp, target)
        clear()

    return Instance(run=lambda: step(x, sh.target), check=check, saved_exclude=params_and_buffers,
                    measure_saved=provider not in COMPILED, static=static, clear=clear, probe=probe,
                    keep=[module, model, opt])


def make_shared(case: Case, device: torch.device) -> Shared:
    return Shared(case, device)


def make_instance(case: Case, provider: str, shared: Shared, device: torch.device, reference: bool = False) -> Instance:
    """``provider``'s Instance for ``case`` (``reference``: eager in fp32, no autocast)."""
    build = {"op": _op_instance, "block": _block_instance, "model": _model_instance}[case.level]
    return build(case, provider, shared, device, reference)


__all__ = ["Instance", "Shared", "build_block", "build_model", "make_instance", "make_shared", "op_bytes_moved",
           "provider_memory_format", "resfused_backend", "resfused_conv"]
