import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# tiktoken finds o200k_base in the shared copy (named by the sha1 of its download URL), never the network.
_SHARED_TOKENIZER = ROOT.parent / "shared" / "tokenizer"
if "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = str(ROOT / ".cache" / "tiktoken")
    # Link the shared copy into that (git-ignored) cache so tiktoken.get_encoding("o200k_harmony"),
    # the tests' reference, loads offline. Where neither exists the tests that need it skip.
    _cached = ROOT / ".cache" / "tiktoken" / "fb374d419588a4632f3f557e76b4b70aebbca790"
    if (_SHARED_TOKENIZER / "o200k_base.tiktoken").is_file() and not _cached.exists():
        _cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            _cached.symlink_to(_SHARED_TOKENIZER / "o200k_base.tiktoken")
        except FileExistsError:  # another pytest process linked it first
            pass


def pytest_collection_modifyitems(config, items):
    from gptoss.kernels import gpu_available

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no GPU (CuPy found no device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
