"""The shell scripts (set-up, tests, benchmark, GPU check, CI) parse: a syntax error in
one that only runs on a GPU machine would otherwise surface there, minutes into the
machine's time."""
from __future__ import annotations

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh"))) + [os.path.join(ROOT, ".ci", "run")]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_script_parses(path):
    done = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_check_takes_the_arch_from_nvidia_smi(tmp_path):
    """The GPU check builds for the GPU's own arch: the compute capability nvidia-smi
    reports, when it looks like one, else the default list."""
    src = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    start = src.index('if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then')
    snippet = src[start:src.index("fi\n", start) + 3]
    for reported, want in (("9.0", "9.0"), ("8.0\n8.0", "8.0"), ("", ""), ("N/A", "")):
        fake = tmp_path / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\nprintf '{reported}\\n'\n")
        fake.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
        env["PATH"] = f"{tmp_path}:{env['PATH']}"
        done = subprocess.run(["bash", "-c", snippet + 'printf "%s" "${TORCH_CUDA_ARCH_LIST:-}"'],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0 and done.stdout == want, (reported, done.stdout, done.stderr)


def test_gpu_check_spends_its_gpu_steps_on_gpu_tests():
    """The GPU check's test steps select by -k; the CUDA simulator's tests have "cuda" in
    their names but are minutes of CPU work that CI runs: they must not be selected there."""
    import re
    import sys

    src = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    exprs = re.findall(r'^(?:want \S+ && )?gpu_tests \S+ "([^"]+)"', src, flags=re.M)
    assert exprs, "gpu_check.sh has no gpu_tests steps"
    for expr in exprs:
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               "-k", expr, "tests/test_cuda_sim.py"], cwd=ROOT, capture_output=True, text=True)
        assert "test_cuda_sim.py::" not in done.stdout, f"-k {expr!r} selects the simulator's tests"


def test_gpu_check_steps_select_what_runs():
    """GPU_CHECK_STEPS names the steps a GPU check runs (every step by default), so a
    second call on a machine still warm spends its budget on what the first did not reach;
    every step the script guards is in the default list."""
    import re

    src = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    start = src.index('STEPS=",${GPU_CHECK_STEPS:-')
    snippet = src[start:src.index("\n", src.index("want() {", start)) + 1]
    default = re.search(r'GPU_CHECK_STEPS:-([^}]+)\}', snippet).group(1).split(",")
    guarded = set(re.findall(r"\bwant ([a-z-]+)", src[src.index("\n", src.index("want() {")):]))
    assert guarded == set(default), (guarded, default)

    def runs(steps, step):
        env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_STEPS"}
        if steps is not None:
            env["GPU_CHECK_STEPS"] = steps
        done = subprocess.run(["bash", "-c", snippet + f"want {step} && echo yes || echo no"], capture_output=True,
                              text=True, env=env)
        return done.stdout.strip() == "yes"

    assert all(runs(None, step) for step in default)
    assert runs("compile-bench,profile", "profile") and runs("compile-bench,profile", "compile-bench")
    assert not runs("compile-bench,profile", "tests") and not runs("compile-bench", "bench")


def test_profile_host_runs_the_benchmark_cases():
    """The GPU check's host profile runs (toy shapes, on this machine's CPU): one table per
    case and provider that runs here, the eager baseline among them."""
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "profile_host.py"), "--tiny", "--device", "cpu",
                           "--rows", "3"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    heads = [line for line in done.stdout.splitlines() if line.startswith("=== ")]
    assert any(" eager: wall " in h for h in heads) and any(" eager_cl: wall " in h for h in heads), heads
    assert any("resfused[" in h for h in heads), heads
    assert all("host returns after" in h for h in heads)


def test_host_time_prints_its_table():
    """The host-time comparison runs (a few calls): a row per case (the join, a
    Bottleneck, a dense block) and variant, each with a forward and a forward + backward time."""
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "host_time.py"), "--rounds", "1",
                           "--calls", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and " µs |" in line]
    assert len(rows) == 9, done.stdout
    for variant in ("| eager |", "| resfused |", "| resfused, composites off |"):
        assert sum(variant in row for row in rows) == 3, done.stdout


def test_conv_sweep_times_each_mode_and_tile():
    """The Triton conv sweep (for the GPU check's diagnostics) runs a toy shape under the
    interpreter: the library conv's row, then one row per tile with a time per fused mode."""
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "conv_sweep.py"), "--device", "cpu",
                           "--shape", "tiny.conv2", "--batch", "2", "--reps", "1", "--tiles", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("tiny.conv2: library conv") for line in lines), lines
    tiles = [line for line in lines if line.strip().startswith("tile (")]
    assert len(tiles) == 1, lines
    for mode in ("plain", "stats", "prologue", "prologue_stats"):
        assert f" {mode} " in tiles[0] and "Error" not in tiles[0], tiles[0]


def test_model_error_lists_each_tensor():
    """The per-tensor error report runs on the CPU (resnet18 at a toy size): a row for the
    output, the input gradient and each parameter gradient it is asked to show."""
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "model_error.py"), "--model", "resnet18",
                           "--device", "cpu", "--backends", "eager,cpu", "--size", "32", "--show", "5"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("output", "input grad", "grad "))]
    assert [r.split()[0] for r in rows[:2]] == ["output", "input"] and len(rows) >= 5, done.stdout
