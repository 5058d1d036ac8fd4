"""Kernel launches with programmatic dependent launch (PDL, NVIDIA sm_90+): a CuPy RawKernel's function
launched through the driver's cuLaunchKernelEx (libcuda via ctypes: CuPy does not expose it) with the
launch attribute that lets it start while the kernel before it on the stream still runs. Its CTAs then
wait at GPTOSS_WAIT_PRIOR_GRID() (kernels/common.h: griddepcontrol.wait) until that kernel has completed
and its memory is visible, so a kernel launched this way must begin with that wait (every kernel of
gptoss/kernels does; tests/test_pdl_sources.py checks). Under stream capture the dependency becomes a
programmatic edge of the CUDA graph.

Arguments are passed as CuPy's RawKernel passes the kinds our ops use: a cupy.ndarray (anything with
.data.ptr) as its device pointer, a NumPy scalar (np.int32, np.float32, np.uint64, np.void of a
128-byte TensorMap, ...) as its bytes. A Python int/float/bool has no fixed C type and is refused with
TypeError (CuPy would pass an int as 8 bytes); so is anything else. Where the driver can tell the
kernel's parameter sizes (cuFuncGetParamInfo, CUDA 12.4+), the count and each size are checked too.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from . import driver

# CUlaunchAttributeID CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (cuda.h of CUDA 12 and 13);
# its value, CUlaunchAttributeValue::programmaticStreamSerializationAllowed, is an int at offset 0.
PROGRAMMATIC_STREAM_SERIALIZATION = 6
_CUDA_SUCCESS = 0
_CUDA_ERROR_INVALID_VALUE = 1


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: the id, 4 bytes of padding, a 64-byte union (8-byte aligned)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint64 * 8)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def _launch_fn():
    return driver.function("cuLaunchKernelEx",
                           (ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p))


def _param_info_fn():
    return driver.function("cuFuncGetParamInfo", (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                                                  ctypes.POINTER(ctypes.c_size_t)))


def available() -> bool:
    """True when the CUDA driver has cuLaunchKernelEx (CUDA 12.0+ drivers)."""
    return _launch_fn() is not None


def _error_name(code: int) -> str:
    lib = driver.libcuda()
    name = ctypes.c_char_p()
    if lib is not None and getattr(lib, "cuGetErrorName", None) is not None:
        if lib.cuGetErrorName(ctypes.c_int(code), ctypes.byref(name)) == _CUDA_SUCCESS and name.value:
            return name.value.decode()
    return f"CUresult {code}"


def argument_bytes(arg, index: int, kernel: str) -> bytes:
    """The bytes of one kernel argument as CuPy's RawKernel passes it (see the module docstring)."""
    if isinstance(arg, np.generic):  # NumPy scalars, np.void of a TensorMap included
        return arg.tobytes()
    if isinstance(arg, (bool, int, float, complex)):
        raise TypeError(f"kernel {kernel}: argument {index} is a Python {type(arg).__name__} ({arg!r}); pass a "
                        f"NumPy scalar of the kernel's parameter type (np.int32, np.float32, ...)")
    ptr = getattr(getattr(arg, "data", None), "ptr", None)
    if isinstance(ptr, int) and not isinstance(arg, np.ndarray):
        return ptr.to_bytes(8, "little")  # a cupy.ndarray: its device address (with its view offset)
    raise TypeError(f"kernel {kernel}: argument {index} of type {type(arg).__name__} cannot be passed; "
                    "expected a cupy.ndarray or a NumPy scalar")


_PADDING = [b"\0" * n for n in range(8)]


def pack(args, kernel: str) -> tuple[bytes, tuple[int, ...]]:
    """The arguments' bytes, each padded to a multiple of 8, end to end, and each argument's own size
    (argument_bytes, inlined for the common kinds: this runs on every launch)."""
    parts, sizes = [], []
    for i, a in enumerate(args):
        if isinstance(a, np.generic):
            b = a.tobytes()
        else:
            ptr = getattr(getattr(a, "data", None), "ptr", None)
            if type(ptr) is int and not isinstance(a, np.ndarray):
                b = ptr.to_bytes(8, "little")
            else:
                b = argument_bytes(a, i, kernel)  # raises for what cannot be passed
        n = len(b)
        sizes.append(n)
        parts.append(b if n % 8 == 0 else b + _PADDING[8 - n % 8])
    return b"".join(parts), tuple(sizes)


