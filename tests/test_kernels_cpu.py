"""gptoss/kernels without a GPU: the values the launch wrappers read from the kernel sources (and the few
they still assume, checked against the sources here), KernelOptions, and kernel()'s caching and
shared-memory limits (with stand-ins for CuPy's compiled modules)."""
from __future__ import annotations

import dataclasses
import importlib
import re
from types import SimpleNamespace

import pytest

from gptoss import kernels as K
from gptoss.kernels import KernelOptions


def source(name: str) -> str:
    return (K.KERNEL_DIR / (name if name.endswith(".h") else f"{name}.hip")).read_text()


# ---- reading the sources ---------------------------------------------------------------------------

def test_parse_defines_reads_numbers_only():
    text = """
#define A 32  // a comment
#define B 1.5f
  #define C 1024u
#define D -7
#define E 2.5e3
#define F(x) ((x) + 1)
#define G SOME_OTHER_NAME
#define H (__uint_as_float(0xff800000u))
#if X
  #define W 64
#else
  #define W 32
#endif
#define SAME 8
#define SAME 8
"""
    assert K.parse_defines(text) == {"A": 32, "B": 1.5, "C": 1024, "D": -7, "E": 2500.0, "SAME": 8}
    assert isinstance(K.parse_defines(text)["A"], int)


def test_parse_macro_rows_reads_the_invocations_not_the_definition():
    text = """
#define ROW(NAME, A, B) void NAME() {}
ROW(first, 1, 2)   // comment
ROW(second,3,4)
  ROW(indented, 5, 6)
// ROW(commented, 7, 8)
"""
    assert K.parse_macro_rows(text, "ROW") == [("first", "1", "2"), ("second", "3", "4")]


def test_an_edited_source_changes_what_is_read(tmp_path, monkeypatch):
    """The wrappers hold no copy: edit ATTN_SEG or a variant row and define()/macro_rows() read the edit."""
    text = source("attention").replace("#define ATTN_SEG 256", "#define ATTN_SEG 512")
    text = text.replace("ATTN_DECODE_KERNEL(attn_decode_g4, 4, 4)", "ATTN_DECODE_KERNEL(attn_decode_g4, 4, 3)")
    (tmp_path / "attention.hip").write_text(text)
    monkeypatch.setattr(K, "KERNEL_DIR", tmp_path)
    K.defines.cache_clear()
    K.macro_rows.cache_clear()
    try:
        assert K.define("attention", "ATTN_SEG") == 512
        assert ("attn_decode_g4", "4", "3") in K.macro_rows("attention", "ATTN_DECODE_KERNEL")
        with pytest.raises(LookupError, match="NO_SUCH"):
            K.define("attention", "NO_SUCH")
        with pytest.raises(LookupError, match="NO_SUCH_KERNEL"):
            K.macro_rows("attention", "NO_SUCH_KERNEL")
        with pytest.raises(ValueError, match="norm.hip"):
            K.define("norm", "NORM_THREADS")  # not in tmp_path
    finally:
        K.defines.cache_clear()
        K.macro_rows.cache_clear()


