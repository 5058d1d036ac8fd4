"""gptoss/ops/tma.py without a GPU: the argument checks before a tensor map is made, and a clear error
where the driver cannot make one. (The maps themselves are exercised on the device by every GEMM and
MoE test that runs a TMA kernel.)"""
from types import SimpleNamespace

import numpy as np
import pytest

from gptoss.ops import tma


def fake(rows=256, cols=2880, itemsize=2, pitch=None, ptr=0x10000):
    """Stands for a CuPy matrix: what matrix_map reads of one."""
    pitch = cols * itemsize if pitch is None else pitch
    return SimpleNamespace(shape=(rows, cols), dtype=np.dtype(f"u{itemsize}"), strides=(pitch, itemsize),
                           data=SimpleNamespace(ptr=ptr))


@pytest.mark.parametrize("arr, box, message", [
    (fake(itemsize=4), 128, "2-byte"),
    (fake(ptr=0x10008), 128, "multiples of 16"),
    (fake(cols=36, pitch=72), 128, "multiples of 16"),
    (fake(), 0, "box_rows"),
    (fake(), 257, "box_rows"),
])
def test_bad_matrices_are_refused_before_the_driver_is_asked(arr, box, message):
    with pytest.raises(ValueError, match=message):
        tma.matrix_map(arr, box)


def test_without_the_driver_function_the_error_says_what_is_missing():
    assert isinstance(tma.available(), bool)
    if tma.available():
        pytest.skip("this machine's driver makes tensor maps (the device tests use them)")
    with pytest.raises(RuntimeError, match="cuTensorMapEncodeTiled"):
        tma.matrix_map(fake(), 128)
