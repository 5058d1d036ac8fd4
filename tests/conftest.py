import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# tiktoken's own o200k_harmony (the tests' reference) loads offline: its cache, a git-ignored folder of
# the repository, holds the shipped vocabulary under tiktoken's name for it (the sha1 of its download URL).
_TIKTOKEN_CACHE = ROOT / ".cache" / "tiktoken"
os.environ["TIKTOKEN_CACHE_DIR"] = str(_TIKTOKEN_CACHE)
_cached = _TIKTOKEN_CACHE / "fb374d419588a4632f3f557e76b4b70aebbca790"
if not _cached.is_file():
    _TIKTOKEN_CACHE.mkdir(parents=True, exist_ok=True)
    _partial = _cached.with_name(f"{_cached.name}.{os.getpid()}.tmp")
    shutil.copyfile(ROOT / "gptoss" / "data" / "o200k_base.tiktoken", _partial)
    os.replace(_partial, _cached)  # atomic: a parallel pytest never reads half a file


@pytest.fixture(scope="session")
def tiny_bin(tmp_path_factory):
    """The TINY config's random MXFP4 weights (seed 5) as a .bin file: the getp tests' model."""
    from gptoss.weights import random_weights, write_bin

    path = tmp_path_factory.mktemp("tiny_bin") / "tiny.bin"
    write_bin(path, random_weights(_tiny(), "mxfp4", seed=5))
    return path


def _tiny():
    from gptoss.config import TINY

    return TINY


@pytest.fixture
def id_prompts(tmp_path):
    """write(lengths) -> a prompts file in tmp_path of random TINY token ids (seed 1), one line per length."""
    import numpy as np

    def write(lengths):
        rng = np.random.default_rng(1)
        path = tmp_path / "prompts.txt"
        path.write_text("".join(" ".join(map(str, rng.integers(0, _tiny().vocab_size, n))) + "\n" for n in lengths))
        return path
    return write


def pytest_addoption(parser):
    parser.addoption("--kernels", choices=("auto", "portable"), default=None,
                     help="GPU kernel mode the GPU tests run (sets GPTOSS_KERNELS; default: the environment's)")


def pytest_configure(config):
    # before any test (and any xdist worker, which inherits the environment) resolves the ops' default
    mode = config.getoption("--kernels")
    if mode is not None:
        os.environ["GPTOSS_KERNELS"] = mode


def pytest_report_header(config):
    return f"GPU kernel mode: {os.environ.get('GPTOSS_KERNELS') or 'auto'} (GPTOSS_KERNELS / --kernels)"


def pytest_collection_modifyitems(config, items):
    from gptoss.kernels import gpu_available

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no GPU (CuPy found no device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """One line per skip reason, with its count (pytest's -rs prints one per test location)."""
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.write_sep("-", "skipped tests, by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count} skipped: {reason}")