# Every constant a launch wrapper takes from a kernel source: (module, attribute, source, #define).
READ_FROM_SOURCES = [
    ("gptoss.ops.attention", "SEG", "attention", "ATTN_SEG"),
    ("gptoss.ops.attention", "TILE", "attention", "ATTN_TILE"),
    ("gptoss.ops.attention", "BLOCK_Q", "attention", "ATTN_BLOCK_Q"),
    ("gptoss.ops.attention", "PREFILL_STAGES", "attention", "ATTN_PREFILL_STAGES"),
    ("gptoss.kv_cache", "PAGE", "attention", "ATTN_TILE"),
    ("gptoss.ops.moe", "ROUTER_SPLITS", "routing", "ROUTER_SPLITS"),
    ("gptoss.ops.moe", "ROUTER_TT", "routing", "ROUTER_TT"),
    ("gptoss.ops.moe", "ROUTER_TE", "routing", "ROUTER_TE"),
    ("gptoss.ops.moe", "ROUTER_THREADS", "routing", "ROUTER_THREADS"),
    ("gptoss.ops.moe", "TOPK_MAX", "routing", "TOPK_MAX"),
    ("gptoss.ops.moe", "DISPATCH_THREADS", "routing", "DISPATCH_THREADS"),
    ("gptoss.ops.moe", "MAX_EXPERTS", "routing", "DISPATCH_MAX_E"),
    ("gptoss.ops.moe", "FUSED_MAX_LOGITS", "routing", "FUSED_MAX_LOGITS"),
    ("gptoss.ops.norm", "THREADS", "norm", "NORM_THREADS"),
    ("gptoss.ops.embed", "THREADS", "embed", "EMBED_THREADS"),
    ("gptoss.ops.sampling", "SAMPLE_THREADS", "sampling", "SAMPLE_THREADS"),
    ("gptoss.ops.sampling", "ARGMAX_THREADS", "sampling", "ARGMAX_THREADS"),
    ("gptoss.kernels", "WGMMA_SMEM_SLACK", "mma.h", "WGMMA_SMEM_ALIGN"),
]


@pytest.mark.parametrize("module, attr, src, name", READ_FROM_SOURCES)
def test_python_constants_are_the_sources_values(module, attr, src, name):
    assert getattr(importlib.import_module(module), attr) == K.parse_defines(source(src))[name]


def test_variant_tables_are_the_sources_rows():
    """Both GEMM families' variants come from their macro lines: one entry per row, nothing else."""
    from gptoss.ops import gemm, moe

    rows = {m: K.parse_macro_rows(source("gemm"), m) for m in ("GEMM_KERNEL", "GEMM_WG_KERNEL", "GEMM_TMA_KERNEL")}
    assert list(gemm.VARIANTS) == [r[0] for m in rows for r in rows[m]]
    for name, bm, bn, bk, wm, wn, stages, _ in rows["GEMM_KERNEL"]:
        v = gemm.VARIANTS[name]
        assert (v.bm, v.bn, v.bk, v.threads, v.stages, v.wgmma) == (int(bm), int(bn), int(bk), 32 * int(wm) * int(wn),
                                                                    int(stages), False)
    consts = K.parse_defines(source("gemm"))
    for name, bn, stages, *_ in rows["GEMM_WG_KERNEL"] + rows["GEMM_TMA_KERNEL"]:
        v = gemm.VARIANTS[name]
        threads = consts["GEMM_TMA_THREADS" if v.tma else "GEMM_WG_THREADS"]
        assert (v.bm, v.bn, v.bk, v.threads, v.stages, v.wgmma) == (consts["GEMM_WG_BM"], int(bn), consts["GEMM_WG_BK"],
                                                                    threads, int(stages), True)
    assert [v.tma for v in gemm.VARIANTS.values()].count(True) == len(rows["GEMM_TMA_KERNEL"])
    moe_rows = [r for m in ("MOE_KERNEL", "MOE_WG_KERNEL", "MOE_STD_KERNEL", "MOE_DENSE_KERNEL")
                for r in K.parse_macro_rows(source("moe"), m)]
    assert sorted(moe.VARIANTS) == sorted(r[0] for r in moe_rows)


