"""Ahead-of-time compile check of every Triton kernel in ``resfused.triton``.

``compile_all(arch)`` compiles each kernel, for each dtype and constexpr variant the
launchers can use (``all_variants()``: ``bn_act.variants()`` and ``conv.variants()``, the
registries the launchers draw their constexprs from), for ``GPUTarget("cuda", arch, 32)``. No GPU is needed: Triton
produces PTX and a cubin on the CPU. Registers and spills come from ``ptxas -v`` run on
the produced PTX (the compiled kernel's ``n_regs``/``n_spills`` are only filled in when a
driver loads the binary); shared memory from the compiled kernel's metadata.

Must run in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces the
kernels by Python functions that cannot be compiled)::

    python -m resfused.triton.aot 80 90          # prints a table
    python -m resfused.triton.aot 80 90 --json   # one JSON list on stdout
    python -m resfused.triton.aot 90 --only conv # the kernels whose name starts with "conv"

Written against triton 3.2 ... 3.8: the ``ASTSource`` argument forms and the location
of ``ptxas`` changed between versions and are probed, not assumed.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional

import torch

_TT_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _arg_names(fn) -> List[str]:
    names = getattr(fn, "arg_names", None)
    if names is None:  # very old/new JITFunction layouts
        names = [p.name for p in fn.params]
    return list(names)


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: what ``compile_all`` builds and reports."""
    name: str
    fn: object
    dtype: torch.dtype  # operand dtype (data pointers); accumulation dtype for finalize kernels
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: Optional[int]
    data_ptrs: FrozenSet[str]  # pointer args in ``dtype``; the others in ``acc``
    acc: torch.dtype
    unspecialized: FrozenSet[str]  # int args the JIT does not specialise
    aligned: bool  # size args marked divisible by 16

    @property
    def label(self) -> str:
        return variant_label(self.dtype, self.constexprs, self.aligned)


def all_variants() -> List[Variant]:
    """Every kernel variant the launchers of ``bn_act`` and ``conv`` can launch."""
    from . import bn_act, conv

    out = []
    for spec, dt, cx in bn_act.variants():
        for al in (False, True):
            out.append(Variant(spec.name, spec.fn, dt, dict(cx), spec.num_warps, None, bn_act.DATA_PTRS,
                               bn_act.acc_dtype(dt), frozenset(bn_act.FLAG_ARGS), al))
    for kernel, dt, config, mode, tf, al in conv.variants():
        cfg = conv.CONFIGS[kernel][conv.width_key(dt)][config]
        out.append(Variant("conv_" + kernel, conv.KERNELS[kernel].fn, dt,
                           conv.variant_constexprs(kernel, dt, config, mode, tf), cfg.num_warps, cfg.num_stages,
                           conv.DATA_PTRS, torch.float32, frozenset(conv.UNSPECIALIZED), al))
    return out


def _float_args() -> FrozenSet[str]:
    from . import bn_act

    return bn_act.FLOAT_ARGS


def signature_of(v: Variant) -> Dict[str, str]:
    """Triton signature {arg name: type} for one variant (the types the JIT infers
    from the launchers' arguments: data tensors in the variant's dtype, per-channel
    tensors and workspaces in its accumulation dtype, float32 for the float scalars, int32
    for the others)."""
    sig = {}
    for name in _arg_names(v.fn):
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + _TT_TYPES[v.dtype if name in v.data_ptrs else v.acc]
        elif name in _float_args():
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


# ---- version probing -------------------------------------------------------------------


def _attrs_descriptor_cls():
    try:
        from triton.backends.compiler import AttrsDescriptor  # triton <= 3.2
        return AttrsDescriptor
    except Exception:
        return None


