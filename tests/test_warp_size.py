"""No portable kernel assumes a 32-wide warp (AMD CDNA runs wave64): a static scan of every kernel source.

The scan reads each file of gptoss/kernels (*.hip and the headers pasted into them) as an AMD compiler
sees it: the NVIDIA-only blocks (`#if GPTOSS_NVIDIA`, `GPTOSS_HAS_MMA`, `GPTOSS_HAS_WGMMA`, and the CUDA
branch of common.h's vendor switch) are left out; every other conditional keeps both branches. Comments
and string literals are blanked. In what is left, these fail the test:
  - a literal 32 or 31 (warp width, lane mask), a `>> 5` / `<< 5` (divide or multiply by 32),
    0xffffffff (a full 32-lane mask);
  - NVIDIA warp intrinsics (__ballot_sync, __shfl_*_sync, __match_*, __syncwarp, __activemask, __any_sync,
    ...) and the run-time `warpSize`: the portable code uses WARP_SIZE, WARP_SHFL and WARP_SHFL_XOR;
unless the line is in ALLOWED, each entry with the reason that 32 is not the warp width there. An entry
that no longer matches any line fails too, so the list stays exact.
"""
import re
from pathlib import Path

from gptoss.kernels import KERNEL_DIR

# conditions whose #if branch is NVIDIA-only code (its #else, if any, is the portable path)
NVIDIA_ONLY = re.compile(r"\bGPTOSS_(NVIDIA|HAS_MMA|HAS_WGMMA|CUDA)\b|__CUDA_ARCH")
# common.h's vendor switch: its #if branch is AMD, its #else CUDA
AMD_SWITCH = re.compile(r"defined\(__HIPCC__\)")

SUSPECT = [
    (re.compile(r"(?<![\w.])(32|31)(?![\w.])"), "literal 32/31"),
    (re.compile(r"(>>|<<)\s*5\b"), "shift by 5"),
    (re.compile(r"0x[fF]{8}"), "32-lane mask"),
    (re.compile(r"\b__(ballot\w*|shfl\w*_sync|match_\w+|syncwarp|activemask|any_sync|all_sync|reduce_\w+_sync)\b"),
     "NVIDIA warp intrinsic"),
    (re.compile(r"\bwarpSize\b"), "run-time warpSize"),
]

# (file, regex on the stripped line, why this 32 is not the warp width)
ALLOWED = [
    ("routing.hip", r"#define ROUTER_(SPLITS|TT|TE|HC) 32", "router tile sizes (H slices, tokens, experts, h per "
     "chunk): no warp-level primitive in router_logits"),
    ("routing.hip", r"#define DISPATCH_CACHE 32", "register cache depth of the dispatch (steps per warp), any width"),
    ("routing.hip", r"^ROUTER_SUMS_KERNEL\(", "tile shapes of the router_sums table (tokens, experts per CTA), "
     "not warp widths: no warp-level primitive in router_sums_tile"),
    ("moe.hip", r"K/32|K / 32|k0 / 32|% 32|KB \* 32|kb \* 32", "MXFP4: 32 values per block and scale"),
    ("moe.hip", r"#define MOE_PORTABLE_BK 32", "portable MoE k chunk = one MXFP4 block of 32 values"),
    ("moe.hip", r"__launch_bounds__\(32 \* WARPS_N\)|32 \* \(WARPS_N\)",
     "block size of a variant = its tensor-core layout's warps x 32; the portable body only needs a "
     "multiple of MOE_PORTABLE_TY threads (no warp-level primitive)"),
    ("gemm.hip", r"THREADS = 32 \* WM \* WN|__launch_bounds__\(32 \* \(WM\) \* \(WN\)",
     "block size of a variant = its mma.sync layout's warps x 32; the portable body uses only __syncthreads"),
    ("gemm.hip", r"^GEMM_KERNEL\(", "tile shapes of the variant table (BM, BN, BK), not warp widths"),
    ("sampling.hip", r"v >> 32|<< 32\) \| lo", "64-bit shuffles: the two 32-bit halves of a u64"),
]


