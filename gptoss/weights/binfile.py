"""Our single-file model format (docs/BIN_FORMAT.md): a fixed prelude, a JSON header (config, experts
format, tensor table), then every tensor at a 4096-byte aligned offset, ready for mmap and GPU upload.

    bytes 0..7    magic b"GPTOSSW\\n"
    bytes 8..11   format version, uint32 little-endian (1)
    bytes 12..15  CRC-32 of the JSON header bytes, uint32 little-endian
    bytes 16..23  JSON header length in bytes, uint64 little-endian
    bytes 24..    the JSON header (UTF-8), then zero padding up to the first tensor
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..config import ModelConfig, short_repr
from .base import (DTYPES, EXPERT_FORMATS, CheckpointError, TensorInfo, Weights, canonical_layout, check_tensors,
                   is_count, nbytes_of, parse_json)

MAGIC = b"GPTOSSW\n"
VERSION = 1
ALIGN = 4096
PRELUDE = struct.Struct("<8sIIQ")  # magic, version, header crc32, header length
WRITE_CHUNK = 64 << 20  # bytes per write, so on_bytes reports progress often and views stay small


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def build_header(weights: Weights) -> tuple[bytes, list[dict]]:
    """The JSON header bytes and the tensor table (offsets absolute in the file, each 4096-aligned)."""
    names = weights.names()
    infos = [weights.info(n) for n in names]

    def encode(table, file_size):
        header = {"format": "gptoss-bin", "version": VERSION, "config": weights.config.to_dict(),
                  "experts_format": weights.experts_format, "alignment": ALIGN, "file_size": file_size,
                  "tensors": table}
        return json.dumps(header, separators=(",", ":")).encode()

    # The offsets depend on the header's length, which depends on the offsets: iterate to a fixed point
    # (the first tensor's offset only ever grows, and by whole pages, so this ends in a step or two).
    first = _align(PRELUDE.size + len(encode([], 0)) + 64 * len(infos))
    while True:
        table, offset = [], first
        for info in infos:
            table.append({"name": info.name, "dtype": info.dtype, "shape": list(info.shape), "offset": offset,
                          "nbytes": info.nbytes})
            offset = _align(offset + info.nbytes)
        file_size = table[-1]["offset"] + table[-1]["nbytes"] if table else first
        text = encode(table, file_size)
        if PRELUDE.size + len(text) <= first:
            return text, table
        first = _align(PRELUDE.size + len(text))


def _byte_chunks(arr: np.ndarray):
    """Contiguous pieces of an array (in C order) of about WRITE_CHUNK bytes, cut along axis 0."""
    if arr.ndim == 0 or arr.nbytes <= WRITE_CHUNK:
        yield np.ascontiguousarray(arr)
        return
    rows = max(1, WRITE_CHUNK // max(1, arr.nbytes // arr.shape[0]))
    for start in range(0, arr.shape[0], rows):
        yield np.ascontiguousarray(arr[start:start + rows])


def write_bin(path, weights: Weights, on_bytes=None) -> Path:
    """Write `weights` as a .bin, tensor by tensor (never the whole model in memory), to PATH.tmp, then
    rename it to PATH. on_bytes(n) is called after each chunk of tensor data written (for progress bars)."""
    path = Path(path)
    text, table = build_header(weights)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(PRELUDE.pack(MAGIC, VERSION, zlib.crc32(text), len(text)))
            f.write(text)
            for entry in table:
                f.write(b"\0" * (entry["offset"] - f.tell()))
                arr = weights.raw(entry["name"])
                expected = (DTYPES[entry["dtype"]][0], tuple(entry["shape"]))
                if (arr.dtype, arr.shape) != expected:
                    raise CheckpointError(f"{weights.source}: {entry['name']} gave {arr.dtype} {list(arr.shape)}, "
                                          f"its info says {entry['dtype']} {entry['shape']}")
                for chunk in _byte_chunks(arr):
                    f.write(memoryview(chunk).cast("B"))
                    if on_bytes:
                        on_bytes(chunk.nbytes)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class BinWeights(Weights):
    """A .bin file, memory-mapped: raw() returns zero-copy read-only views of the file."""

    def __init__(self, path):
        path = Path(path)
        self.source = str(path)
        header = read_header(path)
        self.config = header["config"]
        self.experts_format = header["experts_format"]
        self.table = {t["name"]: t for t in header["tensors"]}
        self.map = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.table)

    def info(self, name: str) -> TensorInfo:
        t = self.table.get(name)
        if t is None:
            raise self._unknown(name)
        return TensorInfo(name, t["dtype"], tuple(t["shape"]))

    def raw(self, name: str) -> np.ndarray:
        t = self.table.get(name)
        if t is None:
            raise self._unknown(name)
        return self.map[t["offset"]:t["offset"] + t["nbytes"]].view(DTYPES[t["dtype"]][0]).reshape(t["shape"])


def _check_entry(t, i: int) -> None:
    """One tensor table entry: a name, a dtype string, a shape of sizes, an offset and nbytes (ValueError)."""
    if not isinstance(t, dict):
        raise ValueError(f"tensors[{i}] is not an object: {short_repr(t)}")
    for key in ("name", "dtype", "shape", "offset", "nbytes"):
        if key not in t:
            raise ValueError(f"tensors[{i}] has no {key}")
    if not isinstance(t["name"], str) or not isinstance(t["dtype"], str):
        raise ValueError(f"tensors[{i}] name and dtype must be strings")
    if not (isinstance(t["shape"], list) and all(is_count(d) for d in t["shape"])):
        raise ValueError(f"{t['name']} has shape {short_repr(t['shape'])}, not a list of sizes")
    for key in ("offset", "nbytes"):
        if not is_count(t[key]):
            raise ValueError(f"{t['name']} has {key} {short_repr(t[key])}, not a byte count")


def read_header(path: Path) -> dict:
    """Read and check the prelude, header and tensor table of a .bin; config becomes a ModelConfig."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prelude = f.read(PRELUDE.size)
            if len(prelude) < PRELUDE.size:
                raise CheckpointError(f"{path}: only {size} bytes, too short to be a gptoss .bin")
            magic, version, crc, length = PRELUDE.unpack(prelude)
            if magic != MAGIC:
                raise CheckpointError(f"{path}: not a gptoss .bin (magic {magic!r}, expected {MAGIC!r}); "
                                      "convert checkpoints with export/export_model_bin.py")
            if version != VERSION:
                raise CheckpointError(f"{path}: .bin format version {version}, this code reads version "
                                      f"{VERSION}; export the model again with this version")
            if PRELUDE.size + length > size:
                raise CheckpointError(f"{path}: truncated: the header needs {PRELUDE.size + length} bytes, the "
                                      f"file has {size}")
            text = f.read(length)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if zlib.crc32(text) != crc:
        raise CheckpointError(f"{path}: corrupt header (checksum mismatch)")
    try:
        header = parse_json(text)
        if not isinstance(header, dict):
            raise ValueError(f"not a JSON object: {short_repr(header)}")
        config = ModelConfig.from_dict(header["config"])
        experts, table, file_size = header["experts_format"], header["tensors"], header["file_size"]
        if experts not in EXPERT_FORMATS:
            raise ValueError(f"experts_format {short_repr(experts)} is not one of {EXPERT_FORMATS}")
        if not is_count(file_size):
            raise ValueError(f"file_size {short_repr(file_size)} is not a size")
        if not isinstance(table, list):
            raise ValueError(f"tensors is not a list: {short_repr(table)}")
        for i, t in enumerate(table):
            _check_entry(t, i)
        layout = canonical_layout(config, experts)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt header ({type(e).__name__}: {e})") from None
    entries = {t["name"]: t for t in table}
    if size < file_size:
        raise CheckpointError(f"{path}: truncated: the header describes {file_size} bytes, the file has {size} "
                              "(the export was interrupted or the copy is incomplete)")
    if len(entries) != len(table):
        raise CheckpointError(f"{path}: the tensor table lists a name twice")
    check_tensors({n: (t["dtype"], tuple(t["shape"])) for n, t in entries.items()}, layout, lambda n: path,
                  str(path), config)
    data_start = PRELUDE.size + length
    end_of_previous, previous = data_start, "the header"
    for t in sorted(table, key=lambda t: t["offset"]):
        name, start, end = t["name"], t["offset"], t["offset"] + t["nbytes"]
        if t["nbytes"] != nbytes_of(t["dtype"], t["shape"]):
            raise CheckpointError(f"{path}: {name} has nbytes {t['nbytes']} in the table, but {t['dtype']} "
                                  f"{t['shape']} needs {nbytes_of(t['dtype'], t['shape'])}")
        if start < 0 or end > size:
            raise CheckpointError(f"{path}: {name} at bytes [{start}, {end}) points outside the file "
                                  f"({size} bytes)")
        if start % ALIGN:
            raise CheckpointError(f"{path}: {name} starts at byte {start}, not a multiple of {ALIGN}")
        if start < end_of_previous:
            raise CheckpointError(f"{path}: {name} at byte {start} overlaps {previous}")
        end_of_previous, previous = end, name
    header["config"] = config
    return header