def _make_sources(fn, sig: Dict[str, str], constexprs: Dict[str, object], aligned: bool,
                  unspecialized_extra: FrozenSet[str]):
    """Candidate ASTSource objects, most likely form for this triton first. Pointers are
    16-byte aligned (as torch allocations are); with ``aligned`` the size arguments the JIT
    specialises (those not in the kernel's ``do_not_specialize``) are also marked
    divisible by 16, the specialisation the JIT makes for such sizes."""
    from triton.compiler import ASTSource

    names = _arg_names(fn)
    ptr_idx = [i for i, n in enumerate(names) if sig[n].startswith("*")]
    if aligned:
        unspecialized = set(getattr(fn, "do_not_specialize", None) or ()) | set(unspecialized_extra)
        ptr_idx += [i for i, n in enumerate(names)
                    if sig[n] == "i32" and n not in unspecialized and i not in unspecialized]
    cands = []
    attrs_cls = _attrs_descriptor_cls()
    if attrs_cls is not None:
        # triton 3.2: constants keyed by name, attrs an AttrsDescriptor
        def legacy(hints=True):
            attrs = None
            if hints:
                attrs = attrs_cls.from_hints({i: 16 for i in ptr_idx})
            return ASTSource(fn, dict(sig), dict(constexprs), attrs)

        cands += [("3.2-hints", lambda: legacy(True)), ("3.2-plain", lambda: legacy(False))]
    # triton >= 3.3: constexprs keyed by (index,) paths, attrs {(index,): [[name, value]]}
    idx_cx = {(names.index(k),): v for k, v in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in ptr_idx}
    cands += [("3.3+-hints", lambda: ASTSource(fn, dict(sig), dict(idx_cx), attrs)),
              ("3.3+-plain", lambda: ASTSource(fn, dict(sig), dict(idx_cx))),
              ("names", lambda: ASTSource(fn, dict(sig), dict(constexprs)))]
    return cands


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    try:
        return GPUTarget("cuda", arch, 32)
    except TypeError:  # keyword-only dataclass in some future version
        return GPUTarget(backend="cuda", arch=arch, warp_size=32)


_FORM = {}  # the ASTSource form that worked, reused for the remaining kernels


def _compile(v: Variant, arch: int):
    import triton

    if not hasattr(v.fn, "arg_names") or type(v.fn).__name__ == "InterpretedFunction":
        raise RuntimeError(
            "resfused.triton.aot: kernels were decorated under TRITON_INTERPRET=1 and cannot be compiled; "
            "run the AOT check in a process without it (python -m resfused.triton.aot 80 90)")
    sig = signature_of(v)
    cands = _make_sources(v.fn, sig, v.constexprs, v.aligned, v.unspecialized)
    if "form" in _FORM:
        cands.sort(key=lambda c: c[0] != _FORM["form"])
    options = {"num_warps": v.num_warps}
    if v.num_stages is not None:
        options["num_stages"] = v.num_stages
    errors = []
    for form, make in cands:
        try:
            src = make()
            kernel = triton.compile(src, target=_target(arch), options=options)
        except Exception as exc:  # try the next form; report all if none works
            errors.append(f"{form}: {type(exc).__name__}: {str(exc).strip()[:2000]}")
            continue
        _FORM["form"] = form
        return kernel, form
    raise RuntimeError(f"resfused.triton.aot: {v.name} {v.label} failed to compile for sm_{arch}:\n"
                       + "\n".join(errors))


# ---- register / spill report -----------------------------------------------------------


def _ptxas_path() -> str:
    cands = []
    try:
        from triton import knobs  # triton >= 3.4

        cands.append(knobs.nvidia.ptxas.path)
    except Exception:
        pass
    try:
        from triton.backends.nvidia import compiler as nvc

        if hasattr(nvc, "_path_to_binary"):
            cands.append(nvc._path_to_binary("ptxas")[0])
        if hasattr(nvc, "get_ptxas"):
            cands.append(nvc.get_ptxas(90).path)
    except Exception:
        pass
    try:
        import triton.backends.nvidia as nvpkg

        cands.append(os.path.join(os.path.dirname(nvpkg.__file__), "bin", "ptxas"))
    except Exception:
        pass
    cands += [os.environ.get("TRITON_PTXAS_PATH", ""), shutil.which("ptxas") or ""]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise RuntimeError("resfused.triton.aot: no ptxas found (triton's bundled one, TRITON_PTXAS_PATH or PATH)")


