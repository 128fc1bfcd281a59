"""The benchmark's cases and presets, shared by ``python -m resfused.bench`` and the
pytest-benchmark suite in ``benchmarks/``.

A *case* is one workload at one shape, dtype and memory format, measured for every
provider that applies to it. Workloads by level:

  op     join       ``relu(bn(x) + r)``, BN in training mode (fwd, fwd+bwd)
         bn_relu    ``relu(bn(x))``, training mode (fwd, fwd+bwd)
         apply      the forward apply pass alone, ``relu(x*scale + shift + r)`` (fwd, no grad)
  block  bottleneck torchvision ``Bottleneck`` at a ResNet-50 stage shape (train fwd+bwd)
         basicblock torchvision ``BasicBlock`` at a ResNet-18 stage shape (train fwd+bwd)
         denseblock torchvision ``_DenseBlock`` at a DenseNet-121 block shape (train fwd+bwd)
  model  resnet50, resnet18, densenet121: ``train_step`` (forward, backward, SGD step),
         ``inference`` (eval, inference_mode), ``saved`` (bytes autograd saves for backward in a
         training forward, ``resfused.memory.model_saved_bytes``; not timed) and, on CUDA,
         ``max_batch`` (the largest training batch that fits, found by running steps)

Providers (``PROVIDERS``): ``eager`` and ``eager_cl`` are torchvision / plain PyTorch in NCHW
and channels_last; ``compile`` is ``torch.compile`` of the eager model in the case's memory
format; ``tv_memeff`` is torchvision's DenseNet ``memory_efficient=True`` (checkpointing);
``resfused[<backend>]`` is resfused forced onto one backend with the library convolutions;
``resfused[tconv]`` runs the fused ResNet blocks, dense layers and transitions on resfused's
Triton convolutions (BN-ReLU in their prologue, statistics in their epilogue), ``resfused[auto]`` is resfused's own
per-shape choice, what a user gets by default, and ``resfused[compile]`` is ``torch.compile`` of
that resfused model or call (no Python between the fused ops on a GPU, where the fused calls'
host time is what they lose on). Op cases carry their own memory
format (their tensors are in it), so ``eager_cl`` applies to blocks and models only.
The eager *baseline* of a case (speed-up and memory ratios are against it, correctness is
checked against it) is ``eager``, or ``eager_cl`` for a channels_last block or model case.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

LEVELS = ("op", "block", "model")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = ("nchw", "channels_last")
PRESETS = ("quick", "full", "tiny")
RESFUSED_BACKENDS = ("cpu", "triton", "cuda", "eager")
#: resfused[tconv]: the fused blocks on the Triton convolutions (BN in their prologue and
#: epilogue, ``use_conv("triton")``); resfused[auto]: resfused as a user gets it (backend
#: and convolutions chosen per shape)
RESFUSED_EXTRA = ("tconv", "auto", "compile")
#: providers timed through torch.compile (the eager model's, resfused's)
COMPILED = ("compile", "resfused[compile]")
PROVIDERS = ("eager", "eager_cl", "compile", "tv_memeff") + tuple(f"resfused[{b}]"
                                                                  for b in RESFUSED_BACKENDS + RESFUSED_EXTRA)
MODES = ("fwd", "fwd_bwd", "train_step", "inference", "saved", "max_batch")

OP_WORKLOADS = ("join", "bn_relu", "apply")
BLOCK_WORKLOADS = ("bottleneck", "basicblock", "denseblock")
MODEL_WORKLOADS = ("resnet50", "resnet18", "densenet121")
WORKLOADS = OP_WORKLOADS + BLOCK_WORKLOADS + MODEL_WORKLOADS
DENSE_WORKLOADS = ("denseblock", "densenet121")

# Block shapes: the non-downsampling block of each ResNet-50 / ResNet-18 stage and each
# DenseNet-121 dense block (bn_size 4, growth 32), at 224x224 input. "tiny" is for tests.
BLOCK_VARIANTS: Dict[str, Dict[str, dict]] = {
    "bottleneck": {
        "stage1": dict(inplanes=256, planes=64, hw=56),
        "stage2": dict(inplanes=512, planes=128, hw=28),
        "stage3": dict(inplanes=1024, planes=256, hw=14),
        "stage4": dict(inplanes=2048, planes=512, hw=7),
        "tiny": dict(inplanes=16, planes=4, hw=6),
    },
    "basicblock": {
        "stage1": dict(inplanes=64, planes=64, hw=56),
        "stage2": dict(inplanes=128, planes=128, hw=28),
        "stage3": dict(inplanes=256, planes=256, hw=14),
        "stage4": dict(inplanes=512, planes=512, hw=7),
        "tiny": dict(inplanes=8, planes=8, hw=6),
    },
    "denseblock": {
        "block1": dict(num_layers=6, num_input_features=64, bn_size=4, growth_rate=32, hw=56),
        "block2": dict(num_layers=12, num_input_features=128, bn_size=4, growth_rate=32, hw=28),
        "block3": dict(num_layers=24, num_input_features=256, bn_size=4, growth_rate=32, hw=14),
        "block4": dict(num_layers=16, num_input_features=512, bn_size=4, growth_rate=32, hw=7),
        "tiny": dict(num_layers=2, num_input_features=8, bn_size=2, growth_rate=4, hw=6),
    },
}


def block_params(name: str, variant: str) -> dict:
    return BLOCK_VARIANTS[name][variant]


def block_channels(name: str, variant: str) -> int:
    p = block_params(name, variant)
    return p["num_input_features"] if name == "denseblock" else p["inplanes"]


@dataclass(frozen=True)
class Case:
    """One workload at one shape, dtype and memory format."""

    level: str                   # op | block | model
    name: str                    # a WORKLOADS entry
    mode: str                    # a MODES entry
    dtype: str                   # fp32 | bf16 | fp16 (blocks and models: autocast to it)
    memory_format: str           # nchw | channels_last
    shape: Tuple[int, ...]       # the input, [N, C, H, W]
    variant: str = ""            # block stage ("stage2", "block1", ...)
    reps: int = 10               # timed rounds, at least
    warmup: int = 2              # untimed calls first (the correctness run is the first)
    min_time: float = 0.0        # keep timing until this many seconds have passed (max 10x reps rounds)
    mem_budget_gib: Optional[float] = None   # max_batch: search within this much device memory

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def timed(self) -> bool:
        return self.mode not in ("saved", "max_batch")

    @property
    def training(self) -> bool:
        return self.mode in ("fwd", "fwd_bwd", "train_step", "saved", "max_batch")

    @property
    def workload(self) -> str:
        return f"{self.name}[{self.variant}]" if self.variant else self.name

    @property
    def key(self) -> str:
        """Identifies the case across runs (``--compare``)."""
        shape = "x".join(str(s) for s in self.shape)
        return f"{self.level}:{self.workload}:{self.mode}:{self.dtype}:{self.memory_format}:{shape}"

    @property
    def label(self) -> str:
        mode = {"fwd_bwd": "fwd+bwd", "train_step": "train step", "max_batch": "max batch",
                "saved": "saved bytes"}.get(self.mode, self.mode)
        fmt = "CL" if self.memory_format == "channels_last" else "NCHW"
        return f"{self.level} {self.workload} {mode} {self.dtype} {fmt} {list(self.shape)}"

    def with_batch(self, batch: int) -> "Case":
        return dataclasses.replace(self, shape=(batch,) + tuple(self.shape[1:]))


def baseline_provider(case: Case) -> str:
    """The eager provider a case's ratios and correctness check are taken against."""
    if case.level != "op" and case.memory_format == "channels_last":
        return "eager_cl"
    return "eager"


