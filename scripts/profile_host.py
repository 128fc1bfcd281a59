"""Where a fused call's time goes: per case and provider, the wall time of one call, the
time until the host returns from it (equal to the wall time: the call is host-bound), and
torch.profiler's table of the busiest ops and kernels.

    python scripts/profile_host.py [--device cuda] [--tiny] > OUT/profile.txt

The cases are the benchmark's own (resfused.bench workloads): on CUDA the quick preset's
join and BN-ReLU ops (bf16, channels_last, 64x256x56x56), the forward apply pass in NCHW and the stage-2 Bottleneck
(batch 64), eager beside resfused's backends; ``--tiny`` runs toy shapes (any device)."""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from resfused.bench import workloads as W
from resfused.bench.cases import Case, block_channels, block_params


def cases(tiny: bool):
    op = (2, 8, 4, 4) if tiny else (64, 256, 56, 56)
    variant = "tiny" if tiny else "stage2"
    hw = block_params("bottleneck", variant)["hw"]
    blk = (2 if tiny else 64, block_channels("bottleneck", variant), hw, hw)
    dt = "fp32" if tiny else "bf16"
    ops = ["eager", "resfused[cuda]", "resfused[triton]", "resfused[cpu]"]
    return [
        (Case("op", "join", "fwd_bwd", dt, "channels_last", op), ops),
        (Case("op", "bn_relu", "fwd_bwd", dt, "channels_last", op), ops),
        (Case("op", "apply", "fwd", dt, "nchw", op), ops),
        (Case("block", "bottleneck", "fwd_bwd", dt, "channels_last", blk, variant=variant),
         ["eager_cl"] + ops[1:] + ["resfused[tconv]"]),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy shapes")
    p.add_argument("--rows", type=int, default=14, help="rows of each profiler table")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for case, providers in cases(args.tiny):
        shared = W.make_shared(case, dev)
        for prov in providers:
            try:
                inst = W.make_instance(case, prov, shared, dev)
                for _ in range(3):
                    inst.run()
            except Exception as exc:  # a backend this machine lacks
                print(f"# {prov}: skipped ({type(exc).__name__}: {str(exc)[:160]})")
                continue
            sync()
            n = 10
            t = time.perf_counter()
            for _ in range(n):
                inst.run()
            host = (time.perf_counter() - t) / n
            sync()
            wall = (time.perf_counter() - t) / n
            with profile(activities=acts) as prof:
                for _ in range(3):
                    inst.run()
                sync()
            print(f"\n=== {case.level} {case.name} {case.dtype} {case.memory_format} {list(case.shape)} {prov}: "
                  f"wall {wall * 1e3:.3f} ms/call, host returns after {host * 1e3:.3f} ms/call (3 calls profiled)")
            sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
            inst.keep.clear()
            del inst


if __name__ == "__main__":
    main()