# The macros whose rows the wrappers read: their parameters in the order the wrappers unpack them, and
# the block size the wrappers launch with (each definition of the macro, on every vendor path).
MACROS = [
    ("gemm", "GEMM_KERNEL", "NAME, BM, BN, BK, WM, WN, STAGES, MIN_BLOCKS", "32 * (WM) * (WN)"),
    ("gemm", "GEMM_WG_KERNEL", "NAME, BN, STAGES, MIN_BLOCKS", "GEMM_WG_THREADS"),
    ("gemm", "GEMM_TMA_KERNEL", "NAME, BN, STAGES, MIN_BLOCKS", "GEMM_TMA_THREADS"),
    ("moe", "MOE_KERNEL", "NAME, NT, MW, WARPS_N, KSUB, STAGES, FP4, MLP1, MINB", "32 * WARPS_N"),
    ("moe", "MOE_WG_KERNEL", "NAME, NT, WARPS_N, KSUB, STAGES, LAG, MLP1, MINB", "32 * WARPS_N"),
    ("moe", "MOE_STD_KERNEL", "NAME, NT, MW, WARPS_N, KSUB, STAGES, MLP1, MINB", "32 * WARPS_N"),
    ("moe", "MOE_DENSE_KERNEL", "NAME, NT, WARPS_N, STAGES, MLP1, MINB", "32 * WARPS_N"),
    ("attention", "ATTN_DECODE_KERNEL", "NAME, G, STAGES", "32"),
    ("attention", "ATTN_DECODE_FP8_KERNEL", "NAME, G, STAGES", "32"),
]


@pytest.mark.parametrize("src, macro, params, threads", MACROS)
def test_variant_macros_take_what_the_wrappers_read(src, macro, params, threads):
    text = source(src)
    found = re.findall(rf"#define {macro}\(([^)]*)\)(.*?)(?<!\\)\n", text, re.S)
    assert found, f"no #define {macro} in {src}"
    for got, body in found:
        assert got == params
        bounds = re.search(r"__launch_bounds__\(((?:[^()]|\([^()]*\))*)\)", body)  # (an empty stub has none)
        if bounds:
            block = re.sub(r", \w+$", "", bounds.group(1))  # without the min-blocks argument
            assert block == threads, body
    with_bounds = [b for _, b in found if "__launch_bounds__" in b]
    assert with_bounds, f"{macro}: no definition with a launch bound"


def test_wgmma_moe_variants_are_mxfp4_with_one_weight_tile_per_warp():
    """ops.moe gives MOE_WG_KERNEL rows MW = 1 and FP4: the values its macro passes to MoeCfg."""
    from gptoss.ops import moe

    body = re.search(r"#define MOE_WG_KERNEL\(.*?\n(.*?)\n#endif", source("moe"), re.S).group(1)
    assert "MoeCfg<NT, 1, WARPS_N, KSUB, STAGES, true, true, LAG>" in body
    assert all(v.mw == 1 and v.fp4 for v in moe.VARIANTS.values() if v.wgmma and not v.dense)
    body = re.search(r"#define MOE_DENSE_KERNEL\(.*?\n(.*?)\n#endif", source("moe"), re.S).group(1)
    assert "MoeCfg<NT, 1, WARPS_N, 2, STAGES, false, true, 1>" in body
    assert all(v.mw == 1 and not v.fp4 and v.ksub == 2 and v.lag == 1 for v in moe.VARIANTS.values() if v.dense)


