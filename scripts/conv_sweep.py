"""Where the Triton forward convolution's time goes: one ResNet-50 conv shape at a time,
the forward kernel timed in each fused mode (plain, the next BN's statistics in the
epilogue, the BN-ReLU prologue, both) under several tile configs, beside the library
convolution alone (and, for a 1x1, the same GEMM as ``torch.mm``). A mode far slower
than plain names the fusion that costs; a config far faster than the shipped one names
the tile to ship.

    python scripts/conv_sweep.py --shape stage1.conv1 --shape stage3.conv2   # CUDA, bf16, batch 128
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), each run whatever the launcher would
#: pick; the first is the shipped 16-bit "large" tile
SWEEP = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3)]
MODES = {"plain": dict(), "stats": dict(stats=True), "prologue": dict(prologue=True),
         "prologue_stats": dict(prologue=True, stats=True)}


def _time(fn, reps: int, dev: torch.device) -> float:
    """ms per call: CUDA events around ``reps`` back-to-back calls (CPU: perf_counter)."""
    import time

    for _ in range(3):
        fn()
    if dev.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize(dev)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize(dev)
    return begin.elapsed_time(end) / reps


def main(argv=None) -> int:
    from resfused.bench.conv import SHAPES, TINY
    from resfused.bench.runner import device_ms
    from resfused.triton import conv as tconv

    SHAPES = {**SHAPES, **TINY}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: stage1.conv1, stage3.conv2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiles", type=int, default=len(SWEEP), help="the first N tile configs of the sweep")
    ap.add_argument("--device", default="cuda", help="cuda (or cpu with TRITON_INTERPRET=1 and a tiny shape: a "
                    "check of this script, not a timing)")
    args = ap.parse_args(argv)
    dev, dt = torch.device(args.device), torch.bfloat16
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("conv_sweep: no CUDA device here", file=sys.stderr)
        return 2
    shipped = dict(tconv.CONFIGS["fwd"]["16"])
    print(f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU (Triton interpreter)'}, bf16, batch "
          f"{args.batch}, channels_last; ms per call: {args.reps} back-to-back calls between two events / the same "
          f"call replayed from a CUDA graph (the GPU's own time, no host work)")
    for name in args.shape or ["stage1.conv1", "stage3.conv2"]:
        cin, cout, k, stride, hw = SHAPES[name]
        x = torch.randn(args.batch, cin, hw, hw, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, k, k, device=dev, dtype=dt) / (cin * k * k) ** 0.5)
        aff = torch.stack([torch.rand(cin, device=dev) + 0.5, torch.randn(cin, device=dev) * 0.1])
        pad = k // 2
        flops = 2 * args.batch * cin * cout * k * k * (hw // stride) ** 2
        lib = _time(lambda: F.conv2d(x, w, None, stride, pad), args.reps, dev)
        lib_gpu, why = device_ms(lambda: F.conv2d(x, w, None, stride, pad), dev, args.reps)
        if lib_gpu is None:
            print(f"  (no GPU-only times: {why})")
        best = lib if lib_gpu is None else lib_gpu
        row = f"{name}: library conv {lib:.3f} ms" + (f", GPU {lib_gpu:.3f} ms" if lib_gpu is not None else "") + \
            f" ({flops / best / 1e9:.0f} TFLOP/s)"
        if k == 1 and stride == 1:
            a2, w2 = x.permute(0, 2, 3, 1).reshape(-1, cin), w.view(cout, cin).t()
            row += f", torch.mm {_time(lambda: torch.mm(a2, w2), args.reps, dev):.3f} ms"
        print(row)
        for cfg in SWEEP[:args.tiles]:
            tconv.CONFIGS["fwd"]["16"].update(large=tconv.TileConfig(*cfg), small=tconv.TileConfig(*cfg))
            cells = []
            for mode, kw in MODES.items():
                pro = aff if kw.get("prologue") else None
                bias = None if (pro is not None or kw.get("stats")) else torch.zeros(cout, device=dev)
                try:
                    def call():
                        return tconv.conv_fwd(x, w, [stride] * 2, [pad] * 2, [1, 1], prologue=pro, bias=bias,
                                              stats=bool(kw.get("stats")))

                    ms = _time(call, args.reps, dev)
                    gpu, _ = device_ms(call, dev, args.reps)
                    cells.append(f"{mode} {ms:.3f}" + (f"/{gpu:.3f}" if gpu is not None else ""))
                except Exception as e:  # a config that does not compile or fit: say so, go on
                    cells.append(f"{mode} {type(e).__name__}")
            print(f"  tile {cfg}: " + ", ".join(cells))
        tconv.CONFIGS["fwd"]["16"].update(shipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
