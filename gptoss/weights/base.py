"""The weights interface every reader implements: `Weights` (named tensors with OpenAI's canonical names),
`TensorInfo`, the canonical and Hugging Face layouts a config implies, the check of found tensors
against a layout, and `CheckpointError`, the one-line error every reader raises for an unusable file.

The readers (safetensors.py, binfile.py, synthetic.py) import this module; it imports none of them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import GptossError
from .bf16 import from_bf16_bits
from .mxfp4 import dequantize


class CheckpointError(GptossError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem in one line."""

    def __init__(self, message: str):
        # names and values quoted from a damaged file may hold newlines or terminal escapes: show them escaped
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


def parse_json(text):
    """json.loads, with nesting too deep for the parser reported as the ValueError every other flaw is."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def is_count(value) -> bool:
    """A JSON integer >= 0 (a size, a dimension or an offset); bools, floats and strings are not."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- dtypes ---------------------------------------------------------------------------------------

# our dtype string -> (NumPy dtype of raw(), bytes per element)
DTYPES = {"bf16": (np.dtype("<u2"), 2), "f32": (np.dtype("<f4"), 4), "u8": (np.dtype("u1"), 1)}
FLOAT = ("bf16", "f32")
EXPERT_FORMATS = ("mxfp4", "bf16")


def nbytes_of(dtype: str, shape) -> int:
    return int(math.prod(shape)) * DTYPES[dtype][1]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # "bf16" | "f32" | "u8"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass(frozen=True)
class TensorSpec:
    """What a config expects of one tensor: its shape and the dtypes it may have."""
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


# ---- layouts --------------------------------------------------------------------------------------

