"""Running cases: interleaved timing, memory, the correctness check, the run's context.

Timing: the providers of a case take turns in one process, one call each per round with
the order rotating, so drift and noise on a shared machine hit them alike and their ratios
stay fair. The first call of every provider is the checked call (and the first warm-up);
then ``case.warmup - 1`` untimed rounds; then at least ``case.reps`` timed rounds, more until
``case.min_time`` seconds have passed (at most 10x reps). CUDA: each call is timed with CUDA
events; CPU: ``time.perf_counter``.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .cases import COMPILED, DTYPES, Case, baseline_provider, block_params, not_applicable
from .workloads import Instance, make_instance, make_shared, op_bytes_moved, provider_memory_format, \
    resfused_backend

MiB = 2 ** 20
GiB = 2 ** 30

# Correctness check. Each compared tensor is held to one measure:
#   * outputs (out, logits, loss): max |a - b| / max |b|;
#   * gradients: ||a - b|| / ||b|| (relative L2). Where a ReLU's input lies within rounding of
#     0, two correct implementations can put it on different sides; that gradient element
#     then differs by its whole value (and a few neighbours through the convs), so a
#     gradient's max error is not a check across implementations: eager NCHW against eager
#     channels_last differs by up to 7% at one element of a dense block's input gradient
#     (relative L2 1e-3), and by 2-4% everywhere in resnet50's first-conv gradient, which sits
#     behind 50 layers of them (batch 8, 224x224, fp32, CPU).
# fp32: against the eager baseline, within FP32_TOLERANCE[(level, kind)] (observed: outputs
# ~1e-6 for ops and blocks and ~1e-5 for models; gradients ~1e-6 for ops and plain blocks,
# 1e-3 for dense blocks, 2e-2 for models). bf16/fp16: against eager in fp32, within 2x the
# eager baseline's own error there (DESIGN.md §6), never tighter than the dtype's epsilon.
# Every tensor's max relative error is recorded and printed whatever its measure.
FP32_TOLERANCE = {("op", "output"): 1e-4, ("op", "grad"): 1e-3,
                  ("block", "output"): 1e-4, ("block", "grad"): 1e-2,
                  ("model", "output"): 1e-3, ("model", "grad"): 1e-1}
LOW_PRECISION_FACTOR = 2.0


def tensor_kind(name: str) -> str:
    return "grad" if name.startswith("grad") else "output"


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(exc, oom_types):
        return True
    msg = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg.lower() or "can't allocate memory" in msg or isinstance(exc, MemoryError))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class exact_fp32:
    """TF32 off for the checked calls and the fp32 reference (restored after): cuDNN runs
    fp32 convolutions in TF32 by default, and two correct implementations that pick
    different algorithms then differ by TF32's rounding (a 10-bit mantissa), not by
    their own. The timed calls run with the settings the user has."""

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# context

def _git(*args: str) -> Optional[str]:
    try:
        res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def context(device: torch.device) -> dict:
    """Where and with what the run was made (every record carries it)."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import torchvision
        tv_version = torchvision.__version__
    except Exception:
        tv_version = None
    from .. import __version__
    from .._backend import load_extension

    ext, _ = load_extension()
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    ctx = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torchvision": tv_version,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "resfused": __version__,
        "extension_built": ext is not None,
        "extension_cuda_kernels": bool(getattr(ext, "with_cuda", False)),
        "commit": commit,
        "commit_dirty": bool(dirty) if dirty is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "host_cores": available_cores(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        ctx["device_memory_GiB"] = round(props.total_memory / GiB, 1)
        ctx["capability"] = f"{props.major}.{props.minor}"
    return ctx


# ---------------------------------------------------------------------------------------------
# which providers run

def provider_skip_reason(case: Case, provider: str, device: torch.device, preset: str, explicit: Sequence[str]) -> \
        Optional[str]:
    """Why a provider that applies to ``case`` does not run here (None: it runs). Providers
    named with ``--provider`` run whenever they can."""
    from .._backend import triton_interpreting, unavailable_reason

    backend = resfused_backend(provider)
    if provider == "resfused[tconv]":
        why = unavailable_reason("triton", device)
        if why:
            return f"the Triton convolutions cannot run: {why}"
    if backend is not None and backend != "auto":
        why = unavailable_reason(backend, device)
        if why:
            return why
        if case.dtype != "fp32":
            from .._backend import SUPPORTED_DTYPES
            if DTYPES[case.dtype] not in SUPPORTED_DTYPES[backend]:
                return f"the {backend} backend has no {case.dtype} kernels"
    if provider in explicit:
        return None
    if provider in COMPILED:
        if preset == "quick":
            return f"left out of --quick (compiling takes minutes); name --provider {provider} to include it"
        if device.type == "cpu":
            return ("on the CPU inductor compiles C++ for every graph, minutes per model on a small machine; "
                    f"name --provider {provider} to include it")
    if provider == "resfused[eager]":
        return "the eager backend is the test oracle (plain PyTorch); name --provider resfused[eager] to time it"
    if provider in ("resfused[triton]", "resfused[tconv]") and device.type == "cpu" and triton_interpreting():
        return ("Triton runs CPU tensors through its interpreter, a correctness tool far too slow to time; "
                f"name --provider {provider} to run it anyway")
    if provider == "resfused[auto]" and device.type == "cpu":
        return "on a CPU resfused's own choice is resfused[cpu]; name --provider resfused[auto] to time it"
    if provider == "resfused[auto]" and preset == "quick":
        return ("left out of --quick (per block it is resfused[cuda] or resfused[tconv], whichever is faster); "
                "name --provider resfused[auto] to include it")
    return None


def case_providers(case: Case, providers: Sequence[str], device: torch.device, preset: str,
                   explicit: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """(providers that run, {provider: why not} for those that apply but do not run). The
    case's eager baseline always runs."""
    base = baseline_provider(case)
    run, skipped = [base], {}
    for p in providers:
        if p == base or not_applicable(case, p):
            continue
        if case.mode == "max_batch" and device.type != "cuda":
            continue
        why = provider_skip_reason(case, p, device, preset, explicit)
        if why:
            skipped[p] = why
        else:
            run.append(p)
    return run, skipped


# ---------------------------------------------------------------------------------------------
# memory: a rough lower bound of what a case needs, checked before any work

# Activation bytes per image in a fp32 training step at 224x224 (eager, measured: saved
# bytes for backward plus the gradients alive with them), and the fraction inference keeps.
_MODEL_BYTES_PER_IMAGE = {"resnet50": 100 * MiB, "resnet18": 30 * MiB, "densenet121": 150 * MiB}


def estimate_bytes(case: Case) -> int:
    """A deliberately low estimate of the memory ``case`` needs (used to refuse a preset
    that cannot fit, never to size anything)."""
    es = 4
    n = case.shape[0]
    if case.level == "op":
        numel = math.prod(case.shape)
        return {"fwd": 4, "fwd_bwd": 8}.get(case.mode, 4) * numel * es
    if case.level == "block":
        p = block_params(case.name, case.variant)
        hw = p["hw"] ** 2
        if case.name == "denseblock":
            c0, k, L = p["num_input_features"], p["growth_rate"], p["num_layers"]
            per_image = sum(c0 + i * k for i in range(L)) * hw * 2 * es
        else:
            per_image = 6 * p["inplanes"] * hw * es
        return n * per_image
    per_image = _MODEL_BYTES_PER_IMAGE[case.name] * (case.shape[-1] * case.shape[-2]) / (224 * 224)
    if case.mode == "inference":
        per_image *= 0.1
    return int(n * per_image)


def available_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# timing

def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int, reps: int,
                     min_time: float, on_error: Callable[[str, BaseException], None]) -> Dict[str, List[float]]:
    """Seconds per call of each function (name -> callable), interleaved. A function that
    raises is reported through ``on_error`` and dropped from the rotation."""
    names = list(fns)

    def call(name: str) -> bool:
        try:
            fns[name]()
            return True
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            on_error(name, exc)
            names.remove(name)
            free_memory(device)
            return False

    for _ in range(warmup):
        for name in list(names):
            call(name)
    sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    cuda = device.type == "cuda"
    start = time.perf_counter()
    rounds = 0
    while names and (rounds < reps or time.perf_counter() - start < min_time) and rounds < 10 * max(reps, 1):
        k = rounds % len(names)
        order = names[k:] + names[:k]
        events = []
        for name in order:
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                ok = call(name)
                end.record()
                if ok:
                    events.append((name, begin, end))
            else:
                t0 = time.perf_counter()
                if call(name):
                    samples[name].append(time.perf_counter() - t0)
        if cuda:
            torch.cuda.synchronize(device)
            for name, begin, end in events:
                samples[name].append(begin.elapsed_time(end) / 1e3)
        rounds += 1
    return samples


def device_ms(fn: Callable[[], object], device: torch.device, reps: int) -> Tuple[Optional[float], str]:
    """The GPU's own time for one call of ``fn``, in ms, without the host's: ``fn`` is
    captured once in a CUDA graph and the graph replayed ``reps`` times back to back
    between two events, so no Python, launch or allocator work sits between its kernels.
    A call timed with events around it (``time_interleaved``) measures whichever of the
    host and the GPU is slower; the two side by side say which one a call is bound by.
    Returns (ms, "") or (None, why not): not a CUDA device, or ``fn`` cannot be captured
    (it synchronizes, or copies to the host)."""
    if device.type != "cuda":
        return None, "no CUDA device"
    from .._backend import on_device

    with on_device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # compile, autotune and allocate outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as exc:  # noqa: BLE001 - the caller reports why
            torch.cuda.synchronize(device)
            return None, f"not capturable in a CUDA graph ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        graph.replay()
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(max(reps, 1)):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        ms = begin.elapsed_time(end) / max(reps, 1)
        del graph
        return ms, ""


def summarize(samples: List[float]) -> dict:
    ms = sorted(1e3 * s for s in samples)
    med = statistics.median(ms)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = med
    return {"ms": med, "ms_min": ms[0], "ms_max": ms[-1], "ms_q1": q1, "ms_q3": q3,
            "iqr_pct": 100 * (q3 - q1) / med if med > 0 else 0.0,
            "ms_stdev": statistics.stdev(ms) if len(ms) >= 2 else 0.0, "samples": len(ms)}


# ---------------------------------------------------------------------------------------------
# correctness

def rel_errors(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Tuple[float, float]:
    """(max |a - b| / max |b|, ||a - b|| / ||b||); inf for NaN, inf or a shape mismatch."""
    if a is None or b is None:
        return (0.0, 0.0) if a is None and b is None else (math.inf, math.inf)
    if a.shape != b.shape:
        return math.inf, math.inf
    a = a.detach().double() if a.device.type == "cpu" else a.detach().float()
    b = b.detach().double() if b.device.type == "cpu" else b.detach().float()
    d = a - b
    out = []
    for diff, scale in ((d.abs().max(), b.abs().max()), (d.norm(), b.norm())):
        diff, scale = diff.item(), scale.item()
        if not math.isfinite(diff):
            out.append(math.inf)
        else:
            out.append(diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return out[0], out[1]


def dtype_eps(dtype: str) -> float:
    return torch.finfo(DTYPES[dtype]).eps


def check_outputs(case: Case, outputs: Dict[str, Dict[str, torch.Tensor]], base: str,
                  reference: Optional[Dict[str, torch.Tensor]]) -> Dict[str, dict]:
    """Every provider's verdict: ``ok``; ``max_rel_err`` (the largest max relative error of any
    compared tensor, printed); and for the tensor worst against its tolerance, its name, the
    measure it is held to, its error in that measure and the tolerance. fp32: against the
    eager baseline. bf16/fp16: against eager in fp32, within 2x the baseline's own error."""
    result: Dict[str, dict] = {}
    against = outputs[base] if reference is None else reference
    floor = dtype_eps(case.dtype)

    def measure(name: str, errs: Tuple[float, float]) -> float:
        return errs[0] if tensor_kind(name) == "output" else errs[1]

    eager_err = None
    if reference is not None:
        eager_err = {k: measure(k, rel_errors(outputs[base].get(k), v)) for k, v in reference.items()}
    for p, out in outputs.items():
        if p == base and reference is None:
            continue
        worst, max_rel = None, 0.0
        for k, v in against.items():
            errs = rel_errors(out.get(k), v)
            max_rel = max(max_rel, errs[0])
            err = measure(k, errs)
            if eager_err is None:
                tol = FP32_TOLERANCE[(case.level, tensor_kind(k))]
            else:
                tol = max(LOW_PRECISION_FACTOR * eager_err[k], floor)
            ratio = err / tol
            if worst is None or ratio > worst[0]:
                worst = (ratio, err, tol, k)
        if worst is None:
            continue
        ratio, err, tol, k = worst
        verdict = {"ok": p == base or ratio <= 1.0, "max_rel_err": max_rel, "check_tensor": k,
                   "check_measure": "max relative" if tensor_kind(k) == "output" else "relative L2",
                   "check_err": err, "tol": tol, "against": base if reference is None else "eager fp32"}
        if eager_err is not None:
            verdict["eager_err"] = eager_err[k]
        result[p] = verdict
    return result


# ---------------------------------------------------------------------------------------------
# one case

@dataclass
class CaseResult:
    case: Case
    rows: List[dict]
    failures: List[str] = field(default_factory=list)


def mismatch_message(case: Case, provider: str, verdict: dict) -> str:
    extra = f", eager's own {verdict['eager_err']:.3g}" if "eager_err" in verdict else ""
    return (f"{case.label} {provider}: {verdict['check_measure']} error {verdict['check_err']:.3g} in "
            f"{verdict['check_tensor']} against {verdict['against']} exceeds the tolerance {verdict['tol']:.3g}{extra} "
            f"(max relative error {verdict['max_rel_err']:.3g})")


def _row(case: Case, provider: str, base: str) -> dict:
    return {"case": case.key, "level": case.level, "workload": case.workload, "mode": case.mode,
            "dtype": case.dtype, "autocast": case.level != "op" and case.dtype != "fp32",
            "case_memory_format": case.memory_format,
            "memory_format": provider_memory_format(case, provider), "shape": list(case.shape),
            "batch": case.batch, "provider": provider, "baseline": provider == base, "status": "ok",
            "reason": None}


def _fail_message(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


class _Case:
    """Bookkeeping for one case: rows by provider and the failures that fail the run."""

    def __init__(self, case: Case, providers: Sequence[str], skipped: Dict[str, str], log: Callable[[str], None]):
        self.case = case
        self.base = baseline_provider(case)
        self.log = log
        self.rows = {p: _row(case, p, self.base) for p in providers}
        for p, why in skipped.items():
            self.rows[p] = dict(_row(case, p, self.base), status="skipped", reason=why)
        self.failures: List[str] = []

    def drop(self, provider: str, exc: BaseException, when: str) -> None:
        """Record that ``provider`` failed ``when``: out of memory -> skipped; a resfused
        provider or the baseline raising -> an error that fails the run; a peer -> skipped."""
        row = self.rows[provider]
        if is_oom(exc):
            row.update(status="skipped", reason=f"out of memory {when}")
            self.log(f"  {provider}: out of memory {when}; skipped")
        elif resfused_backend(provider) is not None or provider == self.base:
            row.update(status="error", reason=f"{when}: {_fail_message(exc)}")
            self.failures.append(f"{self.case.label} {provider}: raised {when}: {_fail_message(exc)}")
            self.log(f"  {provider}: ERROR {when}: {_fail_message(exc)}")
        else:
            row.update(status="skipped", reason=f"failed {when}: {_fail_message(exc)}")
            self.log(f"  {provider}: failed {when} ({_fail_message(exc)}); skipped")

    def result(self) -> CaseResult:
        return CaseResult(self.case, list(self.rows.values()), self.failures)


def run_case(case: Case, providers: Sequence[str], skipped: Dict[str, str], device: torch.device,
             log: Callable[[str], None]) -> CaseResult:
    """Measure ``case`` for ``providers`` (the baseline first). Never raises for a provider's
    failure: it is recorded in the rows (and in ``failures`` when it must fail the run)."""
    st = _Case(case, providers, skipped, log)
    try:
        if case.mode == "max_batch":
            _run_max_batch(st, providers, device)
        else:
            _run_measured(st, providers, device)
    finally:
        free_memory(device)
    return st.result()


def _shared_or_drop(st: "_Case", providers: Sequence[str], device: torch.device):
    """The case's shared set-up (weights, inputs); None, with every provider dropped and the
    reason recorded, when it fails."""
    try:
        return make_shared(st.case, device)
    except Exception as exc:  # noqa: BLE001
        for p in providers:
            st.drop(p, exc, "setting up the case")
        return None


def _run_measured(st: _Case, providers: Sequence[str], device: torch.device) -> None:
    from ..memory import saved_bytes

    case, base = st.case, st.base
    shared = _shared_or_drop(st, providers, device)
    if shared is None:
        return
    insts: Dict[str, Instance] = {}
    for p in providers:
        try:
            insts[p] = make_instance(case, p, shared, device)
        except Exception as exc:  # noqa: BLE001
            st.drop(p, exc, "building")
    # The checked call: the first call of each provider, with saved-for-backward bytes.
    outputs: Dict[str, Dict[str, torch.Tensor]] = {}
    for p in list(insts):
        inst = insts[p]
        try:
            with exact_fp32():
                if inst.measure_saved and case.training:
                    box: dict = {}
                    nbytes = saved_bytes(lambda: box.update(res=inst.check()), inst.saved_exclude)
                    st.rows[p]["saved_MiB"] = nbytes / MiB
                else:
                    box = {"res": inst.check()}
            sync(device)
            outputs[p] = box["res"]
        except Exception as exc:  # noqa: BLE001
            st.drop(p, exc, "in the first (checked) call")
            del insts[p]
            free_memory(device)
    if base not in outputs:
        for p in list(insts):
            st.rows[p].update(status="skipped", reason=f"the eager baseline ({base}) could not run")
        return
    reference = None
    if case.dtype != "fp32":
        try:
            ref = make_instance(case, "eager", shared, device, reference=True)
            with exact_fp32():
                reference = ref.check()
            del ref
        except Exception as exc:  # noqa: BLE001
            st.drop(base, exc, "running the fp32 reference")
            return
        free_memory(device)
    for p, verdict in check_outputs(case, outputs, base, reference).items():
        row = st.rows[p]
        row.update({k: v for k, v in verdict.items() if k != "ok"})
        if not verdict["ok"]:
            row["status"] = "mismatch"
            msg = mismatch_message(case, p, verdict)
            if resfused_backend(p) is not None:
                st.failures.append(msg)
                st.log(f"  MISMATCH {msg}")
            else:
                st.log(f"  warning: {msg} (a peer, not resfused: reported, does not fail the run)")
    del outputs, reference
    if not case.timed:
        _memory_ratios(st)
        return

    def on_error(name, exc):
        if name in st.rows:
            st.drop(name, exc, "while timing")
        else:  # the copy that measures bandwidth
            st.log(f"  copy bandwidth not measured: {_fail_message(exc)}")

    fns = {p: insts[p].run for p in insts}
    copy = None
    if case.level == "op":
        nbytes = op_bytes_moved(case)
        src = torch.empty(max(nbytes // 8, 1), device=device, dtype=torch.float32)   # reads + writes = nbytes
        dst = torch.empty_like(src)
        fns["(copy)"] = copy = (lambda: dst.copy_(src))
    # the remaining warm-up (the checked call was the first), then the peak memory of one call
    for _ in range(max(case.warmup - 1, 0)):
        for p in list(fns):
            try:
                fns[p]()
            except Exception as exc:  # noqa: BLE001
                on_error(p, exc)
                fns.pop(p)
                insts.pop(p, None)
    if device.type == "cuda":
        _peak_memory(st, insts, fns, device)
    samples = time_interleaved(fns, device, 0, case.reps, case.min_time, on_error)
    for p, s in samples.items():
        if p == "(copy)" or not s or st.rows[p]["status"] in ("skipped", "error"):
            continue
        st.rows[p].update(summarize(s))
    base_row = st.rows[base]
    copy_gbps = None
    if copy is not None and samples.get("(copy)"):
        copy_gbps = op_bytes_moved(case) / statistics.median(samples["(copy)"]) / 1e9
    for p, row in st.rows.items():
        if "ms" not in row:
            continue
        if base_row.get("ms"):
            row["speedup"] = base_row["ms"] / row["ms"]
        if case.level == "op":
            row["GBps"] = op_bytes_moved(case) / (row["ms"] / 1e3) / 1e9
            if copy_gbps:
                row["copy_GBps"] = copy_gbps
                row["fraction_of_copy"] = row["GBps"] / copy_gbps
        else:
            row["images_per_s"] = case.batch / (row["ms"] / 1e3)
    _memory_ratios(st)


def _peak_memory(st: _Case, insts: Dict[str, Instance], fns: dict, device: torch.device) -> None:
    """Peak memory of one call of each provider as if it ran alone: max_memory_allocated
    during the call, minus what was allocated before it (every provider's weights and
    optimizer state, the shared inputs), plus the provider's own weights and state and the
    inputs. Gradients are dropped first so none is resident between calls."""
    for inst in insts.values():
        inst.clear()
    free_memory(device)
    for p, inst in list(insts.items()):
        try:
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            inst.run()
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) - before + inst.static() + _input_bytes(st.case)
            inst.clear()
            st.rows[p]["peak_MiB"] = peak / MiB
        except Exception as exc:  # noqa: BLE001
            st.drop(p, exc, "measuring peak memory")
            fns.pop(p, None)
            insts.pop(p, None)
            free_memory(device)


def _input_bytes(case: Case) -> int:
    es = DTYPES[case.dtype].itemsize if case.level == "op" else 4
    n = math.prod(case.shape) * es
    return 3 * n if case.level == "op" else n


def _memory_ratios(st: _Case) -> None:
    base_row = st.rows[st.base]
    for row in st.rows.values():
        for key, metric in (("peak_MiB", "peak"), ("saved_MiB", "saved")):
            if row.get(key) is not None and base_row.get(key):
                row["mem_ratio"] = row[key] / base_row[key]
                row["mem_metric"] = metric
                break


def _run_max_batch(st: _Case, providers: Sequence[str], device: torch.device) -> None:
    """The largest training batch (a multiple of 8 above 8) each provider fits, one provider
    at a time, within ``case.mem_budget_gib`` (the whole device when None)."""
    case = st.case
    total = torch.cuda.get_device_properties(device).total_memory
    budget = total if case.mem_budget_gib is None else min(total, int(case.mem_budget_gib * GiB))
    shared = _shared_or_drop(st, providers, device)
    if shared is None:
        return
    free_memory(device)
    fraction = budget / total
    set_fraction = getattr(torch.cuda, "set_per_process_memory_fraction", None)
    try:
        if set_fraction is not None and fraction < 1.0:
            set_fraction(fraction, device)
        for p in providers:
            row = st.rows[p]
            row["mem_budget_GiB"] = round(budget / GiB, 1)
            try:
                inst = make_instance(case, p, shared, device)
            except Exception as exc:  # noqa: BLE001
                st.drop(p, exc, "building")
                continue
            t0 = time.perf_counter()
            try:
                row["max_batch"] = _largest_batch(inst.probe, case.batch, inst, device, budget=budget,
                                                  peak=(lambda: torch.cuda.reset_peak_memory_stats(device),
                                                        lambda: torch.cuda.max_memory_allocated(device)))
            except Exception as exc:  # noqa: BLE001
                st.drop(p, exc, "searching the largest batch")
            row["search_s"] = time.perf_counter() - t0
            del inst
            free_memory(device)
    finally:
        if set_fraction is not None and fraction < 1.0:
            set_fraction(1.0, device)
    base_row = st.rows[st.base]
    for row in st.rows.values():
        if row.get("max_batch") and base_row.get("max_batch"):
            row["mem_ratio"] = base_row["max_batch"] / row["max_batch"]
            row["mem_metric"] = "images per batch (inverse)"


def _largest_batch(probe: Callable[[int], None], start: int, inst: Instance, device: torch.device,
                   limit: int = 1 << 16, budget: Optional[int] = None,
                   peak: Optional[Tuple[Callable[[], None], Callable[[], int]]] = None) -> int:
    """The largest multiple of 8 (from ``start``) that ``probe`` runs without running out of
    memory. With ``budget`` (bytes) and ``peak`` = (reset, read) of the peak allocation, the
    peaks at the first two batches give a linear model (fixed + per-image bytes) whose
    prediction is probed first, so a search takes ~4-6 probes instead of ~10; doubling and
    bisection take over wherever the model is off."""
    step = 8
    peaks: Dict[int, int] = {}

    def fits(batch: int) -> bool:
        try:
            if peak is not None:
                peak[0]()
            probe(batch)
            sync(device)
            if peak is not None:
                peaks[batch] = int(peak[1]())
            return True
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            return False
        finally:
            inst.clear()
            free_memory(device)

    lo, hi = 0, None
    b = max(start, step) // step * step
    while b <= limit:  # doubling, or until the linear model has two points
        if not fits(b):
            hi = b
            break
        lo, b = b, b * 2
        if budget is not None and len(peaks) >= 2:
            (b1, p1), (b2, p2) = sorted(peaks.items())[-2:]
            per = (p2 - p1) / (b2 - b1)
            if per > 0:
                guess = min(limit, int((budget - (p1 - per * b1)) / per) // step * step)
                if guess > lo:
                    if fits(guess):
                        lo = guess
                        if guess + step > limit or not fits(guess + step):
                            return lo
                        lo, b = guess + step, 2 * (guess + step)
                    else:
                        hi = guess
                        break
            budget = None  # one prediction; doubling and bisection from here
    if hi is None:
        return lo
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


__all__ = ["CaseResult", "FP32_TOLERANCE", "available_bytes", "case_providers", "check_outputs", "context",
           "estimate_bytes", "is_oom", "mismatch_message", "provider_skip_reason", "rel_errors", "run_case", "summarize",
           "time_interleaved"]
