"""Host time per call of the fused join and Bottleneck against eager PyTorch, on the CPU.

    python scripts/host_time.py [--rounds 15] [--calls 300] [--backend cpu]

On a GPU a fused call is host-bound when its Python and launches take longer than its
kernels (benchmarks/results/gpu-check-nvidia-h200.md); on the CPU with tiny inputs
(one thread, [2, 64, 4, 4]) the kernels' own work is small and the time per call is
mostly that host cost. Three variants are timed in turn, ``--rounds`` rounds of
``--calls`` calls each, the best round counting (the machines are shared and noisy):
eager PyTorch (torchvision's Bottleneck and dense block; ``F.batch_norm`` + add + ReLU),
resfused as it runs, and resfused with the composites of ``resfused._C`` turned off (each
BN's sequence of ops, and each block's, called one by one from Python, as before they
existed). Prints a
Markdown table: forward, and forward + backward.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision

import resfused
from resfused.autograd import bn_act as autograd_bn_act
from resfused.functional import batch_norm_act

VARIANTS = ("eager", "resfused", "resfused, composites off")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--backend", default="cpu", help="resfused backend (default cpu)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c = 64
    x = torch.randn(2, c, 4, 4, requires_grad=True)
    r = torch.randn(2, c, 4, 4, requires_grad=True)
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    grads = {}  # a gradient of ones per output shape, made once

    def backward(out):
        g = grads.get(out.shape)
        if g is None:
            g = grads[out.shape] = torch.ones_like(out)
        out.backward(g)
    tv_block = torchvision.models.resnet.Bottleneck(64, 16)
    fused_block = resfused.FusedBottleneck(64, 16)
    fused_block.load_state_dict(tv_block.state_dict())
    tv_dense = torchvision.models.densenet._DenseBlock(6, c, 4, 32, 0.0)
    fused_dense = resfused.FusedDenseBlock(6, c, 4, 32, 0.0)
    fused_dense.load_state_dict(tv_dense.state_dict())
    cases = {
        "join relu(bn(x) + r)": (lambda: F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + r),
                                 lambda: batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r)),
        "Bottleneck(64, 16)": (lambda: tv_block(x), lambda: fused_block(x)),
        "dense block, 6 layers (64, 4, 32)": (lambda: tv_dense(x), lambda: fused_dense(x)),
    }
    composites = autograd_bn_act._COMPOSITE_BACKENDS

    def fused(fn, with_composites: bool):
        def run():
            autograd_bn_act._COMPOSITE_BACKENDS = composites if with_composites else ()
            try:
                with resfused.use_backend(args.backend):
                    return fn()
            finally:
                autograd_bn_act._COMPOSITE_BACKENDS = composites
        return run

    print(f"host time per call, CPU, 1 thread, input [2, 64, 4, 4] fp32, backend {args.backend}, "
          f"best of {args.rounds} rounds of {args.calls} calls")
    print("| case | variant | forward | forward + backward |")
    print("|---|---|---:|---:|")
    for name, (eager, ours) in cases.items():
        fns = {}
        for mode, step in (("fwd", lambda f: f), ("fwd+bwd", lambda f: lambda: backward(f()))):
            # (the backward runs inside the variant's setting too)
            for who, fn in zip(VARIANTS, (step(eager), fused(step(ours), True), fused(step(ours), False))):
                fns[(who, mode)] = fn
        best = dict.fromkeys(fns, float("inf"))
        for fn in fns.values():
            for _ in range(min(30, args.calls)):
                fn()
        for _ in range(args.rounds):
            for key, fn in fns.items():
                t = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                best[key] = min(best[key], (time.perf_counter() - t) / args.calls * 1e6)
        for who in VARIANTS:
            print(f"| {name} | {who} | {best[(who, 'fwd')]:.0f} µs | {best[(who, 'fwd+bwd')]:.0f} µs |")


if __name__ == "__main__":
    main()