def not_applicable(case: Case, provider: str) -> Optional[str]:
    """Why ``provider`` has nothing to measure in ``case`` (None when it applies). Such
    providers are left out of the case silently; see ``runner.provider_skip_reason`` for
    providers that apply but cannot or should not run here."""
    if provider == "eager_cl":
        if case.level == "op":
            return "op cases carry their own memory format"
        if case.mode in ("saved", "max_batch") and baseline_provider(case) != "eager_cl":
            return "same bytes as eager"
    if provider == "eager" and case.mode in ("saved", "max_batch") and baseline_provider(case) != "eager":
        return "same bytes as eager_cl"
    if provider == "tv_memeff":
        if case.name not in DENSE_WORKLOADS:
            return "torchvision's memory_efficient option exists for DenseNets only"
        if case.mode == "inference":
            return "memory_efficient changes nothing without autograd"
    if provider in COMPILED and case.mode in ("saved", "max_batch"):
        return "not measured for torch.compile"
    if provider in ("resfused[tconv]", "resfused[auto]") and case.level == "op":
        return "op cases have no convolution"
    if provider in ("resfused[tconv]", "resfused[auto]") and case.mode == "max_batch":
        return "not searched for the conv choices (it saves what the library-conv path saves)"
    if provider == "resfused[tconv]":
        if case.memory_format != "channels_last":
            return "the Triton convolutions take channels_last tensors"
        if case.mode == "saved":
            return "saves what the library-conv path saves"
    return None


