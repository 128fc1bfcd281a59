"""The Triton convolution kernels against the work they replace, at ResNet-50's conv shapes,
with each kernel's achieved TFLOP/s and GB/s against the device's measured ceilings::

    python -m resfused.bench.conv                    # CUDA, bf16, batch 128, every shape
    python -m resfused.bench.conv --dtype fp32 --batch 64 --shape stage3.conv2
    python -m resfused.bench.conv --tiny             # toy shapes (tests of the tool; CPU: interpreter)

Per conv shape (channels_last, the non-downsampling Bottleneck of each stage plus stage 2's
stride-2 conv2), three kernels, each timed side by side with its library counterpart:

  fwd    Triton: conv(relu(bn(y_prev))) with the next BN's statistics in the epilogue
         library: bn_act_fwd (writes a) + F.conv2d + bn_stats (reads y again)
  dgrad  Triton: input gradient with the ReLU mask and BN sums in the epilogue
         library: aten.convolution_backward (input) + bn_act_bwd_reduce (reads da and y)
  wgrad  Triton: weight gradient, a recomputed from y_prev in the prologue
         library: bn_act_fwd (recompute a) + aten.convolution_backward (weight)

Each pair is timed twice: a call with CUDA events around it, as a model step sees it (the
host's time where launching the call takes longer than running it), and the GPU's own time,
the call replayed from a CUDA graph. TFLOP/s and GB/s use the GPU time.

Ceilings, measured in the same run: a large matmul in the case dtype (TFLOP/s; TF32 for
fp32 only with --tf32) and a large device copy (GB/s, read + write). GB/s counts each
tensor a kernel must touch once (x and w read, y written; dgrad also reads y_prev).
Every Triton result is checked against its library counterpart (exit 1 on a mismatch).
Writes JSON and markdown under benchmarks/results/ (``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .cases import DTYPES

# name: (Cin, Cout, kernel, stride, input H=W)
SHAPES: Dict[str, Tuple[int, int, int, int, int]] = {
    "stage1.conv1": (256, 64, 1, 1, 56), "stage1.conv2": (64, 64, 3, 1, 56), "stage1.conv3": (64, 256, 1, 1, 56),
    "stage2.conv1": (512, 128, 1, 1, 28), "stage2.conv2": (128, 128, 3, 1, 28),
    "stage2.conv2s2": (128, 128, 3, 2, 56), "stage2.conv3": (128, 512, 1, 1, 28),
    "stage3.conv1": (1024, 256, 1, 1, 14), "stage3.conv2": (256, 256, 3, 1, 14), "stage3.conv3": (256, 1024, 1, 1, 14),
    "stage4.conv1": (2048, 512, 1, 1, 7), "stage4.conv2": (512, 512, 3, 1, 7), "stage4.conv3": (512, 2048, 1, 1, 7),
}
TINY = {"tiny.conv1": (16, 8, 1, 1, 6), "tiny.conv2": (8, 8, 3, 1, 6), "tiny.conv2s2": (8, 8, 3, 2, 7)}
KERNELS = ("fwd", "dgrad", "wgrad")


def _ms(samples: List[float]) -> float:
    return statistics.median(samples) * 1e3


def _time(fns: Dict[str, callable], device: torch.device, reps: int, warmup: int) -> Dict[str, float]:
    from .runner import time_interleaved

    errors: Dict[str, str] = {}
    samples = time_interleaved(fns, device, warmup, reps, 0.0, lambda n, e: errors.__setitem__(n, repr(e)))
    if errors:
        raise RuntimeError(f"resfused.bench.conv: {errors}")
    return {k: _ms(v) for k, v in samples.items()}


def ceilings(device: torch.device, dtype: torch.dtype, tf32: bool, reps: int) -> Dict[str, float]:
    """Measured matmul TFLOP/s in ``dtype`` and copy GB/s on ``device``."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty((1 << 28) if device.type == "cuda" else (1 << 20), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        t = _time({"mm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, device, reps, 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return {"matmul_TFLOPs": 2 * n ** 3 / (t["mm"] / 1e3) / 1e12, "copy_GBps": 2 * src.numel() / (t["copy"] / 1e3) / 1e9}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs().max().item()
    s = b.float().abs().max().item()
    return d / s if s > 0 else (0.0 if d == 0 else math.inf)


