"""resfused benchmark: the fused residual join against eager PyTorch, measured in one run.

    python -m benchmarks.bench --quick              # the quick run (CPU here, GPU when present)
    python -m benchmarks.bench --device cuda --out results.json

What is measured (timings: median of repeated runs, after warm-up, implementations taking
turns in one process so ratios are fair):
  * join_train_fwd_bwd: training forward + backward of ``relu(bn(x) + r)`` — eager is
    ``torch.relu(F.batch_norm(x, ...) + r)`` then ``.backward``; resfused is
    ``resfused.functional.batch_norm_act(..., residual=r)`` then ``.backward``.
  * join_train_fwd: the training forward alone.
  * apply_bandwidth (CUDA only): the forward apply pass ``relu(x*scale + shift + r)`` alone,
    as GB/s and as a fraction of the device's measured copy bandwidth (``dst.copy_(src)``).
  * {resnet50,densenet121}_saved_MiB: bytes autograd saves for backward in a training
    forward (batch 4, 224x224, fp32, parameters excluded) — deterministic, any device;
    densenet121 also against torchvision's memory_efficient=True (checkpointing).
  * {resnet50,densenet121}_train_step: forward + backward + SGD step, torchvision eager vs
    resfused with the same weights (CPU: batch 8, fp32; CUDA: batch 128 / 64, bf16
    autocast, channels_last, peak memory, and torch.compile of torchvision with --compile).
Every record carries its context: device, versions, git commit, dtype, memory format, shape, date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import resfused  # noqa: E402
from resfused import functional as RF  # noqa: E402
from resfused._backend import BACKENDS, unavailable_reason  # noqa: E402
from resfused.ops import bn_act as ops  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, device, warmup=3, reps=10, min_time=0.0):
    """Median seconds per call of each function in ``fns`` (name -> callable).

    The functions take turns, one call each per round (order rotating), so drift and
    noise on a shared machine hit all of them alike and their ratios stay fair."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    samples = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < reps or (time.perf_counter() - start) < min_time:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        if rounds >= 10 * reps:
            break
    return {name: (statistics.median(v), len(v)) for name, v in samples.items()}


