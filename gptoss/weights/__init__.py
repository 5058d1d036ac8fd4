"""Model weights from any source as one `Weights` object with OpenAI's canonical tensor names."""
from __future__ import annotations

from .base import (DTYPES, EXPERT_FORMATS, CheckpointError, TensorInfo, TensorSpec, Weights, canonical_layout,
                   config_from_dict, config_from_json, hf_layout, nbytes_of, open_weights)
from .binfile import BinWeights, write_bin
from .synthetic import SyntheticWeights, holds_checkpoint, random_weights, write_hf_checkpoint, write_safetensors