def measure_shape(name: str, shape, batch: int, dtype: torch.dtype, device: torch.device, tf32: bool,
                  reps: int, warmup: int) -> List[dict]:
    from ..ops import bn_act as ops
    from ..triton import conv as tconv
    from .runner import device_ms

    cin, cout, k, stride, hw = shape
    pad = k // 2
    cl = torch.channels_last
    g = torch.Generator(device=device).manual_seed(0)
    y_prev = torch.randn(batch, cin, hw, hw, device=device, generator=g).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, device=device, generator=g) / math.sqrt(cin * k * k)).to(dtype)
    aff = torch.stack([torch.rand(cin, device=device, generator=g) + 0.5,
                       torch.randn(cin, device=device, generator=g) * 0.5]).float()
    st_prev = torch.stack([torch.zeros(cin, device=device), torch.ones(cin, device=device)])
    sp, pp, dp = (stride, stride), (pad, pad), (1, 1)
    prev_cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32  # both paths, and the reference, alike
    try:
        a = ops.bn_act_fwd(y_prev, aff, None, None, True, "auto")
        y_ref = F.conv2d(a, w, None, sp, pp, dp)
        dy = torch.randn(y_ref.shape, device=device, generator=g).to(dtype).contiguous(memory_format=cl)
        elt = torch.empty((), dtype=dtype).element_size()
        M = y_ref.shape[0] * y_ref.shape[2] * y_ref.shape[3]
        flops = 2.0 * M * cout * cin * k * k
        n_in, n_out, n_w = y_prev.numel(), y_ref.numel(), w.numel()
        fns = {
            "fwd": (lambda: tconv.conv_fwd(y_prev, w, sp, pp, dp, prologue=aff, stats=True, allow_tf32=tf32),
                    lambda: ops.bn_stats(F.conv2d(ops.bn_act_fwd(y_prev, aff, None, None, True, "auto"), w, None, sp,
                                                  pp, dp), "auto")),
            "dgrad": (lambda: tconv.conv_dgrad(dy, w, y_prev.shape, sp, pp, dp, y_prev, aff, st_prev, tf32),
                      lambda: ops.bn_act_bwd_reduce(
                          torch.ops.aten.convolution_backward(dy, a, w, None, list(sp), list(pp), list(dp), False,
                                                              [0, 0], 1, [True, False, False])[0],
                          y_prev, aff, st_prev, None, None, None, None, True, False, "auto")),
            "wgrad": (lambda: tconv.conv_wgrad(dy, y_prev, w.shape, sp, pp, dp, aff, tf32),
                      lambda: torch.ops.aten.convolution_backward(
                          dy, ops.bn_act_fwd(y_prev, aff, None, None, True, "auto"), w, None, list(sp), list(pp),
                          list(dp), False, [0, 0], 1, [False, True, False])[1]),
        }
        # correctness: each Triton kernel against its library counterpart
        out, (mean, var) = fns["fwd"][0]()
        errs = {"fwd": max(_rel(out, y_ref), _rel(var, y_ref.float().var((0, 2, 3), unbiased=False)))}
        da = torch.ops.aten.convolution_backward(dy, a, w, None, list(sp), list(pp), list(dp), False, [0, 0], 1,
                                                 [True, False, False])[0]
        dz, _ = fns["dgrad"][0]()
        errs["dgrad"] = _rel(dz, torch.where(a > 0, da, torch.zeros_like(da)))
        errs["wgrad"] = _rel(fns["wgrad"][0](), fns["wgrad"][1]())
        rows = []
        for kname, (tri, lib) in fns.items():
            t = _time({"triton": tri, "library": lib}, device, reps, warmup)
            gpu = {k: device_ms(f, device, 5 * reps) for k, f in (("triton", tri), ("library", lib))}
            moved = {"fwd": (n_in + n_out) * elt + n_w * elt,
                     "dgrad": (n_out + 2 * n_in) * elt + n_w * elt,
                     "wgrad": (n_out + n_in) * elt + n_w * 4}[kname]
            rows.append(_row(name, kname, batch, shape, t, {k: v[0] for k, v in gpu.items()},
                             "; ".join(f"{k}: {v[1]}" for k, v in gpu.items() if v[1]), flops, moved, errs[kname]))
        return rows
    finally:
        torch.backends.cudnn.allow_tf32 = prev_cudnn


