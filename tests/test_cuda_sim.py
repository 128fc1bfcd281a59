"""The CUDA kernels of csrc/cuda/bn_act.cu, run on the CPU.

No GPU runs in CI, so the CUDA kernels would otherwise only be compiled. Here the kernel
section of bn_act.cu (between its "kernels begin" / "kernels end" markers, taken as it is
now) is compiled as host C++ against ``tests/cuda_sim/shim.h``, a simulated GPU: every
thread of a block is a cooperative context, ``__syncthreads`` and ``__shfl_down_sync``
behave as on the device (a barrier not reached by all threads, or a full-mask shuffle in a
partial warp, aborts), and every vector load and store is checked for alignment and for
staying inside its tensor. ``tests/cuda_sim/harness.cpp`` holds copies of the host
launchers' decisions (vector widths, block shapes, split counts, when a prefix view is read
in place) and a float64 reference of the op contract (``resfused/ops/eager.py``), and runs
the four ops (and the apply pass accumulating into a tensor with x's strides) over shapes,
dtypes (fp32, fp16, bf16, fp64), both layouts, misaligned operands, channel-prefix views
(channels_last and NCHW) and every combination of the optional operands, with few
resident blocks so that the grid-stride loops wrap.

What it cannot show: timing, the device's memory model, and launcher code that drifts from
its copy in the harness (a kernel whose signature changes fails to compile here, which
says to update the harness).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM = os.path.join(ROOT, "tests", "cuda_sim")
#: load_pack / store_pack as bn_act.cu writes them, and with the simulator's check in front
_ACCESSES = ("  return *reinterpret_cast<const Pack<T, V>*>(p + i);",
             "  *reinterpret_cast<Pack<T, V>*>(p + i) = v;")


def kernel_section() -> str:
    src = open(os.path.join(ROOT, "csrc", "cuda", "bn_act.cu")).read()
    begin = src.index("// ---- kernels begin")
    begin = src.index("\n", src.index("\n", begin) + 1) + 1  # after the two marker lines
    body = src[begin:src.index("// ---- kernels end")]
    for access in _ACCESSES:
        assert body.count(access) == 1, f"bn_act.cu no longer has {access.strip()!r}: update tests/test_cuda_sim.py"
        body = body.replace(access, "  sim_check_align(p + i, sizeof(Pack<T, V>));" + access)
    return body


def build(d, kernels: str) -> str:
    """The harness over ``kernels`` (a kernel section), built in directory d."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on this machine")
    from torch.utils.cpp_extension import include_paths

    (d / "kernels.inc").write_text(kernels)
    exe = d / "harness"
    done = subprocess.run([cxx, "-std=c++17", "-O2", *(f"-I{p}" for p in include_paths()), f"-I{d}", f"-I{SIM}",
                           os.path.join(SIM, "harness.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert done.returncode == 0, f"the CUDA kernels do not compile on the simulator:\n{done.stderr[-4000:]}"
    return str(exe)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_sim"), kernel_section())


@pytest.mark.parametrize("args", [("3", "0", "fixed"), ("120", "7", "rand"), ("80", "21", "randaligned")],
                         ids=["fixed-3-shapes", "random", "random-aligned"])
def test_cuda_kernels_on_the_simulator(harness, args):
    done = subprocess.run([harness, *args], capture_output=True, text=True, timeout=600)
    summary = [line for line in done.stdout.splitlines() if "cases" in line]
    assert done.returncode == 0 and summary and summary[-1].endswith("fails 0"), \
        f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    # the run reached the prefix-view and accumulating paths it is meant to cover
    assert all(f"{what} 0" not in summary[-1] for what in ("(prefix", "NCHW prefix", "accumulating")), summary[-1]


PLANTED = {
    # x read with the dense row stride instead of a prefix view's (channels_last elementwise)
    "prefix-row-stride": ("const int64_t xe0 = m * op.xs + c0, xe1 = xe0 + rstride * op.xs;",
                          "const int64_t xe0 = m * C + c0, xe1 = xe0 + rstride * C;", "rand"),
    # an NCHW view's image gap ignored in the flat elementwise kernel
    "nchw-image-stride": ("const int64_t xe0 = e0 + n * xgap, xe1 = e1 + n1 * xgap;",
                          "const int64_t xe0 = e0, xe1 = e1 + n1 * xgap;", "rand"),
    # the accumulated dx stored at the dense offsets instead of x's
    "accumulate-offset": ("store_pack<V>(dx, ACC ? xe : e, dxv);", "store_pack<V>(dx, e, dxv);", "randaligned"),
}


@pytest.mark.parametrize("plant", sorted(PLANTED))
def test_planted_kernel_bug_is_caught(tmp_path, plant):
    """The harness would see a wrong kernel."""
    right, wrong, mode = PLANTED[plant]
    body = kernel_section()
    assert body.count(right) == 1
    exe = build(tmp_path, body.replace(right, wrong))
    done = subprocess.run([exe, "40", "3", mode], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "FAIL" in done.stdout + done.stderr


#: The launch decisions tests/cuda_sim/harness.cpp copies from bn_act.cu's host side, as
#: they are written there (whitespace aside). A change to one of them in bn_act.cu fails
#: here until the harness's copy (and this list) follow.
LAUNCH_DECISIONS = (
    "if (!s.nchw && s.C % VN == 0 && all_aligned<T>(ptrs, VN))",
    "const int64_t xgap = s.xb - s.C * s.HW;",
    "const bool al = all_aligned<T>(ptrs, VV) && (xgap == 0 || (s.C * s.HW % VV == 0 && s.xb % VV == 0));",
    "const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(nvec, kThreads), resident_blocks(kernel, kThreads, "
    "dev)));",
    "const int64_t gy = std::max<int64_t>(1, std::min({ceil_div(M, bdy), std::max<int64_t>(1, target / gx), "
    "kMaxGridY}));",
    "gx = ceil_div(Cv, 32);",
    "bdx = static_cast<int>(ceil_div(Cv, gx));",
    "bdy = kThreads / bdx;",
    "int64_t S = std::max<int64_t>(1, ceil_div(target, C));",
    "S = std::min({S, std::max<int64_t>(1, ceil_div(nvc, int64_t(kThreads) * 8)), kMaxGridY});",
    "const int64_t by_fill = std::max<int64_t>(1, ceil_div(target, gx));",
    "const int64_t by_work = std::max<int64_t>(1, ceil_div(M, int64_t(bdy) * 8));",
    "const int V = (al && s.HW % VV == 0) ? VV : (aligned<T>(xp, VM) && s.HW % VM == 0) ? VM : 1;",
    "const bool vec = al && s.C % VV == 0;",
    "const int V = (s.HW % VV == 0 && s.xb % VV == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VV)) ? VV"
    " : (s.HW % VM == 0 && s.xb % VM == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VM)) ? VM : 1;",
    "const bool vec = s.C % VN == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VN);",
    "s.C % V == 0 && s.xs % V == 0 &&",  # x_in_place (the harness's read_x)
)


def test_harness_copies_the_launch_decisions():
    def flat(text: str) -> str:
        return "".join(text.split())

    src = open(os.path.join(ROOT, "csrc", "cuda", "bn_act.cu")).read()
    host = flat(src[src.index("// ---- kernels end"):])
    harness = flat(open(os.path.join(SIM, "harness.cpp")).read())
    for rule in LAUNCH_DECISIONS:
        assert flat(rule) in host, f"bn_act.cu no longer decides {rule!r}: update tests/cuda_sim/harness.cpp and this list"
        assert flat(rule) in harness, f"tests/cuda_sim/harness.cpp does not copy {rule!r} from bn_act.cu"