# ---------------------------------------------------------------------------------------------
# Presets. Each is a list of case templates per device type; ``--dtype`` replaces a template's
# dtypes, ``--batch`` its batch. The shapes that earlier issues are judged by are marked TARGET.

def _op(name, modes, dtypes, fmts, shape, **timing):
    return [Case("op", name, m, d, f, tuple(shape), **timing) for m in modes for d in dtypes for f in fmts]


def _blocks(names_variants, dtypes, fmts, batch, **timing):
    cases = []
    for name, variant in names_variants:
        p = block_params(name, variant)
        shape = (batch, block_channels(name, variant), p["hw"], p["hw"])
        cases += [Case("block", name, "fwd_bwd", d, f, shape, variant=variant, **timing) for d in dtypes for f in fmts]
    return cases


def _model(name, mode, dtypes, fmts, batch, size=224, **timing):
    return [Case("model", name, mode, d, f, (batch, 3, size, size), **timing) for d in dtypes for f in fmts]


_CPU_JOIN = (32, 256, 28, 28)        # TARGET: join fwd+bwd fp32, NCHW and channels_last
_ALL_STAGES = [("bottleneck", f"stage{i}") for i in range(1, 5)] + [("basicblock", f"stage{i}") for i in range(1, 5)] \
    + [("denseblock", f"block{i}") for i in range(1, 5)]
_STAGE2 = [("bottleneck", "stage2"), ("basicblock", "stage2"), ("denseblock", "block2")]
_BOTH = MEMORY_FORMATS
_NCHW = ("nchw",)
_CL = ("channels_last",)


def _cpu_quick() -> List[Case]:
    t_op = dict(reps=10, warmup=2, min_time=0.3)
    t_model = dict(reps=3, warmup=1)
    return (
        _op("join", ("fwd", "fwd_bwd"), ("fp32",), _BOTH, _CPU_JOIN, **t_op)       # TARGET
        + _op("bn_relu", ("fwd_bwd",), ("fp32",), _BOTH, _CPU_JOIN, **t_op)
        + _op("apply", ("fwd",), ("fp32",), _BOTH, _CPU_JOIN, **t_op)
        + _blocks(_STAGE2, ("fp32",), _NCHW, 8, reps=3, warmup=1)
        + _model("resnet50", "saved", ("fp32",), _NCHW, 4)                          # TARGET
        + _model("densenet121", "saved", ("fp32",), _NCHW, 4)                       # TARGET
        + _model("resnet50", "train_step", ("fp32",), _NCHW, 8, **t_model)          # TARGET
        + _model("densenet121", "train_step", ("fp32",), _NCHW, 8, **t_model)       # TARGET
        + _model("resnet18", "train_step", ("fp32",), _NCHW, 8, **t_model)
        + _model("resnet50", "inference", ("fp32",), _NCHW, 8, **t_model)
    )