def strip_comments_and_strings(text: str) -> str:
    """Comments and string/char literals blanked, newlines kept (so line numbers stay)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', blank, text, flags=re.S)


def portable_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the code an AMD compile keeps (see the module docstring)."""
    kept, stack = [], []  # stack of (is this branch dropped, drop the #else branch)
    lines = strip_comments_and_strings(text).split("\n")
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):  # one logical line
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        i += 1
        d = re.match(r"\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b(.*)", line)
        dropped = any(frame[0] for frame in stack)
        if d:
            kind, cond = d.groups()
            if kind in ("if", "ifdef", "ifndef"):
                negated = kind == "ifndef" or cond.strip().startswith("!")
                if AMD_SWITCH.search(cond):
                    stack.append([False, True])
                elif NVIDIA_ONLY.search(cond) and not negated:
                    stack.append([True, False])
                elif NVIDIA_ONLY.search(cond):  # `#if !GPTOSS_...`: the #else is the NVIDIA side
                    stack.append([False, True])
                else:
                    stack.append([False, False])
            elif kind in ("else", "elif"):
                stack[-1][0] = stack[-1][1]
            else:
                stack.pop()
            continue
        if not dropped:
            kept.append((number, line))
    assert not stack, "unbalanced #if"
    return kept


def sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.hip")) + sorted(KERNEL_DIR.glob("*.h"))


def findings():
    """(file, line number, line, what, allowed-entry index or None) of every suspect in portable code."""
    out = []
    for path in sources():
        for number, line in portable_lines(path.read_text()):
            for pattern, what in SUSPECT:
                if pattern.search(line):
                    entry = next((k for k, (name, rx, _) in enumerate(ALLOWED)
                                  if name == path.name and re.search(rx, line.strip())), None)
                    out.append((path.name, number, line.strip(), what, entry))
    return out


def test_no_portable_kernel_hard_codes_the_warp_width():
    bad = [f"{name}:{n}: {what}: {line}" for name, n, line, what, entry in findings() if entry is None]
    assert not bad, "a portable path assumes 32 lanes (use WARP_SIZE / BLOCK_SCRATCH, or allow it here " \
                    "with the reason):\n" + "\n".join(bad)


def test_every_allowed_entry_still_matches_portable_code():
    used = {entry for *_, entry in findings() if entry is not None}
    stale = [ALLOWED[k][:2] for k in range(len(ALLOWED)) if k not in used]
    assert not stale, f"allowlist entries that match nothing (remove them): {stale}"


def test_the_scan_sees_what_it_must():
    """The scanner flags each kind of mistake in portable code and ignores NVIDIA-only blocks."""
    text = """
#if GPTOSS_HAS_MMA
    const int lane = tid & 31;          // NVIDIA-only: fine
#else
    const int lane = tid & 31;          // portable: flagged
#endif
#if GPTOSS_NVIDIA
    unsigned m = __ballot_sync(0xffffffffu, p);
#else
    unsigned m = __ballot_sync(0xffffffffu, p);
    __shared__ float s[32];
    int w = tid >> 5;
    int n = warpSize;
#endif
#if defined(__HIPCC__)
  #define WARP_SIZE 64
#else
  #define WARP_SIZE 32
#endif
// a comment with 32 is fine
"""
    kept = portable_lines(text)
    flagged = {what for _, line in kept for pattern, what in SUSPECT if pattern.search(line)}
    assert flagged == {"literal 32/31", "shift by 5", "32-lane mask", "NVIDIA warp intrinsic", "run-time warpSize"}
    numbers = [n for n, line in kept if any(p.search(line) for p, _ in SUSPECT)]
    assert numbers == [5, 10, 11, 12, 13]  # the #else branches only; not the CUDA WARP_SIZE, not the comment


def test_warp_size_comes_from_the_portability_header():
    """WARP_SIZE is 64 for AMD and 32 for NVIDIA in common.h, and the host's warp_size() agrees."""
    from gptoss import kernels as K

    text = (KERNEL_DIR / "common.h").read_text()
    amd, cuda = text.split("#else", 1)
    assert "#define WARP_SIZE 64" in amd and "#define WARP_SIZE 32" in cuda.split("#endif")[0]
    assert K.warp_size() == (64 if K.is_amd() else 32)
    assert "#define BLOCK_SCRATCH (1024 / WARP_SIZE)" in text
