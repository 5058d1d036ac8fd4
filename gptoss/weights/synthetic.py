"""Random gpt-oss weights of any config in the exact real layout: in memory or as a Hugging Face checkpoint.

Each tensor is generated in chunks along its first axis; chunk j of tensor `name` draws from its own
PCG64 stream seeded by (seed, crc32(name), j), so any tensor (or any expert) can be made alone, in any
order, and is the same in memory (`random_weights`) and on disk (`write_hf_checkpoint`).

Scales keep a forward pass well-behaved: the embedding is N(0, 1); linear weights have std 1/sqrt(fan_in)
so each projection of a unit-RMS input is O(1); norm scales are 1 + 0.1 N(0, 1); sinks N(0, 1); biases
N(0, 0.02²); the router std 1/sqrt(H) (logits spread ~1); the unembedding std 3/sqrt(H) (logits std ~3).
MXFP4 experts have uniform random 4-bit codes with block scales chosen so the dequantized values have
std 1/sqrt(fan_in) on average.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .base import TensorInfo, TensorSpec, Weights, canonical_layout, hf_layout, nbytes_of
from .bf16 import to_bf16_bits
from .mxfp4 import FP4_VALUES
from .safetensors import write_safetensors

CHUNK_ELEMENTS = 1 << 22  # elements generated at once (16 MB of float32)
BIAS_STD = 0.02
FP4_MEAN_SQUARE = float(np.mean(FP4_VALUES ** 2))  # 8.5625 for codes uniform over 16: RMS about 2.93


def _rng(seed: int, name: str, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode()), chunk])))


def _chunk_rows(shape: tuple) -> int:
    """Rows (along axis 0) per generated chunk: a function of the shape alone, so chunks are reproducible."""
    row = math.prod(shape[1:])
    return max(1, CHUNK_ELEMENTS // max(row, 1))


def _init(cfg: ModelConfig, name: str) -> tuple[float, float]:
    """(mean, std) of a float tensor's entries."""
    H = cfg.hidden_size
    if name.endswith("norm.scale"):
        return 1.0, 0.1
    if name.endswith("bias"):
        return 0.0, BIAS_STD
    if name.endswith("unembedding.weight"):  # logits of a unit-RMS final state get std 3
        return 0.0, 3.0 / math.sqrt(H)
    if name.endswith(("embedding.weight", "attn.sinks")):
        return 0.0, 1.0
    fan_in = {"attn.qkv.weight": H, "attn.out.weight": cfg.q_size, "mlp.gate.weight": H,
              "mlp1_weight": H, "mlp2_weight": cfg.intermediate_size}
    for suffix, n in fan_in.items():
        if name.endswith(suffix):
            return 0.0, 1.0 / math.sqrt(n)
    raise KeyError(f"no initialisation rule for {name}")


def _scale_exponents(rng: np.random.Generator, shape: tuple, fan_in: int) -> np.ndarray:
    """E8M0 block scales whose dequantized values have variance 1/fan_in in expectation: a mix of two
    neighbouring powers of two, 2^n and 2^(n+1) with probability f, where 4^n (1 + 3 f) = target / 8.5625."""
    r = math.log(1.0 / (fan_in * FP4_MEAN_SQUARE), 4)
    n = math.floor(r)
    f = (4.0 ** (r - n) - 1.0) / 3.0
    up = rng.random(shape) < f
    return (127 + n + up).astype(np.uint8)


