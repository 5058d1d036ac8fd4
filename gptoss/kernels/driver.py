"""Functions of the CUDA driver library (libcuda) through ctypes, for what CuPy does not wrap: tensor maps
(gptoss/ops/tma.py) and launches with attributes (launch.py). Each returns a CUresult (0: success)."""
from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=None)
def libcuda():
    """The driver library, or None where there is none (no NVIDIA driver)."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def function(name: str, argtypes: tuple):
    """Driver function `name` with these ctypes argument types, returning its CUresult as an int; None
    where there is no driver or the driver lacks the function (an older CUDA)."""
    lib = libcuda()
    fn = getattr(lib, name, None) if lib is not None else None
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)
    return fn