def _row(name: str, kname: str, batch: int, shape, call: Dict[str, float], gpu: Dict[str, Optional[float]],
         why_no_gpu: str, flops: float, moved: float, err: float) -> dict:
    """One kernel's row. ``*_ms``: a call timed with events around it (the host's time where
    the host is slower than the GPU); ``*_gpu_ms``: the GPU's own time (CUDA graph replay,
    None without one). TFLOP/s and GB/s use the Triton call's GPU time where there is one."""
    cin, cout, k, stride, hw = shape
    t = gpu["triton"] if gpu["triton"] is not None else call["triton"]
    both = gpu["triton"] is not None and gpu["library"] is not None
    return {"shape": name, "kernel": kname, "batch": batch, "cin": cin, "cout": cout, "k": k, "stride": stride,
            "hw": hw, "triton_ms": call["triton"], "library_ms": call["library"],
            "speedup": call["library"] / call["triton"], "triton_gpu_ms": gpu["triton"],
            "library_gpu_ms": gpu["library"], "gpu_speedup": gpu["library"] / gpu["triton"] if both else None,
            "rates_from": "gpu" if gpu["triton"] is not None else "call", "no_gpu_time": why_no_gpu,
            "TFLOPs": flops / (t / 1e3) / 1e12, "GBps": moved / (t / 1e3) / 1e9, "max_rel_err": err}


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """Max relative error of a Triton result against its library counterpart: fp32
    (TF32 when both may use it: 10-bit mantissas), bf16, fp16."""
    if dtype == torch.float32:
        return 5e-3 if tf32 else 1e-4
    return 3e-2 if dtype == torch.bfloat16 else 5e-3