def test_attention_shapes_the_wrapper_assumes():
    """attention.py launches attn_prefill_g{G} with 32 G threads and attn_decode_g{G} for each G of
    FAST_GROUPS, and splits the decode workspace into part_acc [rows, D] and part_ml [rows, 2]
    (DECODE_PARTIAL_FLOATS = D + 2 floats per row) for the kernels' D = FAST_HEAD_DIM."""
    from gptoss.ops import attention as A

    text = source("attention")
    prefill = {r[0]: (int(r[1]), r[3]) for r in K.parse_macro_rows(text, "ATTN_PREFILL_KERNEL")}
    assert prefill == {f"attn_prefill_g{g}{suffix}": (g, kv) for g in A.FAST_GROUPS
                       for suffix, kv in (("", "bf16_t"), ("_fp8", "u8"))}
    assert "__launch_bounds__(32 * G, BOUNDS) NAME(ATTN_PREFILL_ARGS(KV))" in text  # 32 G threads
    for macro, suffix in (("ATTN_DECODE_KERNEL", ""), ("ATTN_DECODE_FP8_KERNEL", "_fp8")):
        decode_rows = K.parse_macro_rows(text, macro)
        assert {r[0] for r in decode_rows} == {f"attn_decode_g{g}{suffix}" for g in A.FAST_GROUPS}
    # the decode kernel's writes and the combine kernel's reads of the partials
    acc = re.findall(r"part_acc \+ \(prow \+ h[ab]\) \* (\d+)", text) + re.findall(r"part_acc \+ r \* (\d+)", text)
    ml = re.findall(r"part_ml \+ \(prow \+ h[ab]\) \* (\d+)", text) + re.findall(r"part_ml \+ (\d+) \* r\)", text)
    assert len(acc) == 3 and set(acc) == {str(A.FAST_HEAD_DIM)}
    assert len(ml) == 3 and set(ml) == {str(A.DECODE_PARTIAL_FLOATS - A.FAST_HEAD_DIM)}
    # K/V tiles of D = 64 columns, sizeof(KV) bytes each; fp8 adds one converted bf16 K/V tile pair
    assert "#define KV_STAGE_ELEMS(KV) (ATTN_TILE * 64 * (int)sizeof(KV))" in text
    assert text.count("bf16_t* sConv = sKV + STAGES * STAGE;") == 2
    assert text.count("bf16_t* sQ = sConv + (FP8 ? 2 * ATTN_TILE * 64 : 0);") == 2
    tile = A.TILE * A.FAST_HEAD_DIM
    assert A._decode_smem(2) == 2 * 2 * tile * 2 + 16 * 64 * 2
    assert A._decode_smem(2, fp8=True) == 2 * 2 * tile + 2 * tile * 2 + 16 * 64 * 2
    assert A.decode_workspace_floats(3, 1000, 64) == 3 * A.decode_splits(1000, 0) * 64 * A.DECODE_PARTIAL_FLOATS


def test_moe_tile_heights_are_the_variants():
    """The dispatch writes one tile schedule per height of TILE_BMS (routing.hip: NH of them) and every
    height has expert GEMM variants."""
    from gptoss.ops import moe

    assert re.search(r"constexpr int NH = (\d+);", source("routing")).group(1) == str(len(moe.TILE_BMS))
    assert set(moe.TILE_BMS) == {v.bm for v in moe.VARIANTS.values()}


def test_warp_size_is_common_h_s(monkeypatch):
    amd_branch, other_branch = re.search(r"#if defined\(__HIPCC__\)(.*?)#else(.*?)#endif", source("common.h"),
                                         re.S).groups()
    for is_amd, branch in ((True, amd_branch), (False, other_branch)):
        monkeypatch.setattr(K, "is_amd", lambda is_amd=is_amd: is_amd)
        assert f"#define WARP_SIZE {K.warp_size()}" in branch


# ---- KernelOptions ---------------------------------------------------------------------------------

def test_options_from_the_environment():
    assert KernelOptions.from_env({"GPTOSS_WGMMA": "0"}) == KernelOptions(wgmma=False)
    assert KernelOptions.from_env({"GPTOSS_WGMMA": "1"}) == KernelOptions()
    assert KernelOptions.from_env({}) == KernelOptions()


@pytest.mark.parametrize("available", [False, True])
def test_resolve_decides_wgmma_for_the_device_and_never_reads_the_environment(monkeypatch, available):
    monkeypatch.setattr(K, "wgmma_available", lambda: available)
    monkeypatch.setattr(K, "pdl_available", lambda: False)  # (tests/test_launch_cpu.py resolves pdl)
    monkeypatch.setenv("GPTOSS_WGMMA", "0")  # only from_env reads it
    assert KernelOptions().resolve() == KernelOptions(wgmma=available, pdl=False)
    assert KernelOptions(wgmma=False, moe_defines=("X=1",)).resolve() == KernelOptions(False, ("X=1",), pdl=False)
    if available:
        assert KernelOptions(wgmma=True).resolve().wgmma is True
    else:
        with pytest.raises(ValueError, match="H100"):
            KernelOptions(wgmma=True).resolve()


