"""Build resfused and its one extension, ``resfused._C``.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda) are built
whenever torch is a CUDA build and a CUDA toolkit is found, even on a machine
without a GPU. Knobs (environment variables):

  TORCH_CUDA_ARCH_LIST       archs to build for (default "8.0;9.0")
  RESFUSED_SKIP_CUDA_BUILD=1 build the CPU kernels only
  CUDA_HOME                  the CUDA toolkit to use (must hold bin/nvcc,
                             include/cuda_runtime.h and lib64/libcudart.so)
  MAX_JOBS                   parallel compile jobs (ninja; also caps nvcc --threads,
                             the archs compiled side by side)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _say(msg):
    print(f"[resfused setup] {msg}", file=sys.stderr)


def _is_cuda_home(path):
    """A usable toolkit has nvcc, the runtime headers and the runtime library."""
    if not path:
        return False
    libs = [os.path.join(path, d, "libcudart.so") for d in ("lib64", "lib", "targets/x86_64-linux/lib",
                                                             "targets/sbsa-linux/lib")]
    return (os.path.isfile(os.path.join(path, "bin", "nvcc"))
            and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
            and any(os.path.isfile(p) for p in libs))


def choose_cuda_home():
    """The user's CUDA_HOME/CUDA_PATH first, then the standard locations, then the
    toolkit behind the nvcc on PATH (following symlinks and wrapper scripts)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((os.environ[var], f"${var}"))
    candidates.append(("/usr/local/cuda", "standard location"))
    candidates += [(p, "standard location") for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append((os.path.dirname(os.path.dirname(real)), f"nvcc on PATH ({nvcc})"))
        try:  # a wrapper script such as `exec /opt/cuda/bin/nvcc "$@"`
            with open(real, "r", errors="ignore") as f:
                head = f.read(4096)
            for tok in head.replace('"', " ").split():
                if tok.endswith("/bin/nvcc"):
                    candidates.append((os.path.dirname(os.path.dirname(tok)), f"wrapper {nvcc}"))
        except OSError:
            pass
    for path, why in candidates:
        if _is_cuda_home(path):
            return os.path.abspath(path), why
        if why.startswith("$"):
            _say(f"{why}={path} is not a usable CUDA toolkit (needs bin/nvcc, include/cuda_runtime.h, "
                 f"lib64/libcudart.so); looking elsewhere")
    return None, None


def build_ext_modules():
    import torch

    want_cuda = torch.version.cuda is not None and os.environ.get("RESFUSED_SKIP_CUDA_BUILD", "0") != "1"
    cuda_home = None
    if want_cuda:
        cuda_home, why = choose_cuda_home()
        if cuda_home is None:
            raise SystemExit(
                "[resfused setup] torch is a CUDA build but no CUDA toolkit was found (looked at $CUDA_HOME, "
                "$CUDA_PATH, /usr/local/cuda*, and the nvcc on PATH). Set CUDA_HOME to a toolkit holding "
                "bin/nvcc, include/cuda_runtime.h and lib64/libcudart.so, or set RESFUSED_SKIP_CUDA_BUILD=1 "
                "to build the CPU kernels only.")
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        _say(f"CUDA_HOME={cuda_home} ({why})")
    elif torch.version.cuda is None:
        _say("torch is a CPU-only build: building the CPU kernels only")
    else:
        _say("RESFUSED_SKIP_CUDA_BUILD=1: building the CPU kernels only")

    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define = [("RESFUSED_TORCH_VERSION", f'"{torch.__version__}"')]
    # torch picks the C++ standard its headers need; -fopenmp (compile only: libtorch
    # already loads its OpenMP runtime) makes at::parallel_for use the OpenMP pool.
    cxx = ["-O3", "-fopenmp"]
    if cuda_home is None:
        return [cpp_extension.CppExtension("resfused._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                                           define_macros=define, extra_compile_args={"cxx": cxx})], False
    if cpp_extension.CUDA_HOME != cuda_home:
        cpp_extension.CUDA_HOME = cuda_home
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    _say(f"building CUDA kernels for archs {archs}")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    define += [("RESFUSED_WITH_CUDA", None), ("RESFUSED_CUDA_ARCHS", f'"{archs}"'),
               ("RESFUSED_CUDA_VERSION", f'"{torch.version.cuda}"')]
    # One .cu translation unit holds every kernel: its per-arch compiles are most of the
    # build's wall time, and nvcc runs them side by side with --threads.
    n_archs = len([a for a in archs.replace(";", " ").split() if a])
    jobs = os.environ.get("MAX_JOBS", "")
    jobs = int(jobs) if jobs.isdigit() and int(jobs) > 0 else (os.cpu_count() or 1)
    threads = max(1, min(n_archs, jobs))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", f"--threads={threads}"]
    return [cpp_extension.CUDAExtension("resfused._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                                        define_macros=define, extra_compile_args={"cxx": cxx, "nvcc": nvcc})], True


def main():
    from torch.utils.cpp_extension import BuildExtension

    ext_modules, _ = build_ext_modules()
    setup(
        name="resfused",
        version="0.1.0",
        description="Fused residual-join and dense-concatenation kernels for ResNets and DenseNets",
        packages=find_packages(include=["resfused", "resfused.*"]),
        python_requires=">=3.9",
        install_requires=["torch>=2.4", "torchvision>=0.19"],
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        entry_points={"console_scripts": ["resfused-bench=resfused.bench.__main__:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