def context(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _make(shape, dtype, device, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    r = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    c = shape[1]
    p = dict(rm=torch.zeros(c, device=device), rv=torch.ones(c, device=device),
             w=torch.rand(c, device=device).add_(0.5).requires_grad_(),
             b=torch.randn(c, device=device).mul_(0.1).requires_grad_())
    return x, r, g, p


def bench_join(shape, dtype, device, channels_last, backends, reps, min_time):
    """Training fwd and fwd+bwd of relu(bn(x)+r): eager vs each resfused backend."""
    x, r, g, p = _make(shape, dtype, device, channels_last)
    xg = x.detach().requires_grad_()
    rg = r.detach().requires_grad_()

    def eager_fwd():
        return torch.relu(F.batch_norm(xg, p["rm"], p["rv"], p["w"], p["b"], True, 0.1, 1e-5) + rg)

    def fused_fwd(backend):
        return lambda: RF.batch_norm_act(xg, p["rm"], p["rv"], p["w"], p["b"], True, 0.1, 1e-5, residual=rg,
                                         backend=backend)

    def fwd_bwd(fwd):
        def run():
            out = fwd()
            torch.autograd.backward(out, g)
            xg.grad = rg.grad = p["w"].grad = p["b"].grad = None
        return run

    rows = []
    for what, make in (("join_train_fwd", lambda f: f), ("join_train_fwd_bwd", fwd_bwd)):
        fns = {"eager": make(eager_fwd)}
        fns.update({f"resfused[{b}]": make(fused_fwd(b)) for b in backends})
        timed = time_interleaved(fns, device, reps=reps, min_time=min_time)
        t_eager = timed["eager"][0]
        for impl, (t, n) in timed.items():
            rows.append({"bench": what, "impl": impl, "ms": 1e3 * t, "samples": n, "speedup_vs_eager": t_eager / t})
    for row in rows:
        row.update({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                    "memory_format": "channels_last" if channels_last else "nchw"})
    return rows


def bench_apply_bandwidth(shape, dtype, device, channels_last, backends, reps, min_time):
    """Forward apply pass alone (reads x and r, writes out) vs the device's copy bandwidth."""
    x, r, _, _ = _make(shape, dtype, device, channels_last)
    c = shape[1]
    affine = torch.stack([torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)])
    src = torch.empty(x.numel() * 3 // 2, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    fns = {"copy": lambda: dst.copy_(src)}
    fns.update({b: (lambda b=b: ops.bn_act_fwd(x, affine, r, None, True, b)) for b in backends})
    timed = time_interleaved(fns, device, reps=reps, min_time=min_time)
    t_copy = timed["copy"][0]
    copy_bw = 2 * src.numel() * src.element_size() / t_copy
    rows = [{"bench": "copy_bandwidth", "impl": "torch.copy_", "GBps": copy_bw / 1e9, "ms": 1e3 * t_copy}]
    moved = 3 * x.numel() * x.element_size()
    for backend in backends:
        t = timed[backend][0]
        rows.append({"bench": "apply_bandwidth", "impl": f"resfused[{backend}]", "ms": 1e3 * t,
                     "GBps": moved / t / 1e9, "fraction_of_copy": moved / t / copy_bw})
    for row in rows:
        row.update({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                    "memory_format": "channels_last" if channels_last else "nchw"})
    return rows


def _torchvision(name, **kw):
    import torchvision

    return lambda: getattr(torchvision.models, name)(**kw)


def _resfused(name, **kw):
    return lambda: getattr(resfused.models, name)(**kw)


# (model, the implementations compared: label -> builder); the first is the baseline
MODEL_VARIANTS = {
    "resnet50": [("torchvision", _torchvision("resnet50")), ("resfused", _resfused("resnet50")),
                 ("resfused(memory_efficient=False)", _resfused("resnet50", memory_efficient=False))],
    "densenet121": [("torchvision", _torchvision("densenet121")),
                    ("torchvision(memory_efficient=True)", _torchvision("densenet121", memory_efficient=True)),
                    ("resfused", _resfused("densenet121"))],
}


def bench_model_memory(name, device, batch=4, size=224):
    """Bytes autograd saves in a training forward (parameters excluded): deterministic."""
    from resfused.memory import model_saved_bytes

    x = torch.randn(batch, 3, size, size, device=device)
    rows = []
    base = None
    for impl, build in MODEL_VARIANTS[name]:
        model = build().to(device).train()
        mib = model_saved_bytes(model, x) / 2**20
        base = mib if base is None else base
        rows.append({"bench": f"{name}_saved_MiB", "impl": impl, "MiB": mib, "ratio_vs_torchvision": mib / base,
                     "shape": [batch, 3, size, size], "dtype": "float32", "memory_format": "nchw"})
        del model
    return rows


def bench_model_step(name, device, batch, size, dtype, channels_last, reps, min_time, compile_eager=False):
    """One training step (forward, backward, SGD step): every variant of MODEL_VARIANTS[name]
    with the same weights, plus torch.compile of torchvision's when asked; peak memory on CUDA."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,), device=device)
    autocast = dtype != torch.float32

    def make(model):
        model = model.to(device).to(memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
        return step

    variants = MODEL_VARIANTS[name]
    state = variants[0][1]().state_dict()
    fns = {}
    for impl, build in variants:
        model = build()
        model.load_state_dict(state)
        fns[impl] = make(model)
    if compile_eager:
        model = variants[0][1]()
        model.load_state_dict(state)
        fns["torch.compile(torchvision)"] = make(torch.compile(model))
    peak = {}
    if device.type == "cuda":
        for impl, fn in fns.items():
            fn()  # warm-up (and compile)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            peak[impl] = torch.cuda.max_memory_allocated(device) / 2**20
    timed = time_interleaved(fns, device, warmup=1, reps=reps, min_time=min_time)
    t_base = timed[variants[0][0]][0]
    rows = []
    for impl, (t, n) in timed.items():
        row = {"bench": f"{name}_train_step", "impl": impl, "ms": 1e3 * t, "samples": n,
               "speedup_vs_eager": t_base / t, "shape": [batch, 3, size, size],
               "dtype": ("autocast " if autocast else "") + str(dtype).replace("torch.", ""),
               "memory_format": "channels_last" if channels_last else "nchw"}
        if impl in peak:
            row["peak_MiB"] = peak[impl]
        rows.append(row)
    return rows


def plan(device: torch.device, quick: bool):
    """(bench, shape, dtype, channels_last) for the device: the shapes the issues name."""
    if device.type == "cpu":
        shape = (32, 256, 28, 28)
        return [("join", shape, torch.float32, False), ("join", shape, torch.float32, True)]
    big = (128, 256, 56, 56) if not quick else (64, 256, 56, 56)
    return [("join", big, torch.bfloat16, True), ("join", big, torch.float32, True),
            ("join", big, torch.bfloat16, False), ("apply", big, torch.bfloat16, True),
            ("apply", big, torch.float32, False)]


def _format(row) -> str:
    if "MiB" in row:
        extra = f"{row['MiB']:.1f} MiB saved for backward ({row['ratio_vs_torchvision']:.3f}x torchvision)"
        return f"{row['bench']:22s} {row['impl']:34s} {str(tuple(row['shape'])):20s} {extra}"
    if "speedup_vs_eager" in row:
        extra = f"speedup {row['speedup_vs_eager']:.2f}x"
        if "peak_MiB" in row:
            extra += f", peak {row['peak_MiB']:.0f} MiB"
    else:
        extra = f"{row['GBps']:.0f} GB/s" + (f" ({100 * row['fraction_of_copy']:.0f}% of copy)"
                                            if "fraction_of_copy" in row else "")
    return (f"{row['bench']:22s} {row['impl']:34s} {row['dtype']:18s} {row['memory_format']:13s} "
            f"{str(tuple(row['shape'])):20s} {row['ms']:9.3f} ms  {extra}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (the README's first command)")
    ap.add_argument("--out", default=None, help="write the JSON record here (default benchmarks/results/latest-<device>.json)")
    ap.add_argument("--backends", default=None, help="comma-separated resfused backends (default: all that run)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of torchvision's resnet50 (GPU)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in BACKENDS if not unavailable_reason(b, device) and b != "eager"
                    and not (b == "triton" and device.type == "cpu")]
    for b in backends:
        why = unavailable_reason(b, device)
        if why:
            print(f"backend {b} cannot run: {why}", file=sys.stderr)
            return 2
    reps, min_time = (5, 0.5) if args.quick else (20, 2.0)
    ctx = context(device)
    print(f"# resfused benchmark on {ctx['device']} — torch {ctx['torch']}, triton {ctx['triton']}, "
          f"commit {ctx['commit']}, {ctx['date']}")
    print(f"# backends: {', '.join(backends)}; median of >= {reps} runs")
    rows = []
    jobs = [(bench_join if kind == "join" else bench_apply_bandwidth, (shape, dtype, device, cl, backends, reps,
                                                                       min_time))
            for kind, shape, dtype, cl in plan(device, args.quick)]
    step_reps = 3 if args.quick else 12
    for name in MODEL_VARIANTS:
        jobs.append((bench_model_memory, (name, device)))
        if device.type == "cpu":
            jobs.append((bench_model_step, (name, device, 8, 224, torch.float32, False, step_reps, 0.0)))
        else:
            batch = 128 if name == "resnet50" else 64
            jobs.append((bench_model_step, (name, device, batch, 224, torch.bfloat16, True, reps, min_time,
                                            args.compile)))
    for fn, fn_args in jobs:
        new = fn(*fn_args)
        for row in new:
            print(_format(row))
        rows += new
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record = {"context": ctx, "quick": args.quick, "backends": backends, "results": rows}
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"latest-{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
