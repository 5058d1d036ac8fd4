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


def pytest_collection_modifyitems(config, items):
    from gptoss.kernels import gpu_available

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no GPU (CuPy found no device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