def test_options_are_checked_frozen_values():
    assert KernelOptions(moe_defines=["MOE_ABLATE=1"]).moe_defines == ("MOE_ABLATE=1",)
    with pytest.raises(TypeError, match="moe_defines"):
        KernelOptions(moe_defines="MOE_ABLATE=1")
    with pytest.raises(TypeError, match="wgmma"):
        KernelOptions(wgmma="yes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelOptions().wgmma = True
    assert hash(KernelOptions(True, ("A",))) == hash(KernelOptions(True, ("A",)))


# ---- kernel(): one cache, one shared-memory rule ------------------------------------------------------

class FakeKernel:
    """What kernel() uses of a cupy RawKernel: the dynamic shared memory attribute, a launch, and the
    CUfunction a programmatic launch (kernels/launch.py) goes through (kernel.ptr)."""

    def __init__(self, name):
        self.name, self.limits, self.launches = name, [], []
        self.kernel = SimpleNamespace(ptr=id(self))

    @property
    def max_dynamic_shared_size_bytes(self):
        return self.limits[-1] if self.limits else 48 * 1024

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, n):
        self.limits.append(n)

    def __call__(self, grid, block, args, shared_mem=0):
        self.launches.append((grid, block, args, shared_mem))


class FakeModule:
    def __init__(self, key):
        self.key, self.functions, self.compiled = key, {}, 0

    def get_function(self, name):
        return self.functions.setdefault(name, FakeKernel(name))

    def compile(self):
        self.compiled += 1


@pytest.fixture
def fake_modules(monkeypatch):
    """kernel() over stand-in modules: {(family, device, defines, sm90a): FakeModule}."""
    modules: dict = {}
    device = [0]

    def module(family, device_id, defines, sm90a):
        key = (family, device_id, defines, sm90a)
        return modules.setdefault(key, FakeModule(key))

    monkeypatch.setattr(K, "_module", module)
    monkeypatch.setattr(K, "_current_device", lambda: device[0])
    monkeypatch.setattr(K, "is_amd", lambda: False)
    monkeypatch.setattr(K, "_smem_limits", {})
    K._function.cache_clear()
    K._launcher.cache_clear()
    yield modules, device
    K._function.cache_clear()
    K._launcher.cache_clear()


def test_kernel_caches_per_device_defines_and_arch(fake_modules):
    modules, device = fake_modules
    a = K.kernel("moe", "moe_mlp1_fp4_m64")
    assert K.kernel("moe", "moe_mlp1_fp4_m64") is a
    K.kernel("moe", "moe_mlp1_fp4_m64", ["MOE_ABLATE=1"])
    K.kernel("moe", "moe_mlp1_fp4_m64", sm90a=True)
    device[0] = 1
    K.kernel("moe", "moe_mlp1_fp4_m64")
    assert set(modules) == {("moe", 0, (), False), ("moe", 0, ("MOE_ABLATE=1",), False),
                            ("moe", 0, (), True), ("moe", 1, (), False)}
    with pytest.raises(ValueError, match="no sm_90a build"):
        K.kernel("norm", "rmsnorm_f32", sm90a=True)


def test_kernel_launches_with_its_shared_memory_and_raises_the_limit_only_upwards(fake_modules):
    modules, _ = fake_modules
    K.kernel("gemm", "gemm_64x64", smem=40 * 1024)((1,), (128,), ("x",))
    K.kernel("gemm", "gemm_64x64", smem=100 * 1024)((2,), (128,), ("y",))
    K.kernel("gemm", "gemm_64x64", smem=60 * 1024)((3,), (128,), ("z",))
    K.kernel("gemm", "gemm_64x64", smem=150 * 1024)((4,), (128,), ("w",))
    k = modules[("gemm", 0, (), False)].functions["gemm_64x64"]
    assert k.limits == [100 * 1024, 150 * 1024]  # never lowered below a size another launch needs
    assert [launch[3] for launch in k.launches] == [40 * 1024, 100 * 1024, 60 * 1024, 150 * 1024]
    assert k.launches[0][:3] == ((1,), (128,), ("x",))
    K.kernel("norm", "rmsnorm_f32")((1,), (256,), ())
    norm = modules[("norm", 0, (), False)].functions["rmsnorm_f32"]
    assert norm.limits == [] and norm.launches[0][3] == 0


