"""Which device a run uses, and the one line that says so.

probe_gpu() asks CuPy for the current GPU and says why there is none (CuPy not installed, CuPy that
does not import, a driver older than CuPy's CUDA, no device); choose_device() turns --device auto / cpu /
gpu into the device and its line, `GPU 0: NVIDIA H200, 139 GiB free` or `CPU reference (no usable GPU:
<reason>)`. run.py prints that line at start, always (-q too), as llama.cpp prints its device.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import GptossError, one_line


class DeviceError(GptossError, RuntimeError):
    """--device gpu where no GPU is usable."""


@dataclass(frozen=True)
class GPUProbe:
    usable: bool
    description: str  # "GPU 0: NAME, N GiB free" when usable, else why not


def probe_gpu() -> GPUProbe:
    """Whether CuPy can run on a GPU here, and which one (or why not). Never raises."""
    try:
        import cupy
    except ModuleNotFoundError as e:
        if e.name == "cupy":
            return GPUProbe(False, "CuPy is not installed")
        return GPUProbe(False, f"CuPy does not import ({one_line(e)})")
    except Exception as e:  # a CUDA library of CuPy's that is missing or of the wrong version
        return GPUProbe(False, f"CuPy does not import ({one_line(e)})")
    try:
        runtime = cupy.cuda.runtime
        count = runtime.getDeviceCount()
        if count < 1:
            return GPUProbe(False, "CuPy finds no GPU")
        index = runtime.getDevice()
        name = runtime.getDeviceProperties(index)["name"]
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        free, _ = runtime.memGetInfo()
    except Exception as e:  # e.g. cudaErrorInsufficientDriver, cudaErrorNoDevice, a GPU in a bad state
        return GPUProbe(False, f"CuPy cannot use the GPU ({one_line(e)})")
    return GPUProbe(True, f"GPU {index}: {name}, {free / 2**30:.0f} GiB free")


def choose_device(requested: str) -> tuple[str, str]:
    """("gpu" or "cpu", the line to print) for --device auto, cpu or gpu; DeviceError for gpu without a
    usable GPU."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu (got {requested!r})")
    if requested == "cpu":
        return "cpu", "CPU reference (--device cpu)"
    probe = probe_gpu()
    if probe.usable:
        return "gpu", probe.description
    if requested == "gpu":
        raise DeviceError(f"--device gpu: no usable GPU: {probe.description}")
    return "cpu", f"CPU reference (no usable GPU: {probe.description})"
