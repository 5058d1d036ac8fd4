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


@functools.lru_cache(maxsize=None)
def _module(family: str, device_id: int, defines: tuple):
    import cupy

    options = ("-std=c++17",) + tuple(f"-D{d}" for d in defines)
    return cupy.RawModule(code=expanded_source(family), options=options)


def module(family: str, defines: tuple = ()):
    """The compiled RawModule of one family on the current device (compiled on first use)."""
    import cupy

    return _module(family, cupy.cuda.runtime.getDevice(), tuple(defines))


def kernel(family: str, name: str, defines: tuple = ()):
    return module(family, defines).get_function(name)


def compile_all() -> list[str]:
    """Compile (or load from CuPy's disk cache) every family on the current device, so that no
    compile happens in the middle of timed work. Returns the family names."""
    names = families()
    for name in names:
        module(name)
    return names
