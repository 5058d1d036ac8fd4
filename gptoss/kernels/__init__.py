"""Kernel sources (*.hip, one file per family), their run-time compilation through cupy.RawModule, and
the one way gptoss/ops gets a kernel to launch: kernel(family, name, defines, sm90a=..., smem=...,
kernels=...), and the options that choose among kernel paths (KernelOptions: the mode "auto" or
"portable", wgmma, pdl: programmatic dependent launch through launch.py).

A family compiles once per process for each (device, extra -D defines, sm_90a or not); CuPy keeps the
binary in its on-disk cache, keyed by the source text and options, so a second process starts without
compiling. The portable mode is one of those defines (PORTABLE_DEFINE), so its binaries are cached
apart. Our headers (`common.h`, `mma.h`) are pasted into the source before compiling so that an edit to
one changes the cache key too.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
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


# ---- what the host reads from the kernel sources ----------------------------------------------------
# Block sizes, tile sizes and variant lists are written once, in the .hip files; the launch wrappers read
# them from there (define, macro_rows) instead of keeping copies.

# `#define NAME number` with an optional f/u suffix and trailing // comment
_DEFINE = re.compile(r"^[ \t]*#define[ \t]+([A-Za-z_]\w*)[ \t]+(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)([fFuU]?)"
                     r"[ \t]*(?://.*)?$", re.M)


def _source_text(source: str) -> str:
    """The text of a kernel source: a family name ("attention" = attention.hip) or a header ("mma.h")."""
    path = KERNEL_DIR / (source if source.endswith(".h") else f"{source}.hip")
    if not path.is_file():
        raise ValueError(f"no kernel source {path.name!r} in {KERNEL_DIR}")
    return path.read_text()


def parse_defines(text: str) -> dict[str, int | float]:
    """The numeric object-like #defines of a source text (`#define NAME 256`, `#define NAME 1.5f`). A name
    defined twice with different values (in #if branches) is left out: it has no single value."""
    found: dict[str, int | float] = {}
    clash: set[str] = set()
    for name, number, suffix in _DEFINE.findall(text):
        is_float = suffix in ("f", "F") or "." in number or "e" in number.lower()
        value = float(number) if is_float else int(number)
        if name in found and found[name] != value:
            clash.add(name)
        found[name] = value
    return {k: v for k, v in found.items() if k not in clash}


def parse_macro_rows(text: str, macro: str) -> list[tuple[str, ...]]:
    """The arguments of every line that starts with `macro(`: the variant lists at the bottom of the
    sources (`GEMM_KERNEL(d16x8, 16, 8, 128, 1, 1, 12, 1)` -> ("d16x8", "16", "8", ...)), in order."""
    rows = re.findall(rf"^{re.escape(macro)}\(([^()]*)\)", text, re.M)
    return [tuple(arg.strip() for arg in row.split(",")) for row in rows]


@functools.lru_cache(maxsize=None)
def defines(source: str) -> dict[str, int | float]:
    """parse_defines of a kernel source (a family name or a header name)."""
    return parse_defines(_source_text(source))


def define(source: str, name: str) -> int | float:
    """The value of `#define name` in a kernel source (a family name or a header name)."""
    value = defines(source).get(name)
    if value is None:
        raise LookupError(f"{name} is not #defined to one number in {source}")
    return value


@functools.lru_cache(maxsize=None)
def macro_rows(source: str, macro: str) -> tuple[tuple[str, ...], ...]:
    """parse_macro_rows of a kernel source; raises LookupError when there is none."""
    rows = tuple(parse_macro_rows(_source_text(source), macro))
    if not rows:
        raise LookupError(f"no {macro}(...) lines in {source}")
    return rows


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def sm_count() -> int:
    """The current device's multiprocessors (the grid sizes the launch wrappers weigh against)."""
    import cupy

    return _sm_count(cupy.cuda.runtime.getDevice())


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


@functools.lru_cache(maxsize=None)
def is_amd() -> bool:
    """True when CuPy runs on ROCm (HIP): the kernels compile for AMD and take their portable paths (no
    tensor cores, no dynamic shared memory, 64-wide warps)."""
    try:
        import cupy
    except ImportError:
        return False
    return bool(getattr(cupy.cuda.runtime, "is_hip", False))


def warp_size() -> int:
    """WARP_SIZE of common.h on this vendor."""
    return 64 if is_amd() else 32


# Families with wgmma (sm_90a) kernels: compiled for sm_90a where KernelOptions.wgmma is on.
WGMMA_FAMILIES = ("moe", "gemm", "attention")
# Dynamic shared memory a wgmma kernel gets beyond its tiles: align_1k (mma.h) moves the start up to the
# next WGMMA_SMEM_ALIGN (1 KB) boundary for the swizzle atoms.
WGMMA_SMEM_SLACK = define("mma.h", "WGMMA_SMEM_ALIGN")


def wgmma_available() -> bool:
    """True where the current device can run the wgmma kernels: an NVIDIA compute capability 9.0 GPU
    (H100/H200) and a CuPy whose arch choice _compile_sm90a can swap. A device capability; whether they
    run is KernelOptions.wgmma."""
    try:
        import cupy
        from cupy.cuda import compiler
        device_id = cupy.cuda.runtime.getDevice()
    except Exception:  # no CuPy or no GPU
        return False
    if not hasattr(compiler, "_get_arch_for_options_for_nvrtc"):
        return False  # a CuPy whose arch choice _compile_sm90a cannot swap: stay on the sm_90 kernels
    return _compute_capability_of(device_id) == "90"


def pdl_available() -> bool:
    """True where kernels can be launched with programmatic dependent launch (launch.py): an NVIDIA GPU
    of compute capability 9.0 or newer and a driver with cuLaunchKernelEx. A device capability; whether
    launches use it is KernelOptions.pdl."""
    from . import launch

    try:
        import cupy
        device_id = cupy.cuda.runtime.getDevice()
    except Exception:  # no CuPy or no GPU
        return False
    if is_amd():
        return False
    cc = _compute_capability_of(device_id)
    return cc.isdigit() and int(cc) >= 90 and launch.available()


@functools.lru_cache(maxsize=None)
def _compute_capability_of(device_id: int) -> str:
    import cupy

    if is_amd():
        return ""
    return cupy.cuda.Device(device_id).compute_capability


# The kernel modes (GPTOSS_KERNELS, run.py --kernels, KernelOptions.mode): "auto" runs the fastest paths
# the device has; "portable" compiles every family with PORTABLE_DEFINE, so the NVIDIA-only code (mma.sync,
# wgmma, cp.async, TMA, NVIDIA-only intrinsics) is left out and the portable #else paths -- the code an
# AMD GPU compiles -- run on an NVIDIA GPU too. On AMD every mode resolves to "portable".
KERNEL_MODES = ("auto", "portable")
PORTABLE_DEFINE = "GPTOSS_PORTABLE=1"


@dataclass(frozen=True)
class KernelOptions:
    """Which kernel variants run. Decide once at start-up (resolve()) and pass the value down: the ops
    take it as `kernels=`; nothing reads the environment per launch.

    wgmma: the sm_90a wgmma kernels of WGMMA_FAMILIES (and those families compiled for sm_90a);
      None = where the device has them (wgmma_available()); always False when portable.
    moe_defines: extra -D defines of the MoE expert GEMMs (moe.hip), e.g. ("MOE_ABLATE=1",) for
      benchmarks/kernel_moe.py --ablate.
    portable: every family compiled with -DGPTOSS_PORTABLE=1 (the portable paths only; see KERNEL_MODES),
      no dynamic shared memory, and the ops pick only kernels that exist in that build.
    pdl: every launch with programmatic dependent launch (launch.py: a kernel may start while the one
      before it still runs, and waits in GPTOSS_WAIT_PRIOR_GRID); False (the default: measured slower on
      the H200, docs/notes/launch.md) = plain CuPy launches, None = where the device has it
      (pdl_available()); always False when portable (that build has no waits).
    """
    wgmma: bool | None = None
    moe_defines: tuple[str, ...] = ()
    portable: bool = False
    pdl: bool | None = False

    def __post_init__(self):
        if self.wgmma is not None and not isinstance(self.wgmma, bool):
            raise TypeError(f"KernelOptions.wgmma: expected True, False or None, got {self.wgmma!r}")
        if isinstance(self.moe_defines, str) or not all(isinstance(d, str) and d for d in self.moe_defines):
            raise TypeError(f"KernelOptions.moe_defines: expected a tuple of NAME or NAME=VALUE strings, "
                            f"got {self.moe_defines!r}")
        if not isinstance(self.portable, bool):
            raise TypeError(f"KernelOptions.portable: expected True or False, got {self.portable!r}")
        if self.portable and self.wgmma:
            raise ValueError("KernelOptions(portable=True, wgmma=True): the portable build has no wgmma kernels")
        if self.pdl is not None and not isinstance(self.pdl, bool):
            raise TypeError(f"KernelOptions.pdl: expected True, False or None, got {self.pdl!r}")
        if self.portable and self.pdl:
            raise ValueError("KernelOptions(portable=True, pdl=True): the portable build's kernels do not wait "
                             "for the previous kernel, so they cannot be launched early")
        object.__setattr__(self, "moe_defines", tuple(self.moe_defines))

    @property
    def mode(self) -> str:
        """"portable" or "auto" (KERNEL_MODES)."""
        return "portable" if self.portable else "auto"

    @classmethod
    def for_mode(cls, mode: str, **fields) -> "KernelOptions":
        """The options of a KERNEL_MODES name (run.py --kernels); raises ValueError for another name."""
        if mode not in KERNEL_MODES:
            raise ValueError(f"kernel mode: expected one of {', '.join(KERNEL_MODES)}, got {mode!r}")
        return cls(portable=mode == "portable", **fields)

    @classmethod
    def from_env(cls, environ=None, mode: str | None = None) -> "KernelOptions":
        """The options the environment asks for: GPTOSS_KERNELS=portable (or auto, the default) picks the
        mode unless `mode` (run.py --kernels) is given; GPTOSS_WGMMA=0 turns the wgmma kernels off (anything
        else leaves them to the device) and GPTOSS_PDL=1 turns programmatic dependent launch on where the
        device has it (off otherwise). For start-up
        code; `environ` defaults to os.environ. Raises ValueError for an unknown mode."""
        import os

        env = os.environ if environ is None else environ
        if mode is None:
            mode = env.get("GPTOSS_KERNELS", "").strip().lower() or "auto"
            if mode not in KERNEL_MODES:
                raise ValueError(f"GPTOSS_KERNELS={env.get('GPTOSS_KERNELS')!r}: expected one of "
                                 f"{', '.join(KERNEL_MODES)}")
        if mode == "portable":
            return cls.for_mode(mode)
        return cls.for_mode(mode, wgmma=False if env.get("GPTOSS_WGMMA", "1") == "0" else None,
                            pdl=None if env.get("GPTOSS_PDL", "0") == "1" else False)

    def resolve(self) -> "KernelOptions":
        """These options for the current device, wgmma and pdl decided (True or False) and portable set on
        AMD (where only the portable paths exist). Raises ValueError when wgmma=True or pdl=True and the
        device lacks it."""
        if self.portable or is_amd():
            for field, value in (("wgmma", self.wgmma), ("pdl", self.pdl)):
                if value:
                    raise ValueError(f"KernelOptions({field}=True): an AMD GPU has no {field}")
            return replace(self, wgmma=False, portable=True, pdl=False)
        wgmma = _decided("wgmma", self.wgmma, wgmma_available,
                         "the wgmma kernels need an NVIDIA compute capability 9.0 GPU (H100/H200) and a CuPy "
                         "whose NVRTC arch choice can be set")
        pdl = _decided("pdl", self.pdl, pdl_available,
                       "programmatic dependent launch needs an NVIDIA compute capability 9.0+ GPU and a CUDA "
                       "driver with cuLaunchKernelEx")
        return replace(self, wgmma=wgmma, pdl=pdl)

    def defines(self, family: str) -> tuple[str, ...]:
        """The extra -D defines `family` compiles with under these options: PORTABLE_DEFINE when
        portable, then moe_defines for "moe"."""
        return (PORTABLE_DEFINE,) * self.portable + (self.moe_defines if family == "moe" else ())

    def sm90a(self, family: str) -> bool:
        """Whether `family` compiles for sm_90a (its wgmma kernels) under these (resolved) options."""
        return bool(self.wgmma) and family in WGMMA_FAMILIES


def _decided(field: str, asked: bool | None, available, needs: str) -> bool:
    """A KernelOptions choice for this device: False stays off, None is what available() says, True must
    be available (else ValueError: `needs`)."""
    if asked is False:
        return False
    ok = available()
    if asked and not ok:
        raise ValueError(f"KernelOptions({field}=True): {needs}")
    return ok


@functools.lru_cache(maxsize=None)
def default_kernels() -> KernelOptions:
    """KernelOptions.from_env() resolved for the current device, once per process: what an op runs when
    its call gives no `kernels=` (tests, benchmarks, direct use of gptoss.ops). Engines and models take
    their options from their config instead (EngineConfig.kernels)."""
    return KernelOptions.from_env().resolve()


def resolved(kernels: KernelOptions | None) -> KernelOptions:
    """`kernels` resolved for the current device; None = default_kernels()."""
    return default_kernels() if kernels is None else kernels.resolve()


def _compile_sm90a(source: str, options: tuple):
    """cupy.RawModule compiled for sm_90a. CuPy picks -arch=sm_<cc> itself (no way to ask for the 'a'
    target); its choice comes from compiler._get_arch_for_options_for_nvrtc, which is swapped for the
    compile (its result is also part of CuPy's disk-cache key, so the sm_90a binary is cached apart)."""
    import cupy
    from cupy.cuda import compiler

    original = compiler._get_arch_for_options_for_nvrtc
    compiler._get_arch_for_options_for_nvrtc = lambda arch=None: ("-arch=sm_90a", "cubin")
    try:
        mod = cupy.RawModule(code=source, options=options)
        mod.compile()
    finally:
        compiler._get_arch_for_options_for_nvrtc = original
    return mod


@functools.lru_cache(maxsize=None)
def _module(family: str, device_id: int, defines: tuple, sm90a: bool):
    import cupy

    options = ("-std=c++17",) + tuple(f"-D{d}" for d in defines)
    if sm90a:  # the extra define also keeps CuPy's in-process module memo (keyed by code and options) apart
        return _compile_sm90a(expanded_source(family), options + ("-DGPTOSS_SM90A=1",))
    return cupy.RawModule(code=expanded_source(family), options=options)


def _current_device() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


# Dynamic shared memory a kernel may use without raising its limit (cudaFuncAttributeMaxDynamicSharedMemorySize).
_DEFAULT_SMEM_LIMIT = 48 * 1024
_smem_limits: dict[tuple, int] = {}  # (family, name, defines, sm90a, device) -> the limit set on the function


@functools.lru_cache(maxsize=None)
def _function(family: str, name: str, defines: tuple, sm90a: bool, device_id: int):
    return _module(family, device_id, defines, sm90a).get_function(name)


@functools.lru_cache(maxsize=None)
def _launcher(family: str, name: str, defines: tuple, sm90a: bool, smem: int, device_id: int, pdl: bool = False):
    if sm90a and family not in WGMMA_FAMILIES:
        raise ValueError(f"kernel family {family!r} has no sm_90a build (only {', '.join(WGMMA_FAMILIES)})")
    if sm90a and PORTABLE_DEFINE in defines:
        raise ValueError(f"kernel family {family!r}: the portable build has no sm_90a (wgmma) kernels")
    fn = _function(family, name, defines, sm90a, device_id)
    if is_amd() or PORTABLE_DEFINE in defines:
        smem = 0  # the portable paths use static shared memory only
    key = (family, name, defines, sm90a, device_id)
    if smem > _smem_limits.get(key, _DEFAULT_SMEM_LIMIT):
        fn.max_dynamic_shared_size_bytes = smem  # an attribute of the function: set once, never lowered
        _smem_limits[key] = smem
    if pdl and not is_amd() and PORTABLE_DEFINE not in defines:
        from .launch import ProgrammaticLaunch

        return ProgrammaticLaunch(fn, smem, device_id)  # the same function, its smem limit set above
    return functools.partial(fn, shared_mem=smem)


def kernel(family: str, name: str, defines: tuple = (), *, sm90a: bool = False, smem: int = 0,
           kernels: KernelOptions | None = None):
    """Kernel `name` of `family` on the current device, ready to launch as k(grid, block, args) on the
    current stream with `smem` bytes of dynamic shared memory (the NVIDIA tensor-core paths; AMD and
    portable launches get none). Compiled on first use with the extra -D `defines`, for sm_90a when
    `sm90a` (WGMMA_FAMILIES only); cached per device, defines, arch, smem and launch kind. `kernels`
    (resolved KernelOptions) adds its defines for the family (KernelOptions.defines: the portable build,
    the MoE defines), its sm_90a choice (KernelOptions.sm90a) and whether the launch is a programmatic
    dependent one (KernelOptions.pdl, launch.py; without `kernels`, a plain CuPy launch)."""
    pdl = False
    if kernels is not None:
        defines = kernels.defines(family) + tuple(defines)
        sm90a = sm90a or kernels.sm90a(family)
        pdl = bool(kernels.pdl)
    return _launcher(family, name, tuple(defines), bool(sm90a), int(smem), _current_device(), pdl)


def compile_all(options: KernelOptions | None = None) -> list[str]:
    """Compile (or load from CuPy's disk cache) every family on the current device as `options` (default
    KernelOptions.from_env()) will run it, so that no compile happens in the middle of timed work.
    Returns the family names."""
    opts = (options if options is not None else KernelOptions.from_env()).resolve()
    names = families()
    for name in names:  # (a RawModule compiles lazily)
        _module(name, _current_device(), opts.defines(name), opts.sm90a(name)).compile()
    return names
