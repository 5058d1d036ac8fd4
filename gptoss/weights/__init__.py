"""Model weights from any source as one `Weights` object with OpenAI's canonical tensor names.

    base.py         the interface: Weights, TensorInfo, layouts, checks, CheckpointError
    safetensors.py  Hugging Face (and OpenAI original/) checkpoint directories; write_safetensors
    binfile.py      our single-file .bin (docs/BIN_FORMAT.md): reader and writer
    synthetic.py    random weights of any config in memory; writes Hugging Face checkpoints
    mxfp4.py        MXFP4 dequantize / quantize
    bf16.py         bf16 as raw uint16 bit patterns

Arrows run one way: each reader imports base.py (and the format helpers); base.py imports no reader;
this file, which dispatches over the readers, is imported by none of them; nothing here imports the
model, the engine or the ops.
"""
from __future__ import annotations

from pathlib import Path

from ..config import PRESETS
from .base import (DTYPES, EXPERT_FORMATS, CheckpointError, TensorInfo, TensorSpec, Weights, canonical_layout,
                   hf_layout, nbytes_of)
from .binfile import BinWeights, write_bin
from .safetensors import SafetensorsWeights, config_from_dict, config_from_json, write_safetensors
from .synthetic import SyntheticWeights, holds_checkpoint, random_weights, write_hf_checkpoint

__all__ = ["DTYPES", "EXPERT_FORMATS", "BinWeights", "CheckpointError", "SafetensorsWeights", "SyntheticWeights",
           "TensorInfo", "TensorSpec", "Weights", "canonical_layout", "config_from_dict", "config_from_json",
           "hf_layout", "holds_checkpoint", "nbytes_of", "open_weights", "random_weights", "write_bin",
           "write_hf_checkpoint", "write_safetensors", "SYNTHETIC_PREFIX"]

SYNTHETIC_PREFIX = "synthetic:"  # synthetic:PRESET names random weights of a preset's shape


def open_weights(path) -> Weights:
    """A .bin file, a Hugging Face checkpoint directory, an original/ directory, or `synthetic:PRESET`
    (e.g. synthetic:gpt-oss-20b: random weights of that shape made in memory, seed 0, MXFP4 experts; for
    benchmarks of shapes whose files would not fit on disk) -> Weights.

    Raises CheckpointError (one line naming the file and the problem) for anything unusable."""
    if str(path).startswith(SYNTHETIC_PREFIX):
        preset = str(path)[len(SYNTHETIC_PREFIX):]
        if preset not in PRESETS:
            raise CheckpointError(f"{path}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        return random_weights(PRESETS[preset], "mxfp4", seed=0)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_file() and path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: pass the checkpoint directory (with config.json), not one safetensors file")
    if path.is_file():
        return BinWeights(path)
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors and (path / "original").is_dir():
        path = path / "original"
    return SafetensorsWeights(path)