def canonical_layout(cfg: ModelConfig, experts: str) -> dict[str, TensorSpec]:
    """Every canonical tensor of a model (docs/DESIGN.md's table), in file order."""
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS} (got {experts!r})")
    H, E, I, V = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size, cfg.vocab_size
    u8 = ("u8",)
    layout = {"embedding.weight": TensorSpec((V, H), FLOAT)}
    for i in range(cfg.num_layers):
        b = f"block.{i}."
        layout.update({
            b + "attn.norm.scale": TensorSpec((H,), FLOAT),
            b + "attn.qkv.weight": TensorSpec((cfg.qkv_size, H), FLOAT),
            b + "attn.qkv.bias": TensorSpec((cfg.qkv_size,), FLOAT),
            b + "attn.sinks": TensorSpec((cfg.num_heads,), FLOAT),
            b + "attn.out.weight": TensorSpec((H, cfg.q_size), FLOAT),
            b + "attn.out.bias": TensorSpec((H,), FLOAT),
            b + "mlp.norm.scale": TensorSpec((H,), FLOAT),
            b + "mlp.gate.weight": TensorSpec((E, H), FLOAT),
            b + "mlp.gate.bias": TensorSpec((E,), FLOAT),
        })
        for which, rows, cols in (("mlp1", 2 * I, H), ("mlp2", H, I)):  # [E, out, in]
            w = f"{b}mlp.{which}_weight"
            if experts == "mxfp4":
                layout[w + ".blocks"] = TensorSpec((E, rows, cols // 32, 16), u8)
                layout[w + ".scales"] = TensorSpec((E, rows, cols // 32), u8)
            else:
                layout[w] = TensorSpec((E, rows, cols), FLOAT)
            layout[f"{b}mlp.{which}_bias"] = TensorSpec((E, rows), FLOAT)
    layout["norm.scale"] = TensorSpec((H,), FLOAT)
    layout["unembedding.weight"] = TensorSpec((V, H), FLOAT)
    return layout


@dataclass(frozen=True)
class Recipe:
    """How a canonical tensor is made from Hugging Face tensors: "same" (a rename), "transpose" (swap the
    last two axes: bf16 experts [E, in, out] -> [E, out, in]) or "concat" (q, k, v rows -> qkv)."""
    kind: str
    sources: tuple[str, ...]


def hf_layout(cfg: ModelConfig, experts: str) -> tuple[dict[str, TensorSpec], dict[str, Recipe]]:
    """The Hugging Face tensors of a model (spec table, file order) and each canonical tensor's recipe."""
    canon = canonical_layout(cfg, experts)
    H, E, I = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    hf: dict[str, TensorSpec] = {}
    recipes: dict[str, Recipe] = {}

    def same(canonical: str, name: str):
        hf[name] = canon[canonical]
        recipes[canonical] = Recipe("same", (name,))

    same("embedding.weight", "model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        b, m = f"block.{i}.", f"model.layers.{i}."
        same(b + "attn.norm.scale", m + "input_layernorm.weight")
        for part in ("weight", "bias"):
            names = []
            for proj, rows in (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size)):
                names.append(f"{m}self_attn.{proj}.{part}")
                hf[names[-1]] = TensorSpec((rows, H) if part == "weight" else (rows,), FLOAT)
            recipes[f"{b}attn.qkv.{part}"] = Recipe("concat", tuple(names))
        same(b + "attn.out.weight", m + "self_attn.o_proj.weight")
        same(b + "attn.out.bias", m + "self_attn.o_proj.bias")
        same(b + "attn.sinks", m + "self_attn.sinks")
        same(b + "mlp.norm.scale", m + "post_attention_layernorm.weight")
        same(b + "mlp.gate.weight", m + "mlp.router.weight")
        same(b + "mlp.gate.bias", m + "mlp.router.bias")
        for which, proj, rows, cols in (("mlp1", "gate_up_proj", 2 * I, H), ("mlp2", "down_proj", H, I)):
            w, x = f"{b}mlp.{which}_weight", f"{m}mlp.experts.{proj}"
            if experts == "mxfp4":
                same(w + ".blocks", x + "_blocks")
                same(w + ".scales", x + "_scales")
            else:  # HF stores bf16 experts [E, in, out]
                hf[x] = TensorSpec((E, cols, rows), FLOAT)
                recipes[w] = Recipe("transpose", (x,))
            same(f"{b}mlp.{which}_bias", x + "_bias")
    same("norm.scale", "model.norm.weight")
    same("unembedding.weight", "lm_head.weight")
    return hf, recipes


# ---- the Weights interface ------------------------------------------------------------------------

class Weights:
    """Named tensors of one model (canonical names, docs/DESIGN.md). Subclasses give `config`,
    `experts_format`, `source` (for messages), `names()`, `info()` and `raw()`."""

    config: ModelConfig
    experts_format: str
    source: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def raw(self, name: str) -> np.ndarray:
        """bf16 as uint16 bit patterns, u8 as uint8, f32 as float32 (a read-only view where possible)."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def f32(self, name: str) -> np.ndarray:
        """A float32 copy of a bf16 or f32 tensor."""
        info = self.info(name)
        if info.dtype == "bf16":
            return from_bf16_bits(self.raw(name))
        if info.dtype == "f32":
            return np.array(self.raw(name), dtype=np.float32)
        raise TypeError(f"{name} is {info.dtype}, not a float tensor (use expert_weights_f32 for MXFP4 experts)")

    def expert_weights_f32(self, layer: int, which: str) -> np.ndarray:
        """One layer's mlp1 ([E, 2I, H]) or mlp2 ([E, H, I]) expert weights, dequantized to float32."""
        if which not in ("mlp1", "mlp2"):
            raise ValueError(f"which must be 'mlp1' or 'mlp2' (got {which!r})")
        name = f"block.{layer}.mlp.{which}_weight"
        if self.experts_format == "mxfp4":
            return dequantize(self.raw(name + ".blocks"), self.raw(name + ".scales"))
        return self.f32(name)

    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.names())

    def _unknown(self, name: str) -> KeyError:
        return KeyError(f"{self.source}: no tensor {name!r} (names are canonical, e.g. block.0.attn.qkv.weight)")


def check_tensors(found: dict[str, tuple[str, tuple]], expected: dict[str, TensorSpec], where, missing_in: str,
                  cfg: ModelConfig) -> None:
    """Raise CheckpointError for the first missing, misshapen, mistyped or unexpected tensor.

    found: name -> (dtype, shape); where(name) -> the file holding a found tensor; missing_in: the file
    (or index) a missing tensor should have been in."""
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{missing_in}: {missing[0]} is missing{more}; config.json describes "
                              f"{cfg.num_layers} layers, {cfg.num_experts} experts")
    for name, spec in expected.items():
        dtype, shape = found[name]
        if tuple(shape) != spec.shape:
            raise CheckpointError(f"{where(name)}: {name} has shape {list(shape)}, config expects "
                                  f"{list(spec.shape)}")
        if dtype not in spec.dtypes:
            raise CheckpointError(f"{where(name)}: {name} has dtype {dtype}, expected "
                                  f"{' or '.join(spec.dtypes)}")
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where(unexpected[0])}: unexpected tensor {unexpected[0]}{more}; config.json "
                              f"describes {cfg.num_layers} layers, {cfg.num_experts} experts")
