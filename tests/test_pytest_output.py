"""What `python -m pytest` prints is readable: skips are summed up by reason, one short line each."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_skips_are_one_line_per_reason():
    # No visible device: the GPU tests of this file skip on any machine.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="", ROCR_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/gpu/test_sampling_gpu.py", "tests/test_config.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if line.startswith("SKIPPED [")]  # pytest's per-location lines
    summary = [line for line in lines if " skipped: " in line]
    assert len(summary) == 1 and summary[0].endswith("skipped: no GPU (CuPy found no device)")
    skipped = int(summary[0].split()[0])
    assert skipped > 0 and f"passed, {skipped} skipped" in lines[-1]
    assert max(map(len, lines)) <= 120
