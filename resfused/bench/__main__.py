"""``python -m resfused.bench`` (also the ``resfused-bench`` command): resfused against eager
PyTorch and its peers, measured side by side in one run.

    python -m resfused.bench --quick                  # < 2 min on a 2-core CPU (GPU: not yet timed)
    python -m resfused.bench                          # the thorough preset
    python -m resfused.bench --level op --provider 'resfused[cpu]' --dtype fp32,bf16
    python -m resfused.bench --quick --compare benchmarks/results/cpu-amd-epyc-2threads-quick.json
    python -m resfused.bench --list                   # the cases and providers, without running

Each case runs every provider that applies (the eager baseline always), taking turns in one
process. Per case and provider: median and spread of the time over repeats after warm-up
(CUDA events on a GPU, perf_counter on a CPU), throughput (GB/s and fraction of measured copy
bandwidth for ops, images/s otherwise), peak memory (CUDA), bytes saved for backward (any
device), and the max relative error against eager of the same run. Results: a table on
stdout, and JSON, CSV, markdown and PNG plots under --out, written when the run ends.

Exit status: 0 all measured and correct; 1 a resfused result beyond tolerance (or raising);
2 bad input, found before anything runs (nothing written); 3 --max-time ran out and 130
interrupted (Ctrl-C, SIGTERM): what was measured is written as <name>-incomplete.* with
"complete": false, never under the final name.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import signal
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import torch

from .cases import DTYPES, LEVELS, MODES, PRESETS, PROVIDERS, WORKLOADS, select_cases
from .runner import (REPO_ROOT, available_bytes, available_cores, case_providers, context, estimate_bytes,
                     run_case)
from . import report

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...``) and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse's API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="resfused-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--level", default=",".join(LEVELS), help=f"comma-separated levels: {', '.join(LEVELS)} (default: all)")
    p.add_argument("--provider", default=None,
                   help=f"comma-separated providers: {', '.join(PROVIDERS)} (default: every one that applies and can run; "
                        "compile is left out of --quick and off the CPU unless named; the eager baseline always runs)")
    p.add_argument("--dtype", default=None,
                   help=f"comma-separated dtypes: {', '.join(DTYPES)} (blocks and models: autocast to it; "
                        "default: the preset's, fp32 on CPU, mostly bf16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    p.add_argument("--quick", action="store_true", help="the quick preset (same as --preset quick)")
    p.add_argument("--preset", default=None, choices=PRESETS,
                   help="quick, full (the default: thorough) or tiny (toy shapes, for testing the tool)")
    p.add_argument("--case", default=None, help=f"comma-separated workloads to keep: {', '.join(WORKLOADS)}")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores available)")
    p.add_argument("--mode", default=None, help=f"comma-separated modes to keep: {', '.join(MODES)}")
    p.add_argument("--max-time", type=float, default=None,
                   help="stop starting new cases after this many seconds; the record is then written as "
                        "<name>-incomplete.* with \"complete\": false (exit 3)")
    p.add_argument("--batch", type=int, default=None, help="replace every case's batch size")
    p.add_argument("--out", default=None, help="directory for JSON/CSV/markdown/PNG (default: benchmarks/results "
                                               "in a source checkout)")
    p.add_argument("--name", default=None, help="file name stem (default: latest-<device>-<preset>)")
    p.add_argument("--compare", metavar="OLD.json", default=None, help="show the change against an earlier run")
    p.add_argument("--no-plot", action="store_true", help="do not draw PNG plots")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown (for the README)")
    p.add_argument("--list", action="store_true", help="list the cases and providers, run nothing")
    return p


def _split(parser, value: str, option: str, choices: Sequence[str]) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        parser.error(f"argument {option}: expected at least one of {', '.join(choices)}")
    for v in items:
        if v not in choices:
            parser.error(f"argument {option}: invalid choice {v!r} (choose from {', '.join(choices)})")
    return list(dict.fromkeys(items))


def _device(parser, value: Optional[str]) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        parser.error(f"argument --device: invalid choice {value!r} (choose from {', '.join(DEVICE_CHOICES)})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            parser.error(f"argument --device: {value!r} was requested but no CUDA device is available "
                         f"(torch {torch.__version__} is {build}); choose from cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {value!r} does not exist; this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s) (choose from cpu, cuda, "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _default_out() -> str:
    if os.path.isdir(os.path.join(REPO_ROOT, "benchmarks")):
        return os.path.join(REPO_ROOT, "benchmarks", "results")
    return os.path.join(os.getcwd(), "resfused-bench-results")


class Progress:
    """A tqdm bar on a terminal when tqdm is installed; else one line per case."""

    def __init__(self, total: int, stream=None):
        stream = sys.stderr if stream is None else stream
        self.total, self.done, self.stream = total, 0, stream
        self.bar = None
        self.start = time.perf_counter()
        if getattr(stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=stream, unit="case", dynamic_ncols=True)
            except Exception:  # not installed: the text indicator
                self.bar = None

    def begin(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(label[:60])
        else:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.done + 1}/{self.total} {elapsed:5.0f}s] {label}", file=self.stream, flush=True)

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary_line(row: dict) -> str:
    bits = [f"  {row['provider']:18s}"]
    if row.get("status") == "skipped":
        return bits[0] + f" skipped: {row.get('reason')}"
    if row.get("ms") is not None:
        bits.append(f"{row['ms']:9.3f} ms")
    if row.get("speedup") is not None:
        bits.append(f"{row['speedup']:.2f}x")
    for key, unit in (("saved_MiB", "MiB saved"), ("peak_MiB", "MiB peak")):
        if row.get(key) is not None:
            bits.append(f"{row[key]:.1f} {unit}")
    if row.get("max_batch") is not None:
        bits.append(f"max batch {row['max_batch']}")
    if row.get("max_rel_err") is not None:
        bits.append(f"max rel err {row['max_rel_err']:.1e}")
    if row.get("check_err") is not None and not row.get("baseline"):
        bits.append(f"checked {row['check_err']:.1e} / {row['tol']:.0e}")
    if row.get("status") not in (None, "ok"):
        bits.append(row["status"].upper())
    return "  ".join(bits)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # ---- every check before any work
    levels = _split(parser, args.level, "--level", LEVELS)
    dtypes = _split(parser, args.dtype, "--dtype", tuple(DTYPES)) if args.dtype else None
    explicit = _split(parser, args.provider, "--provider", PROVIDERS) if args.provider is not None else []
    names = _split(parser, args.case, "--case", WORKLOADS) if args.case else None
    modes = _split(parser, args.mode, "--mode", MODES) if args.mode else None
    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"argument --quick: conflicts with --preset {args.preset}")
    preset = "quick" if args.quick else (args.preset or "full")
    if args.max_time is not None and not (args.max_time > 0 and math.isfinite(args.max_time)):
        parser.error(f"argument --max-time: must be a positive number of seconds, got {args.max_time:g}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"argument --batch: must be a positive integer, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"argument --threads: must be a positive integer, got {args.threads}")
    device = _device(parser, args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or available_cores())
    else:  # the timing events, Triton launches and peak-memory counters use the current device
        torch.cuda.set_device(device)
    from .._backend import unavailable_reason
    from .workloads import resfused_backend

    def cannot_run(q: str) -> str:
        backend = "triton" if q == "resfused[tconv]" else resfused_backend(q)
        return unavailable_reason(backend, device) if backend and backend != "auto" else ""

    for p in explicit:
        why = cannot_run(p)
        if why:
            runnable = [q for q in PROVIDERS if not cannot_run(q)]
            parser.error(f"argument --provider: {p} cannot run on {device.type}: {why} "
                         f"(choose from {', '.join(runnable)})")
    providers = explicit or list(PROVIDERS)
    cases = select_cases(preset, device.type, levels, dtypes, names, args.batch)
    if modes:
        cases = [c for c in cases if c.mode in modes]
    if not cases:
        parser.error(f"no case of preset {preset} on {device.type} matches --level {','.join(levels)}"
                     + (f" --case {','.join(names)}" if names else "") + (f" --mode {','.join(modes)}" if modes else ""))
    old = None
    if args.compare:
        try:
            old = report.load_record(args.compare)
        except ValueError as exc:
            parser.error(f"argument --compare: {exc}")
    out_dir = os.path.abspath(args.out or _default_out())
    stem = os.path.join(out_dir, args.name or f"latest-{device.type}-{preset}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(prefix=".probe-", dir=out_dir)  # a real write: os.access trusts root
        probe.close()
    except OSError as exc:
        parser.error(f"argument --out: cannot write to {out_dir} ({exc.strerror or exc})")
    for suffix in ("", "-incomplete"):
        for ext in (".json", ".csv", ".md"):
            if os.path.isdir(stem + suffix + ext):
                parser.error(f"argument --name: {stem + suffix + ext} is a directory; choose another --name or --out")
    avail = available_bytes(device)
    if avail is not None:
        for case in cases:
            need = estimate_bytes(case)
            if need > avail:
                parser.error(f"case {case.label} needs at least {need / 2**30:.1f} GiB but {device} has "
                             f"{avail / 2**30:.1f} GiB available; choose a smaller --batch, --quick or fewer cases")
    plan = [(case,) + tuple(case_providers(case, providers, device, preset, explicit)) for case in cases]
    unused = [p for p in explicit if not any(p in run or p in skipped for _, run, skipped in plan)]
    if unused:
        parser.error(f"argument --provider: {', '.join(unused)} applies to none of the selected cases "
                     f"({', '.join(c.label for c in cases[:4])}{', ...' if len(cases) > 4 else ''})")
    if args.list:
        for case, run, skipped in plan:
            print(f"{case.label}: {', '.join(run)}" + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
        return 0

    # ---- the run
    ctx = context(device)
    print(f"# resfused benchmark, preset {preset}, on {ctx['device']}: torch {ctx['torch']}, triton {ctx['triton']}, "
          f"CUDA {ctx['cuda']}, commit {ctx['commit']}, {len(cases)} cases", file=sys.stderr, flush=True)
    reasons = {}
    for _, _, skipped in plan:
        for p, why in skipped.items():
            reasons.setdefault((p, why), None)
    for p, why in reasons:
        print(f"# {p} skipped: {why}", file=sys.stderr)
    t0 = time.perf_counter()
    progress = Progress(len(plan))
    results, failures = [], []
    interrupted = None
    previous_term = _sigterm_interrupts()
    try:
        for case, run, skipped in plan:
            if args.max_time is not None and time.perf_counter() - t0 > args.max_time:
                interrupted = f"the time budget (--max-time {args.max_time:g} s) ran out"
                break
            progress.begin(case.label)
            res = run_case(case, run, skipped, device, progress.log)
            for row in res.rows:
                if row["status"] != "skipped" or row["provider"] in run:
                    progress.log(_summary_line(row))
            results += res.rows
            failures += res.failures
            progress.step()
    except KeyboardInterrupt:
        interrupted = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        progress.close()
    wall = time.perf_counter() - t0
    done = {r["case"] for r in results}
    record = {
        "format": report.RECORD_FORMAT,
        "complete": interrupted is None,
        "passed": not failures,
        "context": ctx,
        "config": {"preset": preset, "levels": levels, "providers": explicit or "default", "dtypes": dtypes or "preset",
                   "modes": modes or "preset", "device": str(device), "batch": args.batch,
                   "cases": [c.key for c in cases], "argv": list(sys.argv[1:] if argv is None else argv)},
        "wall_s": round(wall, 1),
        "failures": failures,
        "results": results,
    }
    if interrupted:
        # Never under the final name: a partial run is kept, marked, beside it.
        record["incomplete_reason"] = interrupted
        record["cases_not_run"] = [c.key for c in cases if c.key not in done]
        stem += "-incomplete"
    paths = report.write_record(record, stem)
    if not interrupted:  # a whole run replaces what an interrupted one left under this name
        for leftover in glob.glob(glob.escape(stem) + "-incomplete.*") + glob.glob(glob.escape(stem) + "-incomplete-*.png"):
            os.unlink(leftover)
    if not args.no_plot and results:
        pngs, why = report.plot(record, stem)
        paths += pngs
        if why:
            print(f"# {why}", file=sys.stderr)
    if results:
        print(report.report_text(record, markdown=args.markdown))
    if old is not None and results:
        print()
        print(report.compare(old, record, markdown=args.markdown))
    print(f"\n# {len(done)} of {len(cases)} cases in {wall:.0f} s; wrote " + ", ".join(os.path.relpath(p) for p in paths))
    if interrupted:
        print(f"INCOMPLETE RUN: {interrupted} after {len(done)} of {len(cases)} cases; the record is marked "
              f'"complete": false and named {os.path.basename(stem)}.*', file=sys.stderr)
    if failures:
        bar = "!" * 78
        print(f"\n{bar}\nCORRECTNESS CHECK FAILED: {len(failures)} resfused result(s) do not match eager PyTorch\n"
              + "\n".join(f"  - {f}" for f in failures) + f"\n{bar}", file=sys.stderr)
        return 1
    return 130 if interrupted == "interrupted" else (3 if interrupted else 0)


def _sigterm_interrupts():
    """SIGTERM (``timeout``, a job scheduler) ends the run like Ctrl-C: the cases measured
    so far are written, marked incomplete. Returns the previous handler."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return signal.getsignal(signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
