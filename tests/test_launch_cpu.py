"""Programmatic dependent launch without a GPU: KernelOptions.pdl (GPTOSS_PDL, resolve), which launcher
kernel() hands out, and gptoss/kernels/launch.py's argument marshalling and launch call, driven through
ctypes into a stand-in cuLaunchKernelEx that reads back what a driver would read."""
import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

import gptoss.kernels as K
from gptoss.kernels import KernelOptions
from gptoss.kernels import launch as L
from tests.test_kernels_cpu import fake_modules  # noqa: F401 (the fixture)

# ---- KernelOptions.pdl --------------------------------------------------------------------------------


def test_pdl_from_the_environment():
    assert KernelOptions.from_env({}).pdl is False  # off unless asked for
    assert KernelOptions.from_env({"GPTOSS_PDL": "0"}) == KernelOptions(pdl=False) == KernelOptions()
    assert KernelOptions.from_env({"GPTOSS_PDL": "1"}) == KernelOptions(pdl=None)  # where the device has it
    assert KernelOptions.from_env({"GPTOSS_PDL": "1", "GPTOSS_WGMMA": "0"}) == KernelOptions(wgmma=False, pdl=None)
    # the portable mode has no waits in its kernels: GPTOSS_PDL does not matter there
    assert KernelOptions.from_env({"GPTOSS_KERNELS": "portable", "GPTOSS_PDL": "1"}) == KernelOptions(portable=True)


def test_pdl_is_a_checked_field():
    with pytest.raises(TypeError, match="pdl"):
        KernelOptions(pdl="yes")
    with pytest.raises(ValueError, match="portable=True, pdl=True"):
        KernelOptions(portable=True, pdl=True)
    assert KernelOptions(True, ("A",), False, True).pdl is True  # the last positional field
    assert hash(KernelOptions(pdl=True)) != hash(KernelOptions(pdl=False))


@pytest.mark.parametrize("available", [False, True])
def test_resolve_decides_pdl_for_the_device(monkeypatch, available):
    monkeypatch.setattr(K, "wgmma_available", lambda: False)
    monkeypatch.setattr(K, "pdl_available", lambda: available)
    monkeypatch.setattr(K, "is_amd", lambda: False)
    monkeypatch.setenv("GPTOSS_PDL", "0")  # only from_env reads it
    assert KernelOptions().resolve().pdl is False
    assert KernelOptions(pdl=None).resolve().pdl is available
    assert KernelOptions(pdl=False).resolve().pdl is False
    assert KernelOptions(portable=True).resolve().pdl is False
    if available:
        assert KernelOptions(pdl=True).resolve().pdl is True
    else:
        with pytest.raises(ValueError, match="pdl=True"):
            KernelOptions(pdl=True).resolve()
    monkeypatch.setattr(K, "is_amd", lambda: True)
    assert KernelOptions().resolve() == KernelOptions(wgmma=False, portable=True, pdl=False)
    with pytest.raises(ValueError, match="AMD GPU has no pdl"):
        KernelOptions(pdl=True).resolve()


@pytest.mark.parametrize("cc,driver,expected", [("90", True, True), ("100", True, True), ("80", True, False),
                                                 ("90", False, False), ("", True, False)])
def test_pdl_available_needs_sm90_and_the_driver_entry_point(monkeypatch, cc, driver, expected):
    import cupy

    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(K, "is_amd", lambda: False)
    monkeypatch.setattr(K, "_compute_capability_of", lambda device_id: cc)
    monkeypatch.setattr(L, "available", lambda: driver)
    assert K.pdl_available() is expected
    monkeypatch.setattr(K, "is_amd", lambda: True)
    assert K.pdl_available() is False


def test_pdl_is_unavailable_without_a_gpu():
    if K.gpu_available():
        pytest.skip("a GPU is present")
    assert K.pdl_available() is False


# ---- kernel(): which launcher ------------------------------------------------------------------------

def test_kernel_hands_out_a_programmatic_launch_only_when_pdl_is_on(fake_modules):  # noqa: F811
    modules, _ = fake_modules
    on, off = KernelOptions(wgmma=False, pdl=True), KernelOptions(wgmma=False, pdl=False)
    fast = K.kernel("gemm", "gemm_64x64", smem=100 * 1024, kernels=on)
    fn = modules[("gemm", 0, (), False)].functions["gemm_64x64"]
    assert isinstance(fast, L.ProgrammaticLaunch)
    assert fast.function_ptr == fn.kernel.ptr and fast.shared_mem == 100 * 1024 and fast.name == "gemm_64x64"
    assert fn.limits == [100 * 1024]  # the function's smem limit is set before the first launch
    plain = K.kernel("gemm", "gemm_64x64", smem=100 * 1024, kernels=off)
    assert not isinstance(plain, L.ProgrammaticLaunch) and plain is not fast  # cached apart
    assert K.kernel("gemm", "gemm_64x64", smem=100 * 1024, kernels=on) is fast
    assert not isinstance(K.kernel("norm", "rmsnorm_f32"), L.ProgrammaticLaunch)  # no options: CuPy's launch
    # an unresolved pdl (None) launches as CuPy does
    assert not isinstance(K.kernel("norm", "rmsnorm_f32", kernels=KernelOptions(wgmma=False)), L.ProgrammaticLaunch)


