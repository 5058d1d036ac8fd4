"""Hugging Face checkpoint directories: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json (experts packed MXFP4 or dequantized bf16), and OpenAI's `original/` layout
(canonical names already). Tensors are read lazily: the safetensors headers are parsed here and the data
is np.memmap'ed, so a 65 GB checkpoint never passes through RAM at once. Every tensor's name, shape and
dtype is checked against config.json before anything is returned, and every header value is type-checked
and bounded by the file's size before it is used: a damaged file ends in a one-line CheckpointError, never
in another exception, a read outside the checkpoint or an allocation sized by a corrupt number
(tests/test_fuzz_loaders.py). write_safetensors streams tensors into one file.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig, short_repr
from .base import (DTYPES, CheckpointError, Recipe, TensorInfo, Weights, canonical_layout, check_tensors, hf_layout,
                   is_count, nbytes_of, parse_json)

# safetensors dtype -> (our dtype string, bytes per element); those we cannot use still get a name for messages
SAFETENSORS_DTYPES = {"BF16": ("bf16", 2), "F32": ("f32", 4), "U8": ("u8", 1), "F16": ("f16", 2),
                      "F64": ("f64", 8), "I8": ("i8", 1), "I16": ("i16", 2), "U16": ("u16", 2),
                      "I32": ("i32", 4), "U32": ("u32", 4), "I64": ("i64", 8), "U64": ("u64", 8),
                      "BOOL": ("bool", 1), "F8_E4M3": ("f8_e4m3", 1), "F8_E5M2": ("f8_e5m2", 1)}
TO_SAFETENSORS = {ours: st for st, (ours, _) in SAFETENSORS_DTYPES.items()}


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


def write_safetensors(path, tensors, on_bytes=None) -> None:
    """Stream tensors into one safetensors file: `tensors` is a list of (name, dtype, shape, chunks), chunks
    an iterable of arrays that together hold the tensor in C order. Written to PATH.tmp, then renamed.
    on_bytes(n) is called after each chunk (for progress bars)."""
    path = Path(path)
    header, offset = {}, 0
    for name, dtype, shape, _ in tensors:
        size = nbytes_of(dtype, shape)
        header[name] = {"dtype": TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, dtype, shape, chunks in tensors:
                written = 0
                for chunk in chunks:
                    f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                    written += chunk.nbytes
                    if on_bytes:
                        on_bytes(chunk.nbytes)
                if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                    raise ValueError(f"{name}: chunks hold {written} bytes, {dtype} {list(shape)} needs "
                                     f"{nbytes_of(dtype, shape)}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