def _chunk(cfg: ModelConfig, name: str, spec: TensorSpec, seed: int, j: int) -> np.ndarray:
    """Chunk j (rows [j*rows, (j+1)*rows) along axis 0) of a canonical tensor, in its first dtype."""
    shape, rows = spec.shape, _chunk_rows(spec.shape)
    part = (min(rows, shape[0] - j * rows),) + tuple(shape[1:])
    rng = _rng(seed, name, j)
    if name.endswith(".blocks"):  # two uniform random E2M1 codes per byte
        return rng.integers(0, 256, part, dtype=np.uint8)
    if name.endswith(".scales"):
        return _scale_exponents(rng, part, cfg.hidden_size if ".mlp1_weight" in name else cfg.intermediate_size)
    mean, std = _init(cfg, name)
    x = rng.standard_normal(part, dtype=np.float32)
    x *= np.float32(std)
    x += np.float32(mean)
    return to_bf16_bits(x) if spec.dtypes[0] == "bf16" else x


def _num_chunks(spec: TensorSpec) -> int:
    return -(-spec.shape[0] // _chunk_rows(spec.shape))


THREADS = max(1, min(16, os.cpu_count() or 1))
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads for generating chunks in parallel (NumPy's generators release the GIL while filling)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="synthetic")
    return _POOL


def generate_chunks(cfg: ModelConfig, name: str, spec: TensorSpec, seed: int):
    """Yield a canonical tensor as consecutive slices along axis 0, a few chunks made ahead in parallel."""
    n, ahead = _num_chunks(spec), THREADS
    pending = deque()
    for j in range(n):
        pending.append(_pool().submit(_chunk, cfg, name, spec, seed, j))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def generate(cfg: ModelConfig, name: str, spec: TensorSpec, seed: int) -> np.ndarray:
    """A whole canonical tensor, its chunks made in parallel straight into the output."""
    n = _num_chunks(spec)
    if n == 1:
        return _chunk(cfg, name, spec, seed, 0)
    dtype = np.uint8 if spec.dtypes[0] == "u8" else (np.uint16 if spec.dtypes[0] == "bf16" else np.float32)
    out = np.empty(spec.shape, dtype=dtype)
    rows = _chunk_rows(spec.shape)

    def fill(j):
        out[j * rows:(j + 1) * rows] = _chunk(cfg, name, spec, seed, j)

    for future in [_pool().submit(fill, j) for j in range(n)]:
        future.result()
    return out


class SyntheticWeights(Weights):
    """Random weights made on demand, tensor by tensor; recently used tensors are kept up to a byte budget
    (the reference looks rows of the embedding up on every forward)."""

    def __init__(self, cfg: ModelConfig, experts: str = "mxfp4", seed: int = 0, cache_bytes: int = 2 << 30):
        self.config, self.experts_format, self.seed = cfg, experts, int(seed)
        self.layout = canonical_layout(cfg, experts)
        self.source = f"random weights (seed {seed}, {experts} experts)"
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_bytes = cache_bytes

    def names(self) -> list[str]:
        return list(self.layout)

    def info(self, name: str) -> TensorInfo:
        if name not in self.layout:
            raise self._unknown(name)
        spec = self.layout[name]
        return TensorInfo(name, spec.dtypes[0], spec.shape)

    def raw(self, name: str) -> np.ndarray:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        if name not in self.layout:
            raise self._unknown(name)
        arr = generate(self.config, name, self.layout[name], self.seed)
        arr.flags.writeable = False
        if arr.nbytes <= self.cache_bytes:
            self.cache[name] = arr
            while sum(a.nbytes for a in self.cache.values()) > self.cache_bytes:
                self.cache.popitem(last=False)
        return arr

    def chunks(self, name: str):
        """The tensor as consecutive slices along axis 0, never whole in memory (for streaming writers)."""
        if name not in self.layout:
            raise self._unknown(name)
        return generate_chunks(self.config, name, self.layout[name], self.seed)


def random_weights(cfg: ModelConfig, experts: str = "mxfp4", seed: int = 0) -> Weights:
    """Random weights of `cfg` in memory, generated lazily per tensor, deterministic per (seed, name)."""
    return SyntheticWeights(cfg, experts, seed)


# ---- writing a Hugging Face checkpoint ------------------------------------------------------------

def _hf_chunks(weights: SyntheticWeights, hf_name: str, layout: dict, recipes: dict, owner: dict, memo: dict):
    """The HF tensor as a sequence of arrays, cut from the canonical tensor it comes from."""
    canonical = owner[hf_name]
    recipe = recipes[canonical]
    if recipe.kind == "same":
        yield from weights.chunks(canonical)
    elif recipe.kind == "transpose":  # canonical [E, out, in] -> HF [E, in, out], chunk by chunk of experts
        for chunk in weights.chunks(canonical):
            yield np.ascontiguousarray(chunk.transpose(0, 2, 1))
    else:  # q, k or v: consecutive rows of the fused qkv (made once for all three)
        if memo.get("name") != canonical:
            memo.update(name=canonical, array=weights.raw(canonical))
        start = 0
        for source in recipe.sources:
            rows = layout[source].shape[0]
            if source == hf_name:
                yield memo["array"][start:start + rows]
                return
            start += rows


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    return shards


RECIPE_FILE = "synthetic.json"  # written last: what write_hf_checkpoint made, and the files it wrote


def _recipe(cfg: ModelConfig, experts: str, seed: int, max_shard_bytes: int) -> dict:
    """The arguments as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps({"config": cfg.to_dict(), "experts": experts, "seed": seed,
                                  "max_shard_bytes": max_shard_bytes}))


def holds_checkpoint(out_dir, cfg: ModelConfig, experts: str = "mxfp4", seed: int = 0,
                     max_shard_bytes: int = 5 * 10**9) -> bool:
    """True when out_dir holds a finished write_hf_checkpoint of exactly these arguments: its recipe
    file (written last) names them, and every file it lists is there with its size."""
    out = Path(out_dir)
    try:
        written = json.loads((out / RECIPE_FILE).read_text())
        files = written.pop("files")
        return written == _recipe(cfg, experts, seed, max_shard_bytes) and all(
            (out / name).is_file() and (out / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def write_hf_checkpoint(cfg: ModelConfig, out_dir, experts: str = "mxfp4", seed: int = 0,
                        max_shard_bytes: int = 5 * 10**9, on_bytes=None) -> Path:
    """Write random weights (the same values as random_weights(cfg, experts, seed)) as a Hugging Face
    checkpoint: config.json and model.safetensors, or shards model-0000k-of-0000n.safetensors of at most
    max_shard_bytes each (a larger tensor gets a shard alone) + model.safetensors.index.json, then
    synthetic.json (the arguments and the files written; see holds_checkpoint). Tensors are streamed
    to disk chunk by chunk; on_bytes(n) is called after each chunk (for progress bars). Older
    model*.safetensors files in out_dir are removed."""
    weights = SyntheticWeights(cfg, experts, seed, cache_bytes=0)
    layout, recipes = hf_layout(cfg, experts)
    owner = {s: canonical for canonical, r in recipes.items() for s in r.sources}
    dtypes = {name: spec.dtypes[0] for name, spec in layout.items()}
    sizes = {name: nbytes_of(dtypes[name], spec.shape) for name, spec in layout.items()}
    shards = _plan_shards(sizes, max_shard_bytes)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / RECIPE_FILE, *out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        if stale.is_file():
            stale.unlink()
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(quantized_experts=experts == "mxfp4"), indent=2))
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    memo: dict = {}  # the fused qkv of the current layer, cut into q, k and v
    for file, names in zip(files, shards):
        # generators: each tensor is made only when the writer reaches it
        tensors = [(name, dtypes[name], layout[name].shape,
                    _hf_chunks(weights, name, layout, recipes, owner, memo)) for name in names]
        write_safetensors(out / file, tensors, on_bytes)
    written = ["config.json", *files]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        written.append("model.safetensors.index.json")
    record = _recipe(cfg, experts, seed, max_shard_bytes)
    record["files"] = {name: (out / name).stat().st_size for name in written}
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2))
    return out