def test_on_amd_kernels_get_no_dynamic_shared_memory(fake_modules, monkeypatch):
    """The portable (AMD) paths use static shared memory only."""
    modules, _ = fake_modules
    monkeypatch.setattr(K, "is_amd", lambda: True)
    K.kernel("moe", "moe_mlp1_fp4_m64", smem=100 * 1024)((1,), (192,), ())
    k = modules[("moe", 0, (), False)].functions["moe_mlp1_fp4_m64"]
    assert k.limits == [] and k.launches[0][3] == 0


def test_compile_all_compiles_each_family_as_the_options_run_it(fake_modules):
    modules, _ = fake_modules
    names = K.compile_all(KernelOptions(wgmma=False, moe_defines=("MOE_ABLATE=2",)))
    assert names == K.families()
    assert set(modules) == {(f, 0, ("MOE_ABLATE=2",) if f == "moe" else (), False) for f in names}
    assert all(m.compiled == 1 for m in modules.values())


# ---- the portable mode (GPTOSS_KERNELS=portable, run.py --kernels portable) -------------------------

def test_portable_mode_from_the_environment_and_by_name():
    portable = KernelOptions(portable=True)
    assert KernelOptions.from_env({"GPTOSS_KERNELS": "portable"}) == portable
    assert KernelOptions.from_env({"GPTOSS_KERNELS": " Portable "}) == portable
    assert KernelOptions.from_env({"GPTOSS_KERNELS": "portable", "GPTOSS_WGMMA": "1"}) == portable
    assert KernelOptions.from_env({"GPTOSS_KERNELS": "auto", "GPTOSS_WGMMA": "0"}) == KernelOptions(wgmma=False)
    assert KernelOptions.from_env({"GPTOSS_KERNELS": ""}) == KernelOptions()
    # an explicit mode (run.py --kernels) wins over GPTOSS_KERNELS; GPTOSS_WGMMA still counts
    assert KernelOptions.from_env({"GPTOSS_KERNELS": "portable"}, mode="auto") == KernelOptions()
    assert KernelOptions.from_env({"GPTOSS_WGMMA": "0"}, mode="auto") == KernelOptions(wgmma=False)
    assert KernelOptions.from_env({}, mode="portable") == portable
    with pytest.raises(ValueError, match="GPTOSS_KERNELS='fast': expected one of auto, portable"):
        KernelOptions.from_env({"GPTOSS_KERNELS": "fast"})
    assert KernelOptions.for_mode("portable").mode == "portable" and KernelOptions().mode == "auto"
    with pytest.raises(ValueError, match="kernel mode"):
        KernelOptions.for_mode("fast")
    assert K.KERNEL_MODES == ("auto", "portable")


@pytest.mark.parametrize("available", [False, True])
def test_portable_resolves_without_wgmma_and_amd_is_always_portable(monkeypatch, available):
    monkeypatch.setattr(K, "wgmma_available", lambda: available)
    monkeypatch.setattr(K, "pdl_available", lambda: available)
    monkeypatch.setattr(K, "is_amd", lambda: False)
    assert KernelOptions(portable=True).resolve() == KernelOptions(wgmma=False, portable=True, pdl=False)
    assert KernelOptions().resolve().portable is False
    with pytest.raises(ValueError, match="portable build has no wgmma"):
        KernelOptions(wgmma=True, portable=True)
    with pytest.raises(TypeError, match="portable"):
        KernelOptions(portable="yes")
    monkeypatch.setattr(K, "is_amd", lambda: True)  # only the portable paths exist there
    assert KernelOptions().resolve() == KernelOptions(wgmma=False, portable=True, pdl=False)


