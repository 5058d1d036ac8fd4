"""Open model weights from any source as one `Weights` object with OpenAI's canonical tensor names.

Sources: a Hugging Face checkpoint directory (config.json + model.safetensors or shards listed in
model.safetensors.index.json; experts packed MXFP4 or dequantized bf16), OpenAI's `original/` layout,
or our single-file `.bin` (gptoss/binfile.py). Tensors are read lazily: the safetensors headers are
parsed here and the data is np.memmap'ed, so a 65 GB checkpoint never passes through RAM at once.
Every tensor's name, shape and dtype is checked against config.json before anything is returned, and
every header value is type-checked and bounded by the file's size before it is used: a damaged file ends
in a one-line CheckpointError, never in another exception, a read outside the checkpoint or an
allocation sized by a corrupt number (tests/test_fuzz_loaders.py).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig, short_repr
from .bf16 import from_bf16_bits
from .mxfp4 import dequantize


class CheckpointError(ValueError):
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

# safetensors dtype -> (our dtype string, bytes per element); those we cannot use still get a name for messages
SAFETENSORS_DTYPES = {"BF16": ("bf16", 2), "F32": ("f32", 4), "U8": ("u8", 1), "F16": ("f16", 2),
                      "F64": ("f64", 8), "I8": ("i8", 1), "I16": ("i16", 2), "U16": ("u16", 2),
                      "I32": ("i32", 4), "U32": ("u32", 4), "I64": ("i64", 8), "U64": ("u64", 8),
                      "BOOL": ("bool", 1), "F8_E4M3": ("f8_e4m3", 1), "F8_E5M2": ("f8_e5m2", 1)}
TO_SAFETENSORS = {ours: st for st, (ours, _) in SAFETENSORS_DTYPES.items()}


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


# ---- safetensors files ----------------------------------------------------------------------------

@dataclass(frozen=True)
class StEntry:
    file: Path
    dtype: str  # ours ("bf16", ...), or the lower-cased safetensors name for dtypes we do not use
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _entry_fields(meta) -> tuple[str, tuple[int, ...], int, int]:
    """The dtype, shape and data_offsets of one safetensors header entry (ValueError saying what is wrong)."""
    if not isinstance(meta, dict):
        raise ValueError(f"not an object: {short_repr(meta)}")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in meta]
    if missing:
        raise ValueError(f"no {missing[0]}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str):
        raise ValueError(f"dtype {short_repr(dtype)} is not a string")
    if not (isinstance(shape, list) and all(is_count(d) for d in shape)):
        raise ValueError(f"shape {short_repr(shape)} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise ValueError(f"data_offsets {short_repr(offsets)} is not two byte offsets")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors_header(path: Path) -> dict[str, StEntry]:
    """Parse and check a safetensors header: 8-byte little-endian length, then JSON; offsets count from
    the end of the header. Detects truncated files, offsets past the end and overlapping tensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: only {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                                      "the file is truncated or not safetensors")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = parse_json(text)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype, shape, begin, end = _entry_fields(meta)
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name} ({e})") from None
        if st_dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: {name} has unknown dtype {st_dtype}")
        dtype, itemsize = SAFETENSORS_DTYPES[st_dtype]
        if end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(f"{path}: {name} spans {end - begin} bytes, but shape {list(shape)} of "
                                  f"{st_dtype} needs {math.prod(shape) * itemsize}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: {name} ends at byte {base + end}, the file has {size} "
                                  "bytes (download it again)")
        entries[name] = StEntry(path, dtype, shape, base + begin, base + end)
    end_of_previous, previous = base, "the header"
    for name, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.end == e.start:  # an empty tensor occupies no bytes
            continue
        if e.start < end_of_previous:
            raise CheckpointError(f"{path}: {name} at bytes [{e.start}, {e.end}) overlaps {previous}")
        end_of_previous, previous = e.end, name
    return entries


class MappedFiles:
    """One read-only np.memmap per file, opened on first use."""

    def __init__(self):
        self.maps: dict[Path, np.memmap] = {}

    def array(self, file: Path, dtype: str, shape: tuple, start: int, end: int) -> np.ndarray:
        mm = self.maps.get(file)
        if mm is None:
            mm = self.maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        return mm[start:end].view(DTYPES[dtype][0]).reshape(shape)


# ---- Hugging Face / original directories ----------------------------------------------------------

def _original_to_hf_config(raw: dict) -> dict:
    """OpenAI's original/config.json keys -> the Hugging Face names ModelConfig.from_hf_dict reads."""
    hf = dict(raw)
    hf.setdefault("rope_scaling", {
        "factor": raw.get("rope_scaling_factor", 32.0),
        "beta_slow": raw.get("rope_ntk_alpha", 1.0),   # the ramp's high end (interpolated below it)
        "beta_fast": raw.get("rope_ntk_beta", 32.0),   # the ramp's low end (extrapolated above it)
        "original_max_position_embeddings": raw.get("initial_context_length", 4096)})
    return hf


def read_config(directory: Path) -> ModelConfig:
    return config_from_json(directory / "config.json")


