"""The kernel modes in the GPU tests. The whole suite runs in the mode the environment picks
(GPTOSS_KERNELS=portable, or pytest --kernels portable: the ops' default, gptoss.kernels.default_kernels);
cheap tests also run the portable build explicitly (PORTABLE) inside a default run."""
import pytest

from gptoss.kernels import KernelOptions

PORTABLE = KernelOptions(portable=True)


def default_is_portable() -> bool:
    """The ops' default kernels are the portable build (GPTOSS_KERNELS=portable, or an AMD GPU)."""
    from gptoss.kernels import default_kernels

    return default_kernels().portable


def skip_if_portable_is_the_default(kernels):
    """An explicit PORTABLE case is the default run again when the default is portable."""
    if kernels is not None and kernels.portable and default_is_portable():
        pytest.skip("the default kernels are the portable build here: the same kernels as the default")


def skip_fast_path_test():
    """For tests about a fast path (wgmma on or off): the portable build has none."""
    if default_is_portable():
        pytest.skip("a fast-path test (wgmma on/off): the portable kernel mode has no fast path")
