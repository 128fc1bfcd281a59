"""``python -m resfused.info``: versions, what was built, and the backend each device uses."""
from __future__ import annotations

import json
import platform
import sys

import torch

from . import __version__
from ._backend import BACKENDS, default_backend, load_extension, select_backend, unavailable_reason


def collect() -> dict:
    ext, why = load_extension()
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # reported, never fatal
        triton_version = f"unavailable ({type(exc).__name__}: {exc})"
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    info = {
        "resfused": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": {
            "built": ext is not None,
            "reason": why or None,
            "torch_version_at_build": getattr(ext, "torch_version", None),
            "cuda_kernels": bool(getattr(ext, "with_cuda", False)),
            "cuda_archs": getattr(ext, "cuda_archs", None) or None,
            "cuda_version_at_build": getattr(ext, "cuda_version", None) or None,
        },
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {},
    }
    for dev in devices:
        entry = {"default": default_backend(dev), "available": {}}
        for name in BACKENDS:
            reason = unavailable_reason(name, dev)
            entry["available"][name] = True if not reason else reason
        try:
            entry["selected"] = select_backend(dev)
        except (RuntimeError, ValueError) as exc:  # (an unknown RESFUSED_BACKEND: ValueError)
            entry["selected"] = f"error: {exc}"
        info["backends"][dev.type] = entry
    from . import conv_select

    try:
        forced = conv_select.forced_conv()
    except ValueError as exc:
        forced = f"error: {exc}"
    tri = {dev.type: (unavailable_reason("triton", dev) or True) for dev in devices}
    info["convolutions"] = {
        "use_conv": forced,
        "triton_convs": {k: v if v is True else f"unavailable: {v}" for k, v in tri.items()},
        "autotune": conv_select.autotune_enabled(),
        "cache": conv_select.cache_path(),
        "cached_choices": len(conv_select.entries()),
    }
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    ext = info["extension"]
    print(f"resfused {info['resfused']}  python {info['python']}  torch {info['torch']} "
          f"(CUDA {info['torch_cuda']})  triton {info['triton']}")
    if ext["built"]:
        cuda = f"CUDA kernels for archs {ext['cuda_archs']} (CUDA {ext['cuda_version_at_build']})" \
            if ext["cuda_kernels"] else "no CUDA kernels"
        print(f"resfused._C: built against torch {ext['torch_version_at_build']}; CPU kernels; {cuda}")
    else:
        print(f"resfused._C: not built: {ext['reason']}")
    print(f"GPU: {info['gpu'] or 'none'}")
    for dev, entry in info["backends"].items():
        print(f"{dev}: uses {entry['selected']} (default {entry['default']})")
        for name, ok in entry["available"].items():
            print(f"    {name:7s} {'available' if ok is True else 'unavailable: ' + ok}")
    conv = info["convolutions"]
    print(f"convolutions of fused blocks: use_conv={conv['use_conv']} (auto: library, or on CUDA the faster of "
          f"library and Triton per shape; timing {'on' if conv['autotune'] else 'off'}); "
          f"{conv['cached_choices']} cached choices in {conv['cache']}")
    for dev, ok in conv["triton_convs"].items():
        print(f"    Triton convs on {dev}: {'available' if ok is True else ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