def test_portable_defines_and_arch_per_family():
    """The portable mode adds -DGPTOSS_PORTABLE=1 to every family (the MoE defines after it) and builds
    nothing for sm_90a; the auto mode adds only the MoE defines and builds the wgmma families for sm_90a
    when wgmma is on."""
    portable = KernelOptions(wgmma=False, moe_defines=("MOE_ABLATE=1",), portable=True)
    assert K.PORTABLE_DEFINE == "GPTOSS_PORTABLE=1"
    for family in K.families():
        assert portable.defines(family) == (("GPTOSS_PORTABLE=1", "MOE_ABLATE=1") if family == "moe"
                                            else ("GPTOSS_PORTABLE=1",))
        assert portable.sm90a(family) is False
        auto = KernelOptions(wgmma=True, moe_defines=("MOE_ABLATE=1",))
        assert auto.defines(family) == (("MOE_ABLATE=1",) if family == "moe" else ())
        assert auto.sm90a(family) is (family in K.WGMMA_FAMILIES)


def test_portable_kernels_are_cached_apart_and_get_no_dynamic_shared_memory(fake_modules):
    modules, _ = fake_modules
    portable = KernelOptions(wgmma=False, portable=True)
    K.kernel("gemm", "gemm_64x64", smem=64 * 1024)((1,), (128,), ())
    K.kernel("gemm", "gemm_64x64", smem=64 * 1024, kernels=portable)((1,), (128,), ())
    fast = modules[("gemm", 0, (), False)].functions["gemm_64x64"]
    slow = modules[("gemm", 0, ("GPTOSS_PORTABLE=1",), False)].functions["gemm_64x64"]
    assert fast.launches[0][3] == 64 * 1024 and fast.limits == [64 * 1024]
    assert slow.launches[0][3] == 0 and slow.limits == []
    K.kernel("moe", "moe_mlp1_fp4_m64", kernels=KernelOptions(wgmma=True, moe_defines=("X=1",)))
    assert ("moe", 0, ("X=1",), True) in modules
    with pytest.raises(ValueError, match="portable build has no sm_90a"):
        K.kernel("gemm", "gemm_64x64", sm90a=True, kernels=portable)


def test_compile_all_portable_builds_every_family_with_the_define(fake_modules):
    modules, _ = fake_modules
    names = K.compile_all(KernelOptions(portable=True))
    assert set(modules) == {(f, 0, ("GPTOSS_PORTABLE=1",), False) for f in names}


def test_the_define_reaches_the_compiler_options(monkeypatch):
    """_module hands NVRTC/hiprtc -DGPTOSS_PORTABLE=1 (so CuPy's disk cache keys the portable binary
    apart too: the options are part of its key)."""
    import cupy

    seen = []
    monkeypatch.setattr(cupy, "RawModule", lambda code, options: seen.append(options) or object())
    K._module.cache_clear()
    try:
        K._module("norm", 0, KernelOptions(portable=True).defines("norm"), False)
        K._module("norm", 0, (), False)
    finally:
        K._module.cache_clear()
    assert seen == [("-std=c++17", "-DGPTOSS_PORTABLE=1"), ("-std=c++17",)]


def test_run_py_kernels_flag(monkeypatch):
    import run

    monkeypatch.setenv("GPTOSS_KERNELS", "portable")
    parse = run.build_parser().parse_args
    assert run.kernel_options(parse([])) is None  # the engine reads the environment itself
    assert run.kernel_options(parse(["--kernels", "auto"])) == KernelOptions()
    assert run.kernel_options(parse(["--kernels", "portable"])) == KernelOptions(portable=True)
    with pytest.raises(SystemExit):
        parse(["--kernels", "fast"])
