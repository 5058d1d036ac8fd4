"""Kernel sources (*.hip, one file per family) and their run-time compilation through cupy.RawModule.

Each family compiles once per process (and CuPy keeps the binary in its on-disk cache, keyed by the
source text, so a second process starts without compiling). `common.h` is pasted into the source
before compiling so that an edit to it changes the cache key too.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
_INCLUDE = re.compile(r'^\s*#include\s+"([A-Za-z0-9_]+\.h)"\s*$', re.M)


def families() -> list[str]:
    return sorted(p.stem for p in KERNEL_DIR.glob("*.hip"))


def expanded_source(family: str) -> str:
    """The family's source with our own headers (#include "x.h" from this folder) pasted in, once each."""
    seen: set[str] = set()

    def expand(text: str) -> str:
        def paste(m: re.Match) -> str:
            name = m.group(1)
            if name in seen:
                return ""
            seen.add(name)
            return expand((KERNEL_DIR / name).read_text())
        return _INCLUDE.sub(paste, text)

    path = KERNEL_DIR / f"{family}.hip"
    if not path.exists():
        raise ValueError(f"no kernel family {family!r}; known: {', '.join(families())}")
    return expand(path.read_text())


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# Families with wgmma (sm_90a) kernels: compiled for sm_90a on compute capability 9.0 devices.
WGMMA_FAMILIES = ("moe", "gemm")
# Dynamic shared memory a wgmma kernel gets beyond its tiles: align_1k (mma.h) moves the start up to a
# 1 KB boundary for the swizzle atoms.
WGMMA_SMEM_SLACK = 1024


def wgmma_available() -> bool:
    """True on an NVIDIA compute capability 9.0 GPU (H100/H200) unless GPTOSS_WGMMA=0: the families in
    WGMMA_FAMILIES then compile for sm_90a and their wgmma kernels exist."""
    import os

    if os.environ.get("GPTOSS_WGMMA", "1") == "0":
        return False
    try:
        import cupy
        from cupy.cuda import compiler
        device_id = cupy.cuda.runtime.getDevice()
    except Exception:  # no CuPy or no GPU
        return False
    if not hasattr(compiler, "_get_arch_for_options_for_nvrtc"):
        return False  # a CuPy whose arch choice _compile_sm90a cannot swap: stay on the sm_90 kernels
    return _compute_capability_of(device_id) == "90"


@functools.lru_cache(maxsize=None)
def _compute_capability_of(device_id: int) -> str:
    import cupy

    if getattr(cupy.cuda.runtime, "is_hip", False):
        return ""
    return cupy.cuda.Device(device_id).compute_capability


def _compile_sm90a(source: str, options: tuple):
    """cupy.RawModule compiled for sm_90a. CuPy picks -arch=sm_<cc> itself (no way to ask for the 'a'
    target); its choice comes from compiler._get_arch_for_options_for_nvrtc, which is swapped for the
    compile (its result is also part of CuPy's disk-cache key, so the sm_90a binary is cached apart)."""
    import cupy
    from cupy.cuda import compiler

    original = compiler._get_arch_for_options_for_nvrtc
    compiler._get_arch_for_options_for_nvrtc = lambda arch=None: ("-arch=sm_90a", "cubin")
    try:
        mod = cupy.RawModule(code=source, options=options)
        mod.compile()
    finally:
        compiler._get_arch_for_options_for_nvrtc = original
    return mod


@functools.lru_cache(maxsize=None)
def _module(family: str, device_id: int, defines: tuple, sm90a: bool):
    import cupy

    options = ("-std=c++17",) + tuple(f"-D{d}" for d in defines)
    if sm90a:  # the extra define also keeps CuPy's in-process module memo (keyed by code and options) apart
        return _compile_sm90a(expanded_source(family), options + ("-DGPTOSS_SM90A=1",))
    return cupy.RawModule(code=expanded_source(family), options=options)


def module(family: str, defines: tuple = ()):
    """The compiled RawModule of one family on the current device (compiled on first use)."""
    import cupy

    sm90a = family in WGMMA_FAMILIES and wgmma_available()
    return _module(family, cupy.cuda.runtime.getDevice(), tuple(defines), sm90a)


def kernel(family: str, name: str, defines: tuple = ()):
    return module(family, defines).get_function(name)


def compile_all() -> list[str]:
    """Compile (or load from CuPy's disk cache) every family on the current device, so that no
    compile happens in the middle of timed work. Returns the family names."""
    names = families()
    for name in names:
        module(name)
    return names
