"""gptoss.device: the line that says what runs, and why not the GPU, with CuPy faked in every way it
fails (not installed, a CUDA library missing, a driver older than CuPy's CUDA, no device) or works."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gptoss.device import DeviceError, GPUProbe, choose_device, probe_gpu

ROOT = Path(__file__).resolve().parent.parent
INSUFFICIENT = "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"


class CUDARuntimeError(RuntimeError):
    """What cupy_backends.cuda.api.runtime raises."""


def fake_cupy(count=1, error=None, name=b"NVIDIA H200", free=139 * 2**30 + 5):
    def raises_or(value):
        def call(*args):
            if error is not None:
                raise error
            return value
        return call

    runtime = types.SimpleNamespace(getDeviceCount=raises_or(count), getDevice=lambda: 0,
                                    getDeviceProperties=lambda i: {"name": name},
                                    memGetInfo=lambda: (free, 141 * 2**30))
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


class RefuseImport:
    """A meta path finder: `import cupy` fails as a CuPy whose CUDA libraries cannot load does."""

    def find_spec(self, name, path=None, target=None):
        if name == "cupy":
            raise ImportError("libcudart.so.12: cannot open shared object file: No such file or directory")
        return None


def test_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy: ModuleNotFoundError, name "cupy"
    assert probe_gpu() == GPUProbe(False, "CuPy is not installed")
    assert choose_device("auto") == ("cpu", "CPU reference (no usable GPU: CuPy is not installed)")


def test_cuda_libraries_that_do_not_load(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [RefuseImport(), *sys.meta_path])
    probe = probe_gpu()
    assert not probe.usable
    assert probe.description == ("CuPy does not import (ImportError: libcudart.so.12: cannot open shared "
                                 "object file: No such file or directory)")


def test_driver_too_old_says_so_for_auto_and_refuses_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(error=CUDARuntimeError(INSUFFICIENT)))
    device, line = choose_device("auto")
    assert device == "cpu"
    assert line == f"CPU reference (no usable GPU: CuPy cannot use the GPU (CUDARuntimeError: {INSUFFICIENT}))"
    with pytest.raises(DeviceError, match=r"^--device gpu: no usable GPU: CuPy cannot use the GPU "
                                          r"\(CUDARuntimeError: cudaErrorInsufficientDriver"):
        choose_device("gpu")


def test_no_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(count=0))
    assert probe_gpu() == GPUProbe(False, "CuPy finds no GPU")


def test_a_usable_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    assert choose_device("auto") == ("gpu", "GPU 0: NVIDIA H200, 139 GiB free")
    assert choose_device("gpu") == ("gpu", "GPU 0: NVIDIA H200, 139 GiB free")


def test_cpu_does_not_touch_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(error=AssertionError("--device cpu asked CuPy")))
    assert choose_device("cpu") == ("cpu", "CPU reference (--device cpu)")
    with pytest.raises(ValueError, match="auto, cpu or gpu"):
        choose_device("tpu")


@pytest.fixture
def broken_cupy(tmp_path):
    """A folder to put first on PYTHONPATH: a cupy whose runtime answers cudaErrorInsufficientDriver."""
    pkg = tmp_path / "fake" / "cupy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "class CUDARuntimeError(RuntimeError):\n    pass\n"
        "class runtime:\n    @staticmethod\n    def getDeviceCount():\n"
        f"        raise CUDARuntimeError({INSUFFICIENT!r})\n"
        "class cuda:\n    runtime = runtime\n")
    return tmp_path / "fake"


def run_py(env_path, *args):
    import os

    env = dict(os.environ, PYTHONPATH=str(env_path))
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_run_py_says_which_device_runs(broken_cupy, tmp_path):
    """run.py with a CuPy that cannot use the GPU: --device gpu is a one-line error before the model
    loads; auto says, on its first stderr line, that the CPU reference runs and why (with -q too)."""
    missing_model = tmp_path / "missing.bin"
    missing_model.write_bytes(b"")  # never opened: the device is chosen first
    proc = run_py(broken_cupy, str(missing_model), "-p", "x", "--device", "gpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == f"run.py: error: --device gpu: no usable GPU: CuPy cannot use the GPU " \
                          f"(CUDARuntimeError: {INSUFFICIENT})\n"

    from gptoss.config import TINY_CHAT
    from gptoss.weights import write_hf_checkpoint

    write_hf_checkpoint(TINY_CHAT, tmp_path / "m", "mxfp4", 0)
    proc = run_py(broken_cupy, str(tmp_path / "m"), "-p", "Hi", "-n", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == f"CPU reference (no usable GPU: CuPy cannot use the GPU " \
                                          f"(CUDARuntimeError: {INSUFFICIENT}))"
