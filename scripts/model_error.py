"""Where a model's fp32 error against the float64 oracle comes from.

One training forward and backward (random input and output gradient, BN parameters away
from their defaults) of a torchvision model in float64 on the CPU (the oracle), of the same
model in fp32 on DEVICE (eager PyTorch), and of the resfused model in fp32 on DEVICE with
each backend asked for. For the output, the input gradient and every parameter gradient,
in the order backward reaches them (from the output back to the input), it prints each
one's largest error relative to the oracle's largest value, eager's first, then each
backend's as a multiple of eager's: the first tensors where a backend's multiple jumps
name the layer where its error starts. Exit status 1 when some backend is above
--factor x eager on the output or the input gradient.

    python scripts/model_error.py --model densenet121 --device cuda --backends eager,cuda,triton
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _randomise_bns(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def _run(model, x, g, dtype, device, backend=None):
    import resfused

    xx = x.detach().to(device, dtype).clone().requires_grad_()
    if backend is None:
        out = model(xx)
    else:
        with resfused.use_backend(backend):
            out = model(xx)
    out.backward(g.to(device, dtype))
    grads = [p.grad for p in model.parameters()]
    return [out, xx.grad] + grads


def main(argv=None) -> int:
    import torchvision

    import resfused

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="eager,cuda,triton")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    ap.add_argument("--conv", choices=["auto", "library", "triton"], default="auto")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=40, help="tensors listed (the output, the input gradient, "
                    "then the parameter gradients from the output back)")
    args = ap.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(args.seed)
    ref = getattr(torchvision.models, args.model)(num_classes=10)
    _randomise_bns(ref)
    state = ref.state_dict()
    ref = ref.double().train()
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=torch.float64)
    g = torch.randn(args.batch, 10, dtype=torch.float64)
    names = ["output", "input grad"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    oracle = _run(ref, x, g, torch.float64, "cpu")
    eager = getattr(torchvision.models, args.model)(num_classes=10)
    eager.load_state_dict(state)
    eager = eager.to(args.device, memory_format=fmt).train()
    results = {"eager": _run(eager, x.contiguous(memory_format=fmt), g, torch.float32, args.device)}
    for backend in args.backends.split(","):
        mine = getattr(resfused.models, args.model)(num_classes=10)
        mine.load_state_dict(state)
        mine = mine.to(args.device, memory_format=fmt).train()
        try:
            with resfused.use_conv(args.conv):
                results[backend] = _run(mine, x.contiguous(memory_format=fmt), g, torch.float32, args.device,
                                        backend)
        except Exception as e:  # a backend this machine cannot run: say so, go on
            print(f"{backend}: {type(e).__name__}: {str(e).splitlines()[0]}")
    order = [0, 1] + list(range(len(names) - 1, 1, -1))  # backward reaches the last parameters first
    cols = list(results)

    def rel(t, o):
        """(largest error, root-mean-square error), each over the largest oracle value."""
        o = o.detach()
        top = float(o.abs().max())
        err = (t.detach().double().cpu() - o).abs()
        if top == 0 or err.numel() == 0:
            return 0.0, 0.0
        return float(err.max()) / top, float(err.square().mean().sqrt()) / top

    def ratio(a, b):
        return a / b if b > 0 else (1.0 if a == 0 else float("inf"))

    print(f"{args.model}, batch {args.batch} at {args.size}x{args.size}, fp32 {args.layout} on {args.device} "
          f"(use_conv={args.conv!r}): error / largest oracle value, largest and root-mean-square; backends as "
          "multiples of eager's (a large max ratio beside an rms ratio near 1: a few outliers, such as a relu mask "
          "or a max-pool choice that rounding flipped)")
    print(f"{'tensor':56s} {'eager max':>10s} {'eager rms':>10s} " + " ".join(f"{c + ' max/rms':>16s}"
                                                                          for c in cols[1:]))
    bad = 0
    for k, i in enumerate(order):
        e_max, e_rms = rel(results["eager"][i], oracle[i])
        got = [rel(results[c][i], oracle[i]) for c in cols[1:]]
        ratios = [ratio(m, e_max) for m, _ in got]
        if k < args.show or any(r > args.factor for r in ratios) and k < 4 * args.show:
            print(f"{names[i][:56]:56s} {e_max:10.3g} {e_rms:10.3g} "
                  + " ".join(f"{r:8.2f}/{ratio(rms, e_rms):<7.2f}" for r, (_, rms) in zip(ratios, got)))
        if i < 2:
            bad += sum(r > args.factor for r in ratios)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