def test_portable_or_amd_builds_never_launch_programmatically(fake_modules, monkeypatch):  # noqa: F811
    """Their kernels have no wait, so an early launch could read what the previous kernel still writes."""
    on = KernelOptions(wgmma=False, pdl=True)
    assert not isinstance(K.kernel("norm", "rmsnorm_f32", K.PORTABLE_DEFINE.split(), kernels=on),
                          L.ProgrammaticLaunch)
    monkeypatch.setattr(K, "is_amd", lambda: True)
    assert not isinstance(K.kernel("embed", "embed_bf16", kernels=on), L.ProgrammaticLaunch)


# ---- argument marshalling -------------------------------------------------------------------------------

class FakeDeviceArray:
    """What launch.py reads of a cupy.ndarray: data.ptr (the address of its first element)."""

    def __init__(self, ptr):
        self.data = SimpleNamespace(ptr=ptr)


def test_arguments_are_passed_as_cupy_passes_them():
    tensor_map = np.frombuffer(bytes(range(128)), dtype="V128")[0]
    cases = [
        (FakeDeviceArray(0x7F00_1234_5600), (0x7F00_1234_5600).to_bytes(8, "little")),
        (np.int32(-3), np.int32(-3).tobytes()),
        (np.uint32(0xFFFF_FFFE), b"\xfe\xff\xff\xff"),
        (np.int64(1 << 40), (1 << 40).to_bytes(8, "little")),
        (np.float32(1.5), np.float32(1.5).tobytes()),
        (np.uint64(0), bytes(8)),  # a null pointer (ops/norm.py's missing fp32 output)
        (np.intp(0), bytes(8)),    # ops/attention.py's missing page table
        (tensor_map, bytes(range(128))),
    ]
    for arg, want in cases:
        assert L.argument_bytes(arg, 0, "k") == want, arg
    blob, sizes = L.pack([a for a, _ in cases], "k")
    assert sizes == tuple(len(w) for _, w in cases) and len(blob) == sum(-(-n // 8) * 8 for n in sizes)
    params = L.ParameterBuffer(sizes)
    params.fill(blob)
    for i, (_, want) in enumerate(cases):
        assert params.value(i) == want
        assert params.params[i] % 8 == 0  # each value 8-byte aligned in the buffer
    with pytest.raises(ValueError, match="bytes of arguments"):
        params.fill(blob[:-8])
    assert L.pack([], "k") == (b"", ())


@pytest.mark.parametrize("arg", [3, 2.5, True, None, "x", np.zeros(1, np.int32), np.zeros(4, np.float32)])
def test_python_scalars_and_host_arrays_are_refused(arg):
    with pytest.raises(TypeError, match=r"kernel gemm_64x64: argument 2"):
        L.argument_bytes(arg, 2, "gemm_64x64")


def test_structures_have_the_driver_layout():
    """cuda.h: CUlaunchAttribute is {id, 4 bytes of pad, a 64-byte union}; CUlaunchConfig puts hStream
    after 7 unsigned ints (8-byte aligned), then attrs, then numAttrs."""
    assert ctypes.sizeof(L.LaunchAttribute) == 72 and L.LaunchAttribute.value.offset == 8
    assert L.LaunchConfig.sharedMemBytes.offset == 24 and L.LaunchConfig.hStream.offset == 32
    assert L.LaunchConfig.attrs.offset == 40 and L.LaunchConfig.numAttrs.offset == 48
    assert ctypes.sizeof(L.LaunchConfig) == 56
    assert L.PROGRAMMATIC_STREAM_SERIALIZATION == 6


# ---- the launch call ------------------------------------------------------------------------------------

_LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(L.LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p)
_PARAM_INFO = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                               ctypes.POINTER(ctypes.c_size_t))


@pytest.fixture
def fake_driver(monkeypatch):
    """A stand-in cuLaunchKernelEx (recording what it reads through the pointers, as the driver would)
    and cuFuncGetParamInfo (the parameter sizes of function 0xF00: a pointer, an int, a float, a map)."""
    import cupy

    sizes = [8, 4, 4, 128]
    seen, result = [], [0]

    def launch(cfg_p, func, params, extra):
        cfg = cfg_p.contents
        attr = cfg.attrs[0]
        ptrs = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        seen.append({"func": func, "extra": extra,
                     "grid": (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ),
                     "block": (cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ),
                     "smem": cfg.sharedMemBytes, "stream": cfg.hStream, "nattrs": cfg.numAttrs,
                     "attr": (attr.id, ctypes.c_int.from_buffer_copy(bytes(attr.value)[:4]).value),
                     "args": [ctypes.string_at(ptrs[i], n) for i, n in enumerate(sizes)]})
        return result[0]

    def param_info(func, index, offset, size):
        if func != 0xF00 or index >= len(sizes):
            return 1  # CUDA_ERROR_INVALID_VALUE
        offset[0], size[0] = sum(sizes[:index]), sizes[index]
        return 0

    c_launch, c_info = _LAUNCH(launch), _PARAM_INFO(param_info)  # kept alive by this frame
    monkeypatch.setattr(L, "_launch_fn", lambda: c_launch)
    monkeypatch.setattr(L, "_param_info_fn", lambda: c_info)
    monkeypatch.setattr(L, "_ensure_context", lambda device_id: None)
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: SimpleNamespace(ptr=0xABC0))
    L.parameter_sizes.cache_clear()
    yield seen, result
    L.parameter_sizes.cache_clear()


