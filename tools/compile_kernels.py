#!/usr/bin/env python3
"""Compile every kernel family in gptoss/kernels for NVIDIA sm_90 (nvcc) and AMD gfx90a (hipcc), every
family's portable build (-DGPTOSS_PORTABLE=1, the code `--kernels portable` runs) for sm_90, and the
families with wgmma kernels (gptoss.kernels.WGMMA_FAMILIES) for sm_90a too, without a GPU.

  python tools/compile_kernels.py [--ptxas-report] [--families a,b]
                                  [--targets sm_90,sm_90a,sm_90-portable,gfx90a]
                                  [--skip-missing] [--keep DIR] [-j N] [-v]

Each family's source is compiled as cupy.RawModule sees it (gptoss.kernels.expanded_source: our headers
pasted in), with -std=c++17:
  sm_90:  nvcc -x cu -arch=sm_90 -c
  sm_90a: nvcc -x cu -gencode=arch=compute_90a,code=sm_90a -cubin (device code only: the wgmma kernels
          exist only in the sm_90a pass, so a host stub pass would not find them)
  sm_90-portable: nvcc -x cu -arch=sm_90 -DGPTOSS_PORTABLE=1 -c (NVIDIA-only code off: what NVRTC builds
          for the portable mode on an H100/H200)
  gfx90a: HIP_PLATFORM=amd hipcc --offload-arch=gfx90a --cuda-device-only -x hip -c
(MI300's gfx942 is not a target: Debian's hipcc runs clang 15, which does not know gfx942.)
One line per (family, target): ok or FAIL, then the compiler's messages on a failure (and its warnings
with -v). --ptxas-report adds registers, shared memory, stack and spills per kernel for both targets.
Line numbers in messages refer to the expanded source: --keep DIR writes it there.
The exit status is 1 if any compile fails or a compiler is missing (unless --skip-missing), 2 for a bad
option (README, "Exit status"), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptoss.cli import run_main  # noqa: E402
from gptoss.kernels import PORTABLE_DEFINE, WGMMA_FAMILIES, expanded_source, families  # noqa: E402

TARGETS = ("sm_90", "sm_90a", "sm_90-portable", "gfx90a")
COMPILER = {"sm_90": "nvcc", "sm_90a": "nvcc", "sm_90-portable": "nvcc", "gfx90a": "hipcc"}
PORTABLE_TARGET = "sm_90-portable"


@dataclass
class Result:
    family: str
    target: str
    ok: bool
    output: str = ""  # the compiler's stdout + stderr, noise removed
    kernels: dict = field(default_factory=dict)  # kernel -> {registers, smem, stack, spills}
    missing: bool = False


def compile_command(target: str, compiler: str, src: Path, obj: Path, report: bool) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if target.startswith("sm_"):
        arch = ["-gencode=arch=compute_90a,code=sm_90a", "-cubin"] if target == "sm_90a" else ["-arch=sm_90", "-c"]
        if target == PORTABLE_TARGET:
            arch.append(f"-D{PORTABLE_DEFINE}")
        cmd = [compiler, "-x", "cu", *arch, "-std=c++17", str(src), "-o", str(obj)]
        if report:
            cmd += ["-Xptxas", "-v"]
    else:
        env["HIP_PLATFORM"] = "amd"
        cmd = [compiler, "--offload-arch=gfx90a", "--cuda-device-only", "-x", "hip", "-std=c++17", "-c", str(src),
               "-o", str(obj)]
        if report:
            cmd += ["-Rpass-analysis=kernel-resource-usage"]
    return cmd, env


def prepare_source(text: str) -> str:
    # The expansion pastes each header once, so `#pragma once` is a no-op in it; compilers warn about it
    # in a main file. Blank it out (keeping line numbers).
    return re.sub(r"^[ \t]*#pragma[ \t]+once[ \t]*$", "", text, flags=re.M)


def compile_one(family: str, source: str, target: str, compiler: str | None = None, report: bool = False,
                workdir: Path | None = None) -> Result:
    """Compile one source for one target; never raises for compiler errors."""
    compiler = compiler or shutil.which(COMPILER[target])
    if not compiler:
        return Result(family, target, False, f"{COMPILER[target]} not found on PATH", missing=True)
    with tempfile.TemporaryDirectory(prefix=f"gptoss-{family}-{target}-") as tmp:
        where = Path(workdir or tmp)
        src = where / f"{family}.{'cu' if target.startswith('sm_') else 'hip'}"
        src.write_text(prepare_source(source))
        cmd, env = compile_command(target, compiler, src, Path(tmp) / f"{family}.o", report)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return Result(family, target, False, f"timed out: {' '.join(cmd)}")
        except OSError as e:
            return Result(family, target, False, f"could not run {compiler}: {e}", missing=True)
    text = proc.stdout + proc.stderr
    kernels = (parse_ptxas(text) if target.startswith("sm_") else parse_amd_report(text)) if report else {}
    return Result(family, target, proc.returncode == 0, clean_output(text), kernels)


def clean_output(text: str) -> str:
    """Compiler messages without the resource report lines (those are parsed separately)."""
    keep = []
    for line in text.splitlines():
        if (line.startswith("ptxas info") and "Performance Loss" not in line) or "kernel-resource-usage" in line:
            continue  # (ptxas's performance remarks, e.g. C7513 wgmma serialization, stay)
        if re.match(r"^\s*\d+ bytes stack frame", line):
            continue
        keep.append(line)
    # clang prints the remark's source line and a caret under it; drop those leftovers
    out = "\n".join(keep)
    return re.sub(r"\n{3,}", "\n\n", out).strip()


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict:
    """ptxas -v output -> {kernel: {registers, smem, stack, spills}} (spills = store + load bytes)."""
    kernels: dict = {}
    current = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = kernels.setdefault(m.group(1), {"registers": 0, "smem": 0, "stack": 0, "spills": 0})
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            current = kernels.get(m.group(1), current)
            continue
        if current is None:
            continue
        m = _PTXAS_STACK.search(line)
        if m:
            current["stack"] = int(m.group(1))
            current["spills"] = int(m.group(2)) + int(m.group(3))
        m = _PTXAS_USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    return kernels


_AMD_NAME = re.compile(r"remark: Function Name: (\S+)")
_AMD_FIELD = re.compile(r"remark:\s+([A-Za-z][A-Za-z ]*?)(?: \[[^\]]*\])?: (\d+)")


def parse_amd_report(text: str) -> dict:
    """clang -Rpass-analysis=kernel-resource-usage -> {kernel: {registers (VGPRs), sgprs, smem (LDS),
    stack (scratch bytes per lane), spills (VGPR + SGPR spills), occupancy}}."""
    kernels: dict = {}
    current = None
    for line in text.splitlines():
        m = _AMD_NAME.search(line)
        if m:
            current = kernels.setdefault(m.group(1), {"registers": 0, "sgprs": 0, "smem": 0, "stack": 0,
                                                      "spills": 0, "occupancy": 0})
            continue
        m = _AMD_FIELD.search(line)
        if not m or current is None:
            continue
        key, value = m.group(1).strip(), int(m.group(2))
        if key == "VGPRs":
            current["registers"] = value
        elif key == "SGPRs":
            current["sgprs"] = value
        elif key == "LDS Size":
            current["smem"] = value
        elif key == "ScratchSize":
            current["stack"] = value
        elif key in ("VGPRs Spill", "SGPRs Spill"):
            current["spills"] += value
        elif key == "Occupancy":
            current["occupancy"] = value
    return kernels


def format_report(result: Result) -> list[str]:
    lines = []
    for name, k in sorted(result.kernels.items()):
        extra = f"  sgprs {k['sgprs']:3d}  occupancy {k['occupancy']}" if "sgprs" in k else ""
        warn = "  <- SPILLS" if k["spills"] else ""
        lines.append(f"    {name:40s} regs {k['registers']:3d}  smem {k['smem']:6d} B  stack {k['stack']:4d} B  "
                     f"spills {k['spills']:4d} B{extra}{warn}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=None, help="comma-separated subset (default: every *.hip)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--ptxas-report", action="store_true", help="registers, smem, stack and spills per kernel")
    p.add_argument("--skip-missing", action="store_true", help="a missing compiler is not an error")
    p.add_argument("--nvcc", default=None, help="nvcc to use (default: from PATH)")
    p.add_argument("--hipcc", default=None, help="hipcc to use (default: from PATH)")
    p.add_argument("--keep", default=None, help="write the expanded sources into this folder")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2, help="parallel compiles")
    p.add_argument("-v", "--verbose", action="store_true", help="print warnings of successful compiles too")
    args = p.parse_args(argv)

    known = families()
    fams = known if args.families is None else [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(fams) - set(known))
    if unknown:
        print(f"unknown families {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    if not fams:
        print("no kernel families found in gptoss/kernels", file=sys.stderr)
        return 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = sorted(set(targets) - set(TARGETS))
    if bad or not targets:
        print(f"unknown targets {bad}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    nvcc = args.nvcc or shutil.which("nvcc")
    compilers = {"sm_90": nvcc, "sm_90a": nvcc, PORTABLE_TARGET: nvcc, "gfx90a": args.hipcc or shutil.which("hipcc")}

    sources = {f: expanded_source(f) for f in fams}
    keep = Path(args.keep) if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    jobs = []
    for t in targets:
        if not compilers[t]:
            continue
        for f in fams:
            if t == "sm_90a" and f not in WGMMA_FAMILIES:
                continue  # the same code as the sm_90 pass
            workdir = None
            if keep:
                workdir = keep / t
                workdir.mkdir(exist_ok=True)
            jobs.append((f, sources[f], t, compilers[t], args.ptxas_report, workdir))

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda a: compile_one(*a), jobs))

    failed = 0
    for t in targets:
        if not compilers[t]:
            status = "SKIP" if args.skip_missing else "FAIL"
            print(f"{'*':12s} {t:14s} {status}  {COMPILER[t]} not found on PATH")
            failed += 0 if args.skip_missing else 1
    for r in results:
        print(f"{r.family:12s} {r.target:14s} {'ok' if r.ok else 'FAIL'}", flush=True)
        if (not r.ok or args.verbose) and r.output:
            print("\n".join("    " + line for line in r.output.splitlines()))
        if r.ok and args.ptxas_report:
            print("\n".join(format_report(r)))
        failed += not r.ok
    done = sum(r.ok for r in results)
    print(f"{done} of {len(results)} compiles ok" + (f", {failed} problem(s)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main("compile_kernels.py", main))
