"""tools/compile_kernels.py: every kernel family compiles for NVIDIA sm_90 (nvcc), its portable build for
sm_90 (-DGPTOSS_PORTABLE=1), and AMD gfx90a (hipcc); the portable build holds no NVIDIA-only instruction.

Where a compiler is missing the compile tests skip, except under CI (the environment variable CI set),
where they fail: CI must never pass without having compiled the kernels.
"""
import importlib.util
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "compile_kernels.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("compile_kernels", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compile_kernels"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def need_compilers(*names):
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        message = f"{', '.join(missing)} not found on PATH"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must compile the kernels (install nvcc 13 and Debian's hipcc)")
        pytest.skip(message)


def test_every_family_compiles_for_both_targets():
    need_compilers("nvcc", "hipcc")
    from gptoss.kernels import WGMMA_FAMILIES, families

    proc = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("sm_90", "sm_90a", "sm_90-portable", "gfx90a"):
            status[parts[0], parts[1]] = parts[2]
    expected = ({(f, t) for f in families() for t in ("sm_90", "sm_90-portable", "gfx90a")}
                | {(f, "sm_90a") for f in WGMMA_FAMILIES})
    assert families(), "no kernel families found"
    assert set(status) == expected
    assert all(s == "ok" for s in status.values()), status


BROKEN = """
#include "common.h"
extern "C" __global__ void broken(float* out) { out[threadIdx.x] = undefined_symbol_xyz; }
"""


@pytest.mark.parametrize("target,compiler", [("sm_90", "nvcc"), ("gfx90a", "hipcc")])
def test_a_compile_error_is_reported_with_the_message(target, compiler):
    need_compilers(compiler)
    tool = load_tool()
    from gptoss.kernels import KERNEL_DIR

    source = BROKEN.replace('#include "common.h"', (KERNEL_DIR / "common.h").read_text())
    result = tool.compile_one("broken", source, target)
    assert not result.ok and not result.missing
    assert "undefined_symbol_xyz" in result.output


@pytest.mark.parametrize("target,compiler", [("sm_90", "nvcc"), ("gfx90a", "hipcc")])
def test_resource_report_lists_each_kernel(target, compiler):
    need_compilers(compiler)
    tool = load_tool()
    from gptoss.kernels import expanded_source

    result = tool.compile_one("sampling", expanded_source("sampling"), target, report=True)
    assert result.ok, result.output
    assert set(result.kernels) >= {"sample_rows", "argmax_rows"}
    sample = result.kernels["sample_rows"]
    assert sample["registers"] > 0 and sample["smem"] >= 8 * 1024  # the 1024-bin u64 histogram
    assert sample["spills"] == 0


@pytest.mark.parametrize("family", ["moe", "gemm"])
def test_sm90a_build_has_the_wgmma_kernels(family):
    """The sm_90a pass of the moe and gemm families defines the wgmma variants ops/ picks on H100/H200,
    and they assemble to wgmma without ptxas serializing them (its C7513 remark); the sm_90 pass has
    none of them."""
    need_compilers("nvcc")
    tool = load_tool()
    from gptoss.kernels import WGMMA_FAMILIES, expanded_source
    from gptoss.ops import gemm, moe

    assert family in WGMMA_FAMILIES
    variants = {"moe": {name for name, v in moe.VARIANTS.items() if v.sm90a},
                "gemm": {f"gemm_{name}" for name, v in gemm.VARIANTS.items() if v.wgmma}}[family]
    result = tool.compile_one(family, expanded_source(family), "sm_90a", report=True)
    assert result.ok, result.output
    assert variants and variants <= set(result.kernels)
    assert "serializ" not in result.output.lower(), result.output
    plain = tool.compile_one(family, expanded_source(family), "sm_90", report=True)
    assert plain.ok and not variants & set(plain.kernels)


def test_clean_output_keeps_ptxas_performance_remarks():
    """The serialization check above reads clean_output, which drops ptxas's resource lines: the
    performance remarks (also "ptxas info" lines) must survive it."""
    tool = load_tool()
    remark = ("ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are "
              "serialized due to non wgmma instructions defining input registers of a wgmma")
    out = tool.clean_output(PTXAS + remark + "\n")
    assert "serialized" in out and "Used 56 registers" not in out


def test_missing_compiler_fails_unless_skipped(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # an empty folder: no nvcc, no hipcc
    cmd = [sys.executable, str(TOOL), "--families", "embed"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "nvcc not found" in proc.stdout and "hipcc not found" in proc.stdout
    proc = subprocess.run(cmd + ["--skip-missing"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIP" in proc.stdout


def test_unknown_family_is_an_error():
    proc = subprocess.run([sys.executable, str(TOOL), "--families", "no_such_family", "--skip-missing"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no_such_family" in proc.stderr


PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'sample_rows' for 'sm_90'
ptxas info    : Function properties for sample_rows
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 8732 bytes smem
ptxas info    : Compiling entry function 'gemm_big' for 'sm_90'
ptxas info    : Function properties for gemm_big
    48 bytes stack frame, 40 bytes spill stores, 60 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""

AMD = """\
x.hip:1:1: remark: Function Name: argmax_rows [-Rpass-analysis=kernel-resource-usage]
x.hip:1:1: remark:     SGPRs: 22 [-Rpass-analysis=kernel-resource-usage]
x.hip:1:1: remark:     VGPRs: 12 [-Rpass-analysis=kernel-resource-usage]
x.hip:1:1: remark:     AGPRs: 0 [-Rpass-analysis=kernel-resource-usage]
x.hip:1:1: remark:     ScratchSize [bytes/lane]: 16 [-Rpass-analysis=kernel-resource-usage]
x.hip:1:1: remark:     Occupancy [waves/SIMD]: 8 [-Rpass-analysis=kernel-resource-usage]
x.hip:1:1: remark:     SGPRs Spill: 2 [-Rpass-analysis=kernel-resource-usage]
x.hip:1:1: remark:     VGPRs Spill: 3 [-Rpass-analysis=kernel-resource-usage]
x.hip:1:1: remark:     LDS Size [bytes/block]: 256 [-Rpass-analysis=kernel-resource-usage]
"""


def test_report_parsers():
    tool = load_tool()
    nv = tool.parse_ptxas(PTXAS)
    assert nv["sample_rows"] == {"registers": 56, "smem": 8732, "stack": 0, "spills": 0}
    assert nv["gemm_big"] == {"registers": 255, "smem": 0, "stack": 48, "spills": 100}
    amd = tool.parse_amd_report(AMD)
    assert amd["argmax_rows"] == {"registers": 12, "sgprs": 22, "smem": 256, "stack": 16, "spills": 5,
                                  "occupancy": 8}
    # the report lines are parsed, not echoed as compiler messages
    assert tool.clean_output(PTXAS + AMD).strip() == ""


# ---- the portable build (KernelOptions.portable: -DGPTOSS_PORTABLE=1) -------------------------------

# PTX of NVIDIA-only code: tensor cores, async copies, TMA, mbarriers, warp-synchronous intrinsics (the
# portable paths may use full-warp shuffles only, shfl.sync with every lane: AMD's __shfl / __shfl_xor)
NVIDIA_ONLY_PTX = ("mma.sync", "wgmma", "ldmatrix", "cp.async", "mbarrier", "match.any", "match.all",
                   "vote.", "bar.warp.sync", "redux.sync", "activemask")

FAST_PATH_SOURCE = """
#if GPTOSS_NVIDIA || GPTOSS_HAS_MMA || GPTOSS_HAS_WGMMA
#error "an NVIDIA fast path is on"
#endif
#if WARP_SIZE != 32
#error "NVIDIA's warp is 32 wide"
#endif
extern "C" __global__ void probe(float* out) { out[threadIdx.x] = WARP_SIZE; }
"""


def ptx(family: str, portable: bool, tmp_path) -> str:
    from gptoss.kernels import PORTABLE_DEFINE, expanded_source

    tool = load_tool()
    src = tmp_path / f"{family}.cu"
    src.write_text(tool.prepare_source(expanded_source(family)))
    out = tmp_path / f"{family}{'.portable' if portable else ''}.ptx"
    cmd = ["nvcc", "-x", "cu", "-arch=sm_90", "-std=c++17", "-ptx", str(src), "-o", str(out)]
    proc = subprocess.run(cmd + ([f"-D{PORTABLE_DEFINE}"] if portable else []), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_text()


@pytest.mark.parametrize("arch", ["-arch=sm_90", "-gencode=arch=compute_90a,code=sm_90a"])
def test_the_portable_define_turns_every_nvidia_fast_path_off(tmp_path, arch):
    """With -DGPTOSS_PORTABLE=1 common.h defines none of GPTOSS_NVIDIA, GPTOSS_HAS_MMA, GPTOSS_HAS_WGMMA
    even for sm_90a (where all three are on without it), and WARP_SIZE stays the hardware's 32."""
    need_compilers("nvcc")
    from gptoss.kernels import KERNEL_DIR, PORTABLE_DEFINE

    src = tmp_path / "probe.cu"
    src.write_text((KERNEL_DIR / "common.h").read_text() + FAST_PATH_SOURCE)
    cmd = ["nvcc", "-x", "cu", arch, "-std=c++17", "-c", str(src), "-o", str(tmp_path / "probe.o")]
    on = subprocess.run(cmd + [f"-D{PORTABLE_DEFINE}"], capture_output=True, text=True, timeout=300)
    assert on.returncode == 0, on.stdout + on.stderr
    off = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert off.returncode != 0 and "an NVIDIA fast path is on" in off.stdout + off.stderr


@pytest.mark.parametrize("family", ["gemm", "moe", "attention", "routing"])
def test_portable_build_has_no_nvidia_only_instruction_and_every_kernel_the_ops_launch(family, tmp_path):
    """The portable build of each family with NVIDIA fast paths assembles to PTX without tensor-core,
    async-copy, TMA or warp-synchronous instructions (its fast build has them: the check can see them),
    and it defines every kernel the ops launch in the portable mode: every variant but the sm_90a ones."""
    need_compilers("nvcc")
    from gptoss.ops import gemm, moe

    fast, portable = ptx(family, False, tmp_path), ptx(family, True, tmp_path)
    found = [op for op in NVIDIA_ONLY_PTX if op in portable]
    assert not found, f"{family}: NVIDIA-only PTX in the portable build: {found}"
    assert any(op in fast for op in NVIDIA_ONLY_PTX)
    entries = set(re.findall(r"\.entry\s+(\w+)", portable))
    launched = {"gemm": {f"gemm_{n}" for n, v in gemm.VARIANTS.items() if not v.wgmma},
                "moe": {n for n, v in moe.VARIANTS.items() if not v.sm90a},
                "attention": {"rope_and_cache", "attn_simple", "copy_kv_rows"},
                "routing": {"router_logits", "router_logits_f32", "router_topk", "router_topk_summed", "moe_dispatch",
                            "moe_combine_add", *(f"router_sums_{n}{f}" for n in moe.ROUTER_TILES
                                                 for f in ("", "_f32"))}}[family]
    assert launched <= entries, sorted(launched - entries)