def config_from_json(path: Path) -> ModelConfig:
    """A Hugging Face config.json or OpenAI's original/config.json -> ModelConfig (CheckpointError if bad)."""
    try:
        raw = parse_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs its config.json)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(raw, str(path))


def config_from_dict(raw, source: str) -> ModelConfig:
    """The parsed JSON of a Hugging Face config.json or OpenAI's original/config.json -> ModelConfig
    (CheckpointError naming `source` if bad)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: not a JSON object")
    if any(k in raw for k in ("rope_ntk_alpha", "rope_ntk_beta", "rope_scaling_factor")):
        raw = _original_to_hf_config(raw)
    try:
        return ModelConfig.from_hf_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def _safetensors_files(directory: Path) -> tuple[dict[str, Path], str]:
    """tensor name -> file, and the file to blame for a missing tensor."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = parse_json(index.read_bytes())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        for name, file in weight_map.items():
            # a shard is a file of this directory: a path could make the index read any file on the machine
            if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file:
                raise CheckpointError(f"{index}: {name} is in {short_repr(file)}, not a file name in {directory}")
        for file in sorted(set(weight_map.values())):
            if not (directory / file).is_file():
                raise CheckpointError(f"{index}: lists shard {file}, which is not in {directory}")
        return {name: directory / file for name, file in weight_map.items()}, str(index)
    files = sorted(directory.glob("*.safetensors"))
    if (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    if not files:
        raise CheckpointError(f"{directory}: no model.safetensors, model.safetensors.index.json or other "
                              "*.safetensors file")
    names: dict[str, Path] = {}
    for file in files:
        for name in read_safetensors_header(file):
            if name in names:
                raise CheckpointError(f"{file}: {name} is also in {names[name]}")
            names[name] = file
    return names, str(files[0]) if len(files) == 1 else str(directory)


class SafetensorsWeights(Weights):
    """A Hugging Face or original/ checkpoint directory, memory-mapped."""

    def __init__(self, directory: Path):
        self.source = str(directory)
        self.config = read_config(directory)
        placement, missing_in = _safetensors_files(directory)
        headers: dict[Path, dict[str, StEntry]] = {}
        self.entries: dict[str, StEntry] = {}
        for name, file in placement.items():
            if file not in headers:
                headers[file] = read_safetensors_header(file)
            if name not in headers[file]:
                raise CheckpointError(f"{missing_in}: says {name} is in {file.name}, but {file} has no such tensor")
            self.entries[name] = headers[file][name]

        original = "embedding.weight" in self.entries or "block.0.attn.qkv.weight" in self.entries
        if original:
            self.experts_format = "mxfp4" if "block.0.mlp.mlp1_weight.blocks" in self.entries else "bf16"
            expected = canonical_layout(self.config, self.experts_format)
            self.recipes = {name: Recipe("same", (name,)) for name in expected}
        else:
            prefix = "model.layers.0.mlp.experts.gate_up_proj"
            self.experts_format = "mxfp4" if prefix + "_blocks" in self.entries else "bf16"
            expected, self.recipes = hf_layout(self.config, self.experts_format)
        found = {name: (e.dtype, e.shape) for name, e in self.entries.items()}
        check_tensors(found, expected, lambda n: self.entries[n].file, missing_in, self.config)
        for canonical, recipe in self.recipes.items():
            dtypes = {self.entries[s].dtype for s in recipe.sources}
            if len(dtypes) > 1:
                raise CheckpointError(f"{self.entries[recipe.sources[0]].file}: {', '.join(recipe.sources)} "
                                      f"mix dtypes {sorted(dtypes)}; they must agree to form {canonical}")
        self.layout = canonical_layout(self.config, self.experts_format)
        self.files = MappedFiles()

    def names(self) -> list[str]:
        return list(self.layout)

    def info(self, name: str) -> TensorInfo:
        if name not in self.layout:
            raise self._unknown(name)
        return TensorInfo(name, self.entries[self.recipes[name].sources[0]].dtype, self.layout[name].shape)

    def _source(self, hf_name: str) -> np.ndarray:
        e = self.entries[hf_name]
        return self.files.array(e.file, e.dtype, e.shape, e.start, e.end)

    def raw(self, name: str) -> np.ndarray:
        if name not in self.layout:
            raise self._unknown(name)
        recipe = self.recipes[name]
        if recipe.kind == "same":
            return self._source(recipe.sources[0])
        if recipe.kind == "transpose":  # a zero-copy strided view [E, out, in] of HF's [E, in, out]
            return self._source(recipe.sources[0]).transpose(0, 2, 1)
        out = np.concatenate([self._source(s) for s in recipe.sources])  # q, k, v rows -> qkv
        out.flags.writeable = False
        return out


# ---- entry point ----------------------------------------------------------------------------------

def open_weights(path) -> Weights:
    """A .bin file, a Hugging Face checkpoint directory, or an original/ directory -> Weights.

    Raises CheckpointError (one line naming the file and the problem) for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_file() and path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: pass the checkpoint directory (with config.json), not one safetensors file")
    if path.is_file():
        from .binfile import BinWeights

        return BinWeights(path)
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors and (path / "original").is_dir():
        path = path / "original"
    return SafetensorsWeights(path)
