"""`pip install .` installs the gptoss package with its kernel sources and the o200k vocabulary."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_gptoss_with_its_kernels_and_vocabulary(tmp_path):
    # Build from a copy, so no build/ or egg-info lands in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gptoss", src / "gptoss", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("gptoss-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    packaged = {n for n in names if not n.startswith("gptoss-")}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gptoss").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert packaged == expected  # every source, kernel and data file of gptoss/, and nothing else
    assert {"gptoss/__init__.py", "gptoss/kernels/moe.hip", "gptoss/kernels/common.h",
            "gptoss/data/o200k_base.tiktoken"} <= packaged

    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
    runtime = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {r.replace(" ", "") for r in requires} == {r.replace(" ", "") for r in runtime}