class ParameterBuffer:
    """The kernelParams of launches whose arguments have these sizes: a host buffer that holds a pack()
    and an array of pointers into it, one per argument (each value at an 8-byte aligned offset). The
    driver copies the values during the launch call, so one buffer serves every launch of a kernel."""

    def __init__(self, sizes: tuple[int, ...]):
        self.sizes = sizes
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // 8) * 8
        self.nbytes = total
        self.buffer = ctypes.create_string_buffer(max(total, 8))
        base = ctypes.addressof(self.buffer)
        self.params = (ctypes.c_void_p * max(len(sizes), 1))(*[base + o for o in offsets])

    def fill(self, blob: bytes) -> None:
        if len(blob) != self.nbytes:
            raise ValueError(f"{len(blob)} bytes of arguments for a buffer of {self.nbytes}")
        ctypes.memmove(self.buffer, blob, len(blob))

    def value(self, i: int) -> bytes:
        """The bytes argument i points at (for tests)."""
        return ctypes.string_at(self.params[i], self.sizes[i])


@functools.lru_cache(maxsize=None)
def parameter_sizes(function_ptr: int) -> tuple[int, ...] | None:
    """The byte size of each parameter of a CUfunction (cuFuncGetParamInfo), or None where the driver
    cannot tell (no such entry point, or it refuses the first index)."""
    fn = _param_info_fn()
    if fn is None:
        return None
    sizes, offset, size = [], ctypes.c_size_t(), ctypes.c_size_t()
    while True:
        err = fn(ctypes.c_void_p(function_ptr), len(sizes), ctypes.byref(offset), ctypes.byref(size))
        if err == _CUDA_SUCCESS:
            sizes.append(size.value)
        elif err == _CUDA_ERROR_INVALID_VALUE and sizes:
            return tuple(sizes)  # past the last parameter
        else:  # a refusal at index 0 (every kernel of ours takes parameters) or another error: unknown
            return None


def check_sizes(kernel: str, expected: tuple[int, ...] | None, sizes: tuple[int, ...]) -> None:
    """TypeError when the arguments' sizes do not match the kernel's parameters (None: unknown, no check)."""
    if expected is None:
        return
    if len(expected) != len(sizes):
        raise TypeError(f"kernel {kernel}: {len(sizes)} arguments for {len(expected)} parameters")
    for i, (want, got) in enumerate(zip(expected, sizes)):
        if want != got:
            raise TypeError(f"kernel {kernel}: argument {i} has {got} bytes, the parameter {want}")


_thread = threading.local()


def _ensure_context(device_id: int) -> None:
    """Make the device's primary context current on this thread (what CuPy does before its own launches:
    a driver-API launch from a thread that has made no runtime call yet would find no context)."""
    ready = getattr(_thread, "devices", None)
    if ready is None:
        ready = _thread.devices = set()
    if device_id not in ready:
        import cupy

        cupy.cuda.runtime.memGetInfo()  # any runtime call binds the primary context to the thread
        ready.add(device_id)


class ProgrammaticLaunch:
    """launch(grid, block, args): a CuPy RawKernel on the current stream with `shared_mem` bytes of
    dynamic shared memory, launched with programmatic stream serialization. The same call signature as
    the CuPy kernel (grid and block padded with 1s to three dimensions, as CuPy does). The arguments'
    sizes are checked against the kernel's parameters once per set of sizes."""

    def __init__(self, raw_kernel, shared_mem: int, device_id: int):
        self.name = getattr(raw_kernel, "name", "?")
        self.raw_kernel = raw_kernel  # keeps its module (and so the function) loaded
        self.shared_mem = int(shared_mem)
        self.device_id = device_id
        self.function_ptr = int(raw_kernel.kernel.ptr)  # the CUfunction (compiled and loaded now)
        self.attribute = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
        self.attribute.value[0] = 1  # programmaticStreamSerializationAllowed (an int at offset 0)
        self.config = LaunchConfig(sharedMemBytes=self.shared_mem, attrs=ctypes.pointer(self.attribute), numAttrs=1)
        self._buffers: dict[tuple[int, ...], ParameterBuffer] = {}
        self._lock = threading.Lock()  # one launch at a time fills the buffer and the config

    def __call__(self, grid, block, args):
        import cupy

        blob, sizes = pack(args, self.name)
        g = tuple(max(1, int(v)) for v in (tuple(grid) + (1, 1))[:3])
        b = tuple(max(1, int(v)) for v in (tuple(block) + (1, 1))[:3])
        stream = cupy.cuda.get_current_stream().ptr
        _ensure_context(self.device_id)
        with self._lock:
            params = self._buffers.get(sizes)
            if params is None:
                check_sizes(self.name, parameter_sizes(self.function_ptr), sizes)
                params = self._buffers[sizes] = ParameterBuffer(sizes)
            params.fill(blob)
            cfg = self.config
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = g
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = b
            cfg.hStream = stream
            err = _launch_fn()(ctypes.byref(cfg), ctypes.c_void_p(self.function_ptr), params.params, None)
        if err != _CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernelEx of kernel {self.name} failed: {_error_name(err)} (grid "
                               f"{g[0]}x{g[1]}x{g[2]}, block {b[0]}x{b[1]}x{b[2]}, {self.shared_mem} B dynamic "
                               "shared memory)")