def _ptxas_extra_flags() -> List[str]:
    """Flags triton's own ptxas call adds that change register allocation."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend

        if "regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin):
            return ["--regAllocOptLevel=2"]
    except Exception:
        pass
    return []


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_resources(ptx: str) -> Dict[str, int]:
    m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if not m:
        raise RuntimeError("resfused.triton.aot: no .target line in the PTX")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas_path(), "-v", *_ptxas_extra_flags(), f"--gpu-name={m.group(1)}", src, "-o",
               os.path.join(d, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"resfused.triton.aot: ptxas failed: {' '.join(cmd)}\n{log}")
    regs, frame = _RE_REGS.search(log), _RE_FRAME.search(log)
    if not regs or not frame:
        raise RuntimeError(f"resfused.triton.aot: cannot parse ptxas -v output:\n{log}")
    return {"n_regs": int(regs.group(1)), "stack": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}


def _meta(kernel, key: str):
    md = getattr(kernel, "metadata", None)
    if md is None:
        return None
    if isinstance(md, dict):
        return md.get(key)
    return getattr(md, key, None)


# ---- entry points ------------------------------------------------------------------------


def variant_label(dtype: torch.dtype, constexprs: Dict[str, object], aligned: bool = False) -> str:
    return " ".join([_TT_TYPES[dtype]] + [f"{k}={v}" for k, v in constexprs.items()] + (["sizes%16"] if aligned else []))


def compile_all(arch: int, only: Optional[str] = None) -> List[Dict]:
    """Compile every kernel variant (``all_variants()``; with ``only``, those whose name
    starts with it) for sm_<arch>; one dict per variant: name, variant, arch, num_warps,
    n_regs, n_spills (spill store + load bytes), stack (bytes of local stack frame),
    shared (bytes of shared memory), form (the ASTSource form this triton accepted).

    bn_act kernels are compiled with generic sizes and once more with every size
    argument marked divisible by 16 (label suffix ``sizes%16``): the JIT specialises on
    that and then vectorises the loads, which changes register use. conv kernels are
    compiled in the alignments their launchers use them in (``conv.variants()``)."""
    if _interpreting():
        raise RuntimeError("resfused.triton.aot.compile_all: TRITON_INTERPRET is set; run it in a process "
                           "without it (python -m resfused.triton.aot 80 90)")
    rows = []
    for v in all_variants():
        if only and not v.name.startswith(only):
            continue
        kernel, form = _compile(v, arch)
        asm = getattr(kernel, "asm", {}) or {}
        if "ptx" not in asm or "cubin" not in asm:
            raise RuntimeError(f"resfused.triton.aot: {v.name} produced no ptx/cubin for sm_{arch}")
        res = ptxas_resources(asm["ptx"])
        rows.append({
            "name": v.name,
            "variant": v.label,
            "arch": arch,
            "num_warps": v.num_warps,
            "n_regs": res["n_regs"],
            "n_spills": res["spill_stores"] + res["spill_loads"],
            "stack": res["stack"],
            "shared": int(_meta(kernel, "shared") or 0),
            "form": form,
        })
    return rows


def format_table(rows: List[Dict]) -> str:
    head = ("arch", "name", "variant", "warps", "regs", "spills", "stack", "shared")
    body = [(f"sm_{r['arch']}", r["name"], r["variant"], str(r["num_warps"]), str(r["n_regs"]),
             str(r["n_spills"]), str(r["stack"]), str(r["shared"])) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda t: "  ".join(s.ljust(w) for s, w in zip(t, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(t) for t in body])


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m resfused.triton.aot",
                                     description="Compile every Triton kernel variant ahead of time for the given "
                                                 "CUDA archs (no GPU needed) and report registers, spills and "
                                                 "shared memory.")
    parser.add_argument("archs", nargs="*", type=int, metavar="ARCH",
                        help="compute capabilities as numbers, e.g. 80 90 (default: 80 90)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--only", metavar="PREFIX", help="only the kernels whose name starts with PREFIX")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in args.archs if a < 50]
    if bad:
        parser.error(f"ARCH must be a compute capability such as 80 or 90, got {bad[0]}")
    rows = []
    for arch in args.archs or [80, 90]:
        rows += compile_all(arch, args.only)
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