def _cpu_full() -> List[Case]:
    t_op = dict(reps=20, warmup=3, min_time=2.0)
    t_model = dict(reps=12, warmup=2)
    return (
        _op("join", ("fwd", "fwd_bwd"), ("fp32",), _BOTH, _CPU_JOIN, **t_op)       # TARGET
        + _op("bn_relu", ("fwd", "fwd_bwd"), ("fp32",), _BOTH, _CPU_JOIN, **t_op)
        + _op("apply", ("fwd",), ("fp32",), _BOTH, _CPU_JOIN, **t_op)
        + _blocks(_ALL_STAGES, ("fp32",), _NCHW, 16, reps=10, warmup=2, min_time=1.0)
        + _model("resnet50", "saved", ("fp32",), _NCHW, 4)                          # TARGET
        + _model("densenet121", "saved", ("fp32",), _NCHW, 4)                       # TARGET
        + _model("resnet50", "train_step", ("fp32",), _NCHW, 8, **t_model)          # TARGET
        + _model("densenet121", "train_step", ("fp32",), _NCHW, 8, **t_model)       # TARGET
        # channels_last: the faster layout for the CPU library convolutions (against eager_cl)
        + _model("resnet50", "train_step", ("fp32",), _CL, 8, **t_model)
        + _model("densenet121", "train_step", ("fp32",), _CL, 8, **t_model)
        + _model("resnet18", "train_step", ("fp32",), _NCHW, 8, **t_model)
        + _model("resnet50", "inference", ("fp32",), _NCHW, 8, **t_model)
        + _model("resnet18", "inference", ("fp32",), _NCHW, 8, **t_model)
        + _model("densenet121", "inference", ("fp32",), _NCHW, 8, **t_model)
    )


def _cuda_quick() -> List[Case]:
    big = (64, 256, 56, 56)
    t_op = dict(reps=20, warmup=3, min_time=0.2)
    t_model = dict(reps=6, warmup=2, min_time=0.3)
    return (
        _op("join", ("fwd_bwd",), ("bf16",), _CL, big, **t_op)                      # TARGET
        + _op("join", ("fwd_bwd",), ("fp32",), _CL, big, **t_op)
        + _op("apply", ("fwd",), ("bf16", "fp32"), _BOTH, big, **t_op)              # TARGET: GB/s vs copy
        + _op("bn_relu", ("fwd_bwd",), ("bf16",), _CL, big, **t_op)
        + _blocks(_STAGE2, ("bf16",), _CL, 64, reps=10, warmup=2, min_time=0.2)
        + _model("resnet50", "saved", ("fp32",), _NCHW, 4)
        + _model("densenet121", "saved", ("fp32",), _NCHW, 4)
        + _model("resnet50", "train_step", ("bf16",), _CL, 128, **t_model)         # TARGET (+ peak memory)
        + _model("densenet121", "train_step", ("bf16",), _CL, 64, **t_model)       # TARGET (+ peak memory)
        + _model("densenet121", "max_batch", ("bf16",), _CL, 64, mem_budget_gib=16.0)   # TARGET, 16 GiB cap
    )


def _cuda_full() -> List[Case]:
    big = (128, 256, 56, 56)
    t_op = dict(reps=50, warmup=5, min_time=1.0)
    t_model = dict(reps=30, warmup=3, min_time=2.0)
    return (
        _op("join", ("fwd", "fwd_bwd"), ("bf16", "fp32"), _BOTH, big, **t_op)       # TARGET
        + _op("bn_relu", ("fwd", "fwd_bwd"), ("bf16", "fp32"), _BOTH, big, **t_op)
        + _op("apply", ("fwd",), ("bf16", "fp32"), _BOTH, big, **t_op)              # TARGET
        + _blocks(_ALL_STAGES, ("bf16",), _CL, 64, reps=30, warmup=3, min_time=0.5)
        + _model("resnet50", "saved", ("fp32",), _NCHW, 4)
        + _model("densenet121", "saved", ("fp32",), _NCHW, 4)
        + _model("resnet50", "train_step", ("bf16",), _CL, 128, **t_model)         # TARGET
        + _model("resnet18", "train_step", ("bf16",), _CL, 256, **t_model)
        + _model("densenet121", "train_step", ("bf16",), _CL, 64, **t_model)       # TARGET
        + _model("densenet121", "max_batch", ("bf16",), _CL, 64)                   # TARGET, whole device
        + _model("resnet50", "max_batch", ("bf16",), _CL, 128)
        + _model("resnet50", "inference", ("bf16",), _CL, 256, **t_model)
        + _model("resnet18", "inference", ("bf16",), _CL, 256, **t_model)
        + _model("densenet121", "inference", ("bf16",), _CL, 256, **t_model)
    )