def _raw_kernel(ptr=0xF00, name="gemm_wgt128x256"):
    return SimpleNamespace(name=name, kernel=SimpleNamespace(ptr=ptr))


def test_a_launch_reaches_the_driver_as_written(fake_driver):
    seen, _ = fake_driver
    tmap = np.frombuffer(bytes(range(128)), dtype="V128")[0]
    launch = L.ProgrammaticLaunch(_raw_kernel(), 197 * 1024, 0)
    launch((12,), (384,), (FakeDeviceArray(0x1000), np.int32(7), np.float32(0.25), tmap))
    launch((3, 2), (32, 4, 2), (FakeDeviceArray(0x2000), np.int32(-1), np.float32(2.0), tmap))
    first, second = seen
    assert first["func"] == 0xF00 and first["extra"] is None
    assert first["grid"] == (12, 1, 1) and first["block"] == (384, 1, 1) and second["grid"] == (3, 2, 1)
    assert second["block"] == (32, 4, 2)
    assert first["smem"] == 197 * 1024 and first["stream"] == 0xABC0
    assert first["nattrs"] == 1 and first["attr"] == (6, 1)  # programmatic stream serialization, allowed
    assert first["args"] == [(0x1000).to_bytes(8, "little"), np.int32(7).tobytes(), np.float32(0.25).tobytes(),
                             bytes(range(128))]
    assert second["args"][:2] == [(0x2000).to_bytes(8, "little"), np.int32(-1).tobytes()]  # the buffer refilled
    assert list(launch._buffers) == [(8, 4, 4, 128)]


def test_arguments_that_do_not_fit_the_parameters_are_refused_before_the_launch(fake_driver):
    seen, _ = fake_driver
    launch = L.ProgrammaticLaunch(_raw_kernel(), 0, 0)
    tmap = np.zeros(1, dtype="V128")[0]
    with pytest.raises(TypeError, match="3 arguments for 4 parameters"):
        launch((1,), (32,), (FakeDeviceArray(0x1000), np.int32(1), np.float32(1)))
    with pytest.raises(TypeError, match="argument 1 has 8 bytes, the parameter 4"):
        launch((1,), (32,), (FakeDeviceArray(0x1000), np.int64(1), np.float32(1), tmap))
    with pytest.raises(TypeError, match="Python int"):
        launch((1,), (32,), (FakeDeviceArray(0x1000), 1, np.float32(1), tmap))
    assert seen == []
    assert L.parameter_sizes(0xF00) == (8, 4, 4, 128)
    assert L.parameter_sizes(0xBAD) is None  # the driver cannot tell: no check


def test_a_driver_error_is_one_line_naming_the_kernel(fake_driver):
    _, result = fake_driver
    result[0] = 701
    launch = L.ProgrammaticLaunch(_raw_kernel(), 1024, 0)
    with pytest.raises(RuntimeError, match=r"cuLaunchKernelEx of kernel gemm_wgt128x256 failed: .*701.*grid "
                                           r"2x1x1, block 128x1x1, 1024 B") as err:
        launch((2,), (128,), (FakeDeviceArray(0x1000), np.int32(1), np.float32(1), np.zeros(1, "V128")[0]))
    assert "\n" not in str(err.value)
