"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, without spills.

No GPU needed: ``resfused.triton.aot`` compiles each (kernel, dtype, constexpr) variant
the launchers can use for ``GPUTarget("cuda", arch, 32)``. It runs in a child process
without ``TRITON_INTERPRET`` (conftest sets it for this process on GPU-less machines,
and the interpreter replaces the kernels by plain Python functions).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)


def _child_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def aot_rows():
    # one child per arch, run side by side
    procs = {
        arch: subprocess.Popen([sys.executable, "-m", "resfused.triton.aot", str(arch), "--json"], cwd=ROOT,
                               env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arch in ARCHS
    }
    rows = {}
    for arch, p in procs.items():
        out, err = p.communicate(timeout=1800)
        assert p.returncode == 0, f"AOT compile for sm_{arch} failed:\n{err[-8000:]}"
        rows[arch] = json.loads(out.strip().splitlines()[-1])
    return rows


def _expected():
    from resfused.triton import aot

    return {(v.name, v.label) for v in aot.all_variants()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_without_spills(aot_rows, arch):
    from resfused.triton import aot

    rows = aot_rows[arch]
    print(f"\nTriton AOT, sm_{arch}:\n" + aot.format_table(rows))
    got = {(r["name"], r["variant"]) for r in rows}
    assert got == _expected(), f"missing: {_expected() - got}, unexpected: {got - _expected()}"
    assert all(r["arch"] == arch for r in rows)
    spilled = [(r["name"], r["variant"], r["n_spills"]) for r in rows if r["n_spills"] != 0]
    assert not spilled, f"register spills on sm_{arch}: {spilled}"
    for r in rows:
        assert 0 < r["n_regs"] <= 255, r
        # bn_act: under the static-launch limit; conv GEMM tiles: under sm_80's 163 KiB per block
        assert r["shared"] <= (163 if r["name"].startswith("conv_") else 48) * 1024, r


@pytest.mark.parametrize("module", ["bn_act", "conv"])
def test_variants_cover_every_kernel(module):
    """Each kernel function of a Triton module is in the registry the launchers and aot share."""
    import importlib

    import triton

    mod = importlib.import_module(f"resfused.triton.{module}")

    kinds = [triton.runtime.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        kinds.append(InterpretedFunction)
    except ImportError:
        pass
    registered = {id(s.fn) for s in mod.KERNELS.values()}
    jitted = [name for name, obj in vars(mod).items()
              if isinstance(obj, tuple(kinds)) and name not in mod.JIT_HELPERS]
    assert jitted, f"found no Triton kernels in {module}"
    missing = [n for n in jitted if id(getattr(mod, n)) not in registered]
    assert not missing, f"kernels not in {module}.KERNELS (so not AOT-checked): {missing}"
    from resfused.triton import aot

    names = {v.name for v in aot.all_variants()}
    prefix = "conv_" if module == "conv" else ""
    assert {prefix + k for k in mod.KERNELS} <= names


@pytest.mark.parametrize("argv", [["sm90"], ["8"], ["90", "--only"], ["--arch", "90"]])
def test_aot_cli_rejects_bad_arguments(argv, capsys):
    """A bad argument gets argparse's one-line error and exit status 2 before anything compiles."""
    from resfused.triton import aot

    with pytest.raises(SystemExit) as exc:
        aot.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "usage: python -m resfused.triton.aot" in err