def _tiny(device_type: str) -> List[Case]:
    """Toy shapes, two timed rounds: for tests of the tool itself, numbers mean nothing.
    (Models at 64x64: smaller, a batch-norm over the last stage's few values makes eager's
    own fp32 result drift from fp64 by tens of percent.)"""
    t = dict(reps=2, warmup=1)
    shape = (2, 8, 5, 5)
    cases = (
        _op("join", ("fwd", "fwd_bwd"), ("fp32",), _BOTH, shape, **t)
        + _op("bn_relu", ("fwd_bwd",), ("fp32",), _BOTH, shape, **t)
        + _op("apply", ("fwd",), ("fp32",), _BOTH, shape, **t)
        + _blocks([("bottleneck", "tiny"), ("basicblock", "tiny"), ("denseblock", "tiny")], ("fp32",), _NCHW, 2, **t)
        + _blocks([("bottleneck", "tiny")], ("fp32",), _CL, 2, **t)
        + _model("resnet18", "saved", ("fp32",), _NCHW, 4, size=64)
        + _model("resnet18", "train_step", ("fp32",), _NCHW, 4, size=64, **t)
        + _model("resnet18", "inference", ("fp32",), _NCHW, 4, size=64, **t)
        + _model("densenet121", "saved", ("fp32",), _NCHW, 4, size=64)
    )
    if device_type == "cuda":
        cases += _model("resnet18", "max_batch", ("fp32",), _NCHW, 4, size=64, mem_budget_gib=1.0)
    return cases


def preset_cases(preset: str, device_type: str) -> List[Case]:
    """The cases of ``preset`` on a device type ("cpu" or "cuda"), before any filter."""
    if preset == "tiny":
        return _tiny(device_type)
    table = {("quick", "cpu"): _cpu_quick, ("full", "cpu"): _cpu_full,
             ("quick", "cuda"): _cuda_quick, ("full", "cuda"): _cuda_full}
    return table[(preset, device_type)]()


def select_cases(preset: str, device_type: str, levels: Sequence[str] = LEVELS, dtypes: Optional[Sequence[str]] = None,
                 names: Optional[Sequence[str]] = None, batch: Optional[int] = None) -> List[Case]:
    """The preset's cases at ``levels``, for workloads ``names`` (all when None), with each
    template's dtype replaced by ``dtypes`` and its batch by ``batch`` when given."""
    out: List[Case] = []
    seen = set()
    for case in preset_cases(preset, device_type):
        if case.level not in levels or (names and case.name not in names):
            continue
        variants = [case] if dtypes is None else [dataclasses.replace(case, dtype=d) for d in dtypes]
        for c in variants:
            if batch is not None:
                c = c.with_batch(batch)
            if c.key not in seen:
                seen.add(c.key)
                out.append(c)
    return out


__all__ = ["BLOCK_VARIANTS", "COMPILED", "Case", "DTYPES", "LEVELS", "MEMORY_FORMATS", "MODES", "PRESETS", "PROVIDERS",
           "RESFUSED_BACKENDS", "RESFUSED_EXTRA", "WORKLOADS", "baseline_provider", "block_channels", "block_params",
           "not_applicable", "preset_cases", "select_cases"]