def markdown(rows: List[dict], ceil: Dict[str, float], meta: dict) -> str:
    def ms(v: Optional[float]) -> str:
        return "–" if v is None else f"{v:.3f}"

    def ratio(v: Optional[float]) -> str:
        return "–" if v is None else f"{v:.2f}x"

    lines = [f"Triton conv kernels vs library path — {meta['device']}, {meta['dtype']}, batch {meta['batch']}, "
             f"channels_last; ceilings: matmul {ceil['matmul_TFLOPs']:.1f} TFLOP/s, copy {ceil['copy_GBps']:.0f} GB/s",
             "",
             "call: one call timed with CUDA events around it (host-bound where the host is the slower); "
             "GPU: the GPU's own time, the call replayed from a CUDA graph. TFLOP/s and GB/s: from the "
             "Triton call's GPU time where there is one, else its call time.",
             "",
             "| shape | kernel | triton ms call / GPU | library ms call / GPU | speed-up call / GPU "
             "| TFLOP/s (% of matmul) | GB/s (% of copy) | max rel err |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['kernel']} | {ms(r['triton_ms'])} / {ms(r.get('triton_gpu_ms'))} | "
                     f"{ms(r['library_ms'])} / {ms(r.get('library_gpu_ms'))} | "
                     f"{ratio(r['speedup'])} / {ratio(r.get('gpu_speedup'))} | "
                     f"{r['TFLOPs']:.1f} ({100 * r['TFLOPs'] / ceil['matmul_TFLOPs']:.0f}%) | "
                     f"{r['GBps']:.0f} ({100 * r['GBps'] / ceil['copy_GBps']:.0f}%) | {r['max_rel_err']:.1e} |")
    why = sorted({r["no_gpu_time"] for r in rows if r.get("no_gpu_time")})
    if why:
        lines += ["", "No GPU time: " + " / ".join(why)]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resfused.bench.conv", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cuda:N (default: cuda); cpu only with --tiny")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128; 2 with --tiny)")
    p.add_argument("--shape", default=None, help=f"comma-separated shapes (default: all): {', '.join(SHAPES)}")
    p.add_argument("--tiny", action="store_true", help="toy shapes, for testing the tool")
    p.add_argument("--tf32", action="store_true", help="fp32: allow TF32 in both paths and the matmul ceiling")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per kernel (default 20; 2 with --tiny)")
    p.add_argument("--out", default=None, help="directory for JSON and markdown (default benchmarks/results)")
    p.add_argument("--name", default=None, help="file name stem (default conv-kernels-<device>-<dtype>)")
    args = p.parse_args(argv)
    table = TINY if args.tiny else SHAPES
    names = list(table)
    if args.shape:
        names = [s.strip() for s in args.shape.split(",") if s.strip()]
        bad = [s for s in names if s not in table]
        if bad:
            p.error(f"argument --shape: unknown {', '.join(bad)} (choose from {', '.join(table)})")
    if args.batch is not None and args.batch < 1:
        p.error(f"argument --batch: must be a positive integer, got {args.batch}")
    if args.reps is not None and args.reps < 1:
        p.error(f"argument --reps: must be a positive integer, got {args.reps}")
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev_name)
    except RuntimeError:
        p.error(f"argument --device: {dev_name!r} is not a device (choose from cuda, cuda:N, cpu)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: CUDA was requested but this machine has no CUDA device")
    if device.type not in ("cuda", "cpu"):
        p.error(f"argument --device: {dev_name!r} (choose from cuda, cuda:N, cpu)")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            p.error(f"argument --device: {dev_name!r} does not exist; this machine has {torch.cuda.device_count()} "
                    f"CUDA device(s)")
        torch.cuda.set_device(device)  # the timing events record on the current device
    if device.type == "cpu":
        from .._backend import triton_interpreting

        if not args.tiny or not triton_interpreting():
            p.error("argument --device: the Triton kernels run on CUDA; on a CPU only --tiny under "
                    "TRITON_INTERPRET=1 (a test of the tool, not a measurement)")
    dtype = DTYPES[args.dtype]
    batch = args.batch or (2 if args.tiny else 128)
    reps = args.reps or (2 if args.tiny else 20)
    from .runner import context, device_name

    ceil = ceilings(device, dtype, args.tf32, reps)
    rows = []
    for name in names:
        rows += measure_shape(name, table[name], batch, dtype, device, args.tf32, reps, 1 if args.tiny else 3)
        r = rows[-3:]
        print(f"{name}: " + ", ".join(f"{x['kernel']} {x['speedup']:.2f}x call"
                                      + (f", {x['gpu_speedup']:.2f}x GPU" if x["gpu_speedup"] is not None else "")
                                      + f" ({x['TFLOPs']:.1f} TFLOP/s)" for x in r), flush=True)
    meta = {"device": device_name(device), "dtype": args.dtype, "batch": batch, "tf32": args.tf32,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **context(device)}
    md = markdown(rows, ceil, meta)
    print(md)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                       "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"].lower()).strip("-")
    stem = args.name or f"conv-kernels-{slug}-{args.dtype}" + ("-tiny" if args.tiny else "")
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "ceilings": ceil, "rows": rows}, f, indent=1, default=str)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md + "\n")
    print(f"# wrote {os.path.join(out_dir, stem)}.json/.md")
    tol = tolerance(dtype, args.tf32)
    bad = [r for r in rows if not r["max_rel_err"] <= tol]
    for r in bad:
        print(f"MISMATCH {r['shape']} {r['kernel']}: max rel err {r['max_rel_err']:.3g} > {tol:g}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
