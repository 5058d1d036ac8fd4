"""Shape-checked launch functions over the kernels in gptoss/kernels, one module per family.

Conventions: inputs and outputs are CuPy arrays (bf16 as uint16 bit patterns); `out=None` allocates;
launches go to the current stream (kernels from gptoss.kernels.kernel); nothing here synchronizes or
copies to the host. Where a wrapper chooses among kernel variants it takes the choices as
`kernels=` (a gptoss.kernels.KernelOptions; default KernelOptions(): what the device has).
"""
