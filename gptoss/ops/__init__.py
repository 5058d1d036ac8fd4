"""Shape-checked launch functions over the kernels in gptoss/kernels, one module per family.

Conventions: inputs and outputs are CuPy arrays (bf16 as uint16 bit patterns); `out=None` allocates;
launches go to the current stream (kernels from gptoss.kernels.kernel); nothing here synchronizes or
copies to the host. Every wrapper takes the kernel choices as `kernels=` (a gptoss.kernels.KernelOptions:
which build of the family runs -- portable or not -- and, where it chooses among variants, which ones);
default gptoss.kernels.default_kernels(): GPTOSS_KERNELS / GPTOSS_WGMMA, read once, else what the device
has.
"""
