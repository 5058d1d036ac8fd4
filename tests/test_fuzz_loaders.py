"""Fuzz the loaders: hypothesis mutates tiny checkpoints (our .bin, a Hugging Face safetensors checkpoint,
single-file and sharded, its config.json, and a tokenizer.bin) and every case must end in one of two ways:

- it loads: open_weights returns, every tensor reads with the shape and dtype its info() gives, and the
  config is usable (typed, finite, its RoPE table finite); or
- it raises the project's own error (CheckpointError / TokenizerError) whose message is one line naming
  the file.

Anything else fails the test with the input that caused it: another exception (IndexError, OverflowError,
RecursionError, a NumPy ValueError...), a shard read from outside the checkpoint directory, or a loader
allocating far more memory than the files hold (traced with tracemalloc). Runs are reproducible: examples
come from a fixed seed (derandomize) and no example database is kept. Each test prints how many cases it
ran and how they ended; GPTOSS_FUZZ_VERBOSE=1 lists every kind of message, GPTOSS_FUZZ_SCALE=N runs N
times as many cases (a deeper search than CI's).

Mutations: truncation anywhere, flipped and overwritten bytes, huge or zero length fields, inserted and
deleted bytes; and, with the checksums recomputed so the edit is what gets judged, edits of the JSON
headers (our .bin header, the safetensors header, the shard index, config.json) at every path: values
replaced by garbage (wrong types, huge or negative numbers, NaN and infinities, strings, deep nesting)
or by near misses (off by one, misaligned, another tensor's offset), entries deleted or duplicated.
"""
import copy
import dataclasses
import functools
import json
import math
import os
import re
import struct
import tracemalloc
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss import tokenizer as T
from gptoss.config import TINY, ModelConfig, yarn_inv_freq_and_scale
from gptoss.weights import DTYPES, CheckpointError, open_weights, random_weights, write_bin, write_hf_checkpoint
from gptoss.weights.binfile import ALIGN, MAGIC, PRELUDE, VERSION

# Reproducible: a fixed seed, no database. The deadline is no speed test (a case takes milliseconds): it
# turns a loader that loops on a corrupt count into a failure that names the input (generous,
# so that a loaded CI machine never trips it).
FUZZ = settings(derandomize=True, database=None, deadline=timedelta(seconds=60), print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])

# Cases per target, 3000 in all (each test checks that hypothesis ran at least this many).
SCALE = int(os.environ.get("GPTOSS_FUZZ_SCALE", "1"))
CASES = {name: n * SCALE for name, n in
         {"bin": 900, "safetensors": 700, "sharded": 300, "config": 700, "tokenizer": 400}.items()}

# A loader may allocate (copies of tensors: qkv is concatenated, the test dequantizes one layer) a
# small multiple of what the files hold, never what a corrupt header claims.
MEMORY_FACTOR, MEMORY_SLACK = 16, 4 << 20

# ---- garbage and near misses ---------------------------------------------------------------------

DEEP = "\x00deep\x00"  # serialized as 100 000 nested arrays (json.dumps cannot nest that deep itself)
NASTY_INTS = (0, 1, -1, 2, 3, 16, 31, 32, 33, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1,
              2**63, 2**64, -2**63, 10**30, 10**300)
NASTY_FLOATS = (0.0, -0.0, 0.5, 1.5, 1e-300, 1e300, math.inf, -math.inf, math.nan)
NASTY_STRINGS = ("", "0", "64", "x", "bf16", "f32", "u8", "BF16", "F32", "U8", "I64", "F8_E4M3", "mxfp4",
                 "full_attention", "sliding_attention", "model.safetensors", "../outside.safetensors",
                 "a\nb", "\x1b[31m", "\ud800", "\x00", DEEP)

scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(NASTY_INTS), st.integers(),
                    st.sampled_from(NASTY_FLOATS), st.floats(), st.sampled_from(NASTY_STRINGS), st.text(max_size=6))
garbage = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def near(old) -> st.SearchStrategy:
    """Values close to `old`: what a subtly wrong writer would produce."""
    if isinstance(old, bool):
        return st.just(not old)
    if isinstance(old, int):
        return st.one_of(st.integers(-3, 3).map(lambda d: old + d), st.integers(-2, 2).map(lambda k: old + k * ALIGN),
                         st.sampled_from([0, -old, 2 * old, old // 2, old * 2**32, float(old), str(old), [old]]))
    if isinstance(old, float):
        return st.sampled_from([-old, 0.0, old * 1e300, str(old), int(old), old + 0.5])
    if isinstance(old, str):
        return st.sampled_from([old.upper(), old + "x", old[:-1], old + "\n", old * 2])
    if isinstance(old, list):
        ops = [old[:-1], old + old[-1:], old[::-1], [old], old + [1], [1] + old]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in old) and old:
            ops += [[x * 2 for x in old], [-x for x in old], [x + 1 for x in old], [0] * len(old), [math.prod(old)]]
        return st.sampled_from(ops)
    if isinstance(old, dict):
        return st.sampled_from([{}, {**old, "extra": 1}, list(old.values())])
    return garbage


def json_paths(doc, prefix=()):
    """Every location in a JSON document, the root included."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from json_paths(value, prefix + (key,))


def lookup(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def json_edits(doc) -> st.SearchStrategy:
    """A list of 1-3 edits (path, action, value) of `doc`."""
    paths = list(json_paths(doc))

    @functools.cache  # one strategy per path, built once: hypothesis then caches what it learns about it
    def edit_at(path):
        old = lookup(doc, path)
        actions = [st.tuples(st.just(path), st.just("set"), garbage), st.tuples(st.just(path), st.just("set"), near(old))]
        if path:
            actions += [st.tuples(st.just(path), st.just("delete"), st.none()),
                        st.tuples(st.just(path), st.just("duplicate"), st.none())]
        if isinstance(old, dict):
            actions.append(st.tuples(st.just(path), st.just("add"), st.tuples(st.text(max_size=12), garbage)))
        return st.one_of(actions)

    return st.lists(st.sampled_from(paths).flatmap(edit_at), min_size=1, max_size=3)


def apply_json_edits(doc, edits):
    """A copy of doc with the edits applied; an edit whose path an earlier edit removed is skipped."""
    doc = copy.deepcopy(doc)
    for path, action, value in copy.deepcopy(edits):  # values may share lists with the base document
        if not path:
            doc = value if action == "set" else doc
            continue
        try:
            parent, key = lookup(doc, path[:-1]), path[-1]
            old = parent[key]
        except (KeyError, IndexError, TypeError):
            continue
        if action == "set":
            parent[key] = value
        elif action == "delete":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(old))
        elif action == "add" and isinstance(old, dict):
            old[value[0]] = value[1]
    return doc


def dumps(doc) -> bytes:
    """JSON with NaN / Infinity literals (Python's json reads them) and DEEP expanded."""
    text = json.dumps(doc, separators=(",", ":"), allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000).encode()


# whole documents that are not what a loader expects (named, so a failing case prints short)
NASTY_TEXTS = {"empty": b"", "space": b" ", "null": b"null", "list": b"[]", "object": b"{}", "zero": b"0",
               "overflow": b"1e999", "string": b'"x"', "deep list": b"[" * 100_000, "deep object": b'{"a":' * 50_000,
               "not utf-8": b"\xff\xfe\x00", "nan": b'{"a": NaN}', "repeated key": b"{" + b'"k":1,' * 1000 + b'"k":2}'}
nasty_texts = st.sampled_from(sorted(NASTY_TEXTS))


# ---- byte-level mutations -------------------------------------------------------------------------

UINTS = (0, 1, 7, 8, 24, 4096, 2**31, 2**32 - 1, 2**32, 2**60, 2**63, 2**64 - 1)


def byte_edits(size: int, hot: int, fields=()) -> st.SearchStrategy:
    """1-3 edits of a file of `size` bytes. Positions favour the first `hot` bytes (prelude and header);
    `fields` are positions of integer fields worth overwriting with extreme values."""
    pos = st.one_of(st.integers(0, max(hot - 1, 0)), st.integers(0, max(size - 1, 0)))
    width = st.sampled_from([4, 8])
    ints = st.one_of(st.sampled_from(UINTS), st.integers(0, 2**64 - 1), st.integers(0, size + 64))
    ops = [st.tuples(st.just("flip"), pos, st.integers(1, 255)),
           st.tuples(st.just("put"), pos, st.binary(min_size=1, max_size=8)),
           st.tuples(st.just("int"), st.one_of(pos, st.sampled_from(fields)) if fields else pos, st.tuples(width, ints)),
           st.tuples(st.just("truncate"), pos, st.none()),
           st.tuples(st.just("append"), st.none(), st.binary(min_size=1, max_size=16)),
           st.tuples(st.just("delete"), pos, st.integers(1, 64)),
           st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16))]
    return st.lists(st.one_of(ops), min_size=1, max_size=3)


def apply_byte_edits(data: bytes, edits) -> bytes:
    data = bytearray(data)
    for op, at, arg in edits:
        at = min(at, len(data)) if at is not None else None
        if op == "flip" and at < len(data):
            data[at] ^= arg
        elif op == "put":
            data[at:at + len(arg)] = arg
        elif op == "int":
            width, value = arg
            data[at:at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == "truncate":
            del data[at:]
        elif op == "append":
            data += arg
        elif op == "delete":
            del data[at:at + arg]
        elif op == "insert":
            data[at:at] = arg
    return bytes(data)


# ---- the property ---------------------------------------------------------------------------------

def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_config(cfg: ModelConfig) -> None:
    """A loaded config is typed and finite, and its RoPE table (the first thing a model builds) is finite."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "layer_types":
            assert len(value) == cfg.num_layers and all(isinstance(t, str) for t in value)
        elif f.type == "int":
            assert type(value) is int and 0 < value < 2**31, (f.name, value)
        else:
            assert type(value) is float and math.isfinite(value), (f.name, value)
    inv_freq, concentration = yarn_inv_freq_and_scale(cfg)
    assert np.all(np.isfinite(inv_freq)) and math.isfinite(concentration)


def read_everything(path: Path, inside: Path) -> None:
    """open_weights(path) and read every byte of every tensor; every file it maps lies in `inside`."""
    w = open_weights(path)
    for name in w.names():
        info, arr = w.info(name), w.raw(name)
        assert arr.shape == info.shape and arr.dtype == DTYPES[info.dtype][0], name
        zlib.crc32(np.ascontiguousarray(arr))  # page in every byte
    w.f32("norm.scale")
    w.expert_weights_f32(0, "mlp2")
    check_config(w.config)
    mapped = [Path(f) for f in getattr(getattr(w, "files", None), "maps", {})] + [Path(w.source)]
    assert all(f == inside or inside in f.parents for f in mapped), mapped


def outcome(load, blame: Path, budget: int, errors) -> str:
    """Run load(); 'loaded', or the refusal's message with the file name taken out. Any exception other
    than `errors`, a multi-line message, a message not naming `blame`, or a memory peak over the budget
    fails the test."""
    tracemalloc.start()
    try:
        load()
        result = "loaded"
    except errors as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message, message
        assert str(blame) in message, message
        result = message.replace(str(blame), "<file>")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= MEMORY_FACTOR * budget + MEMORY_SLACK, f"allocated {peak} bytes for {budget} bytes of files"
    return result


class Tally:
    """Counts the cases a fuzz test ran and how they ended."""

    def __init__(self, name):
        self.name, self.cases, self.outcomes = name, 0, Counter()

    def add(self, result: str):
        self.cases += 1
        self.outcomes["loaded" if result == "loaded" else re.sub(r"\d+", "N", result)[:70]] += 1

    def check(self):
        loaded = self.outcomes["loaded"]
        print(f"\n{self.name}: {self.cases} cases, {loaded} loaded, {self.cases - loaded} refused with "
              f"{len(self.outcomes) - (loaded > 0)} kinds of message")
        if os.environ.get("GPTOSS_FUZZ_VERBOSE"):
            for kind, n in self.outcomes.most_common():
                print(f"  {n:5d}  {kind}")
        assert self.cases >= CASES[self.name]  # hypothesis did not run out of distinct inputs
        assert loaded and self.cases > loaded  # the mutations reach both ends


def run(name, strategy, body):
    tally = Tally(name)

    @settings(FUZZ, max_examples=CASES[name])
    @given(strategy)
    def case(mutation):
        tally.add(body(mutation))

    case()
    tally.check()


# ---- base files, made once per module -------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    write_bin(root / "base.bin", random_weights(TINY, "mxfp4", seed=5))
    single = write_hf_checkpoint(TINY, root / "hf", "mxfp4", seed=5)
    sharded = write_hf_checkpoint(TINY, root / "sharded", "bf16", seed=5, max_shard_bytes=40_000)
    return root, single, sharded


def table_edits(header: dict, size: int) -> st.SearchStrategy:
    """1-3 edits of a .bin tensor table that keep it well-typed but move tensors: onto another tensor,
    off the 4096 grid, past the end of the file; or make nbytes or file_size disagree."""
    tensors = header["tensors"]
    offsets = sorted({t["offset"] for t in tensors})

    @functools.cache
    def edit(i):
        t = tensors[i]
        offset = st.one_of(st.sampled_from(offsets), st.integers(-2, 2).map(lambda k: t["offset"] + k * ALIGN),
                           st.integers(-8, 8).map(lambda d: t["offset"] + d),
                           st.sampled_from([size, size - t["nbytes"] + ALIGN, 2**63, 2**64 + t["offset"]]))
        nbytes = st.one_of(st.integers(-2, 2).map(lambda d: t["nbytes"] + d), st.sampled_from([0, size, 2**63]))
        return st.one_of(st.tuples(st.just(("tensors", i, "offset")), st.just("set"), offset),
                         st.tuples(st.just(("tensors", i, "nbytes")), st.just("set"), nbytes),
                         st.tuples(st.just(("file_size",)), st.just("set"), st.integers(-2, 2).map(lambda d: size + d)))

    return st.lists(st.integers(0, len(tensors) - 1).flatmap(edit), min_size=1, max_size=3)


# ---- .bin -----------------------------------------------------------------------------------------

def test_fuzz_bin(base, tmp_path):
    data = (base[0] / "base.bin").read_bytes()
    _, _, _, length = PRELUDE.unpack_from(data)
    header = json.loads(data[PRELUDE.size:PRELUDE.size + length])
    first = header["tensors"][0]["offset"]
    path = tmp_path / "model.bin"

    def with_header(text: bytes) -> bytes:
        """The base file with another header (its CRC and length right), the tensors where they fit."""
        start = max(first, -(-(PRELUDE.size + len(text)) // ALIGN) * ALIGN)
        prelude = PRELUDE.pack(MAGIC, VERSION, zlib.crc32(text), len(text))
        return prelude + text + b"\0" * (start - PRELUDE.size - len(text)) + data[first:]

    def fix_crc(blob: bytes) -> bytes:
        if len(blob) < PRELUDE.size:
            return blob
        length = struct.unpack_from("<Q", blob, 16)[0]
        crc = zlib.crc32(blob[PRELUDE.size:PRELUDE.size + length])
        return blob[:12] + struct.pack("<I", crc) + blob[16:]

    def fix_nbytes(doc):  # keep nbytes consistent with an edited shape, to reach the checks after it
        for t in doc.get("tensors", []) if isinstance(doc, dict) and isinstance(doc.get("tensors"), list) else []:
            try:
                t["nbytes"] = math.prod(t["shape"]) * DTYPES[t["dtype"]][1]
            except Exception:
                pass
        return doc

    header_edits = st.one_of(st.tuples(json_edits(header), st.booleans()),
                             st.tuples(table_edits(header, len(data)), st.just(False)),
                             st.tuples(nasty_texts, st.just(False)))
    raw = byte_edits(len(data), first, fields=(8, 12, 16))
    strategy = st.one_of(st.tuples(header_edits, st.just([]), st.just(False)),
                         st.tuples(st.just((None, False)), raw, st.booleans()),
                         st.tuples(header_edits, raw, st.booleans()))

    def body(mutation):
        (edits, consistent), raw_edits, recrc = mutation
        blob = data
        if isinstance(edits, str):
            blob = with_header(NASTY_TEXTS[edits])
        elif edits is not None:
            doc = apply_json_edits(header, edits)
            blob = with_header(dumps(fix_nbytes(doc) if consistent else doc))
        blob = apply_byte_edits(blob, raw_edits)
        path.write_bytes(fix_crc(blob) if recrc else blob)
        return outcome(lambda: read_everything(path, path), path, len(blob), CheckpointError)

    run("bin", strategy, body)


# ---- safetensors ----------------------------------------------------------------------------------

def read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n]), data[8 + n:]


def safetensors_bytes(text: bytes, body: bytes) -> bytes:
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def fix_spans(doc):
    """Make each entry's data_offsets span what its (edited) shape and dtype need, where they are readable."""
    sizes = {"BF16": 2, "F32": 4, "U8": 1}
    for meta in doc.values() if isinstance(doc, dict) else []:
        try:
            begin = meta["data_offsets"][0]
            meta["data_offsets"][1] = begin + math.prod(meta["shape"]) * sizes[meta["dtype"]]
        except Exception:
            pass
    return doc


def span_edits(header: dict, payload: int) -> st.SearchStrategy:
    """1-3 edits of safetensors data_offsets that keep them well-typed: onto another tensor's bytes,
    shifted, reversed, one byte short or long, past the end of the data."""
    names = sorted(n for n in header if n != "__metadata__")
    spans = sorted({tuple(header[n]["data_offsets"]) for n in names})

    @functools.cache
    def edit(name):
        begin, end = header[name]["data_offsets"]
        span = st.one_of(st.sampled_from(spans).map(list),
                         st.integers(-4, 4).map(lambda d: [begin + d, end + d]),
                         st.integers(-2, 2).map(lambda d: [begin, end + d]),
                         st.sampled_from([[end, begin], [payload - (end - begin) + 1, payload + 1], [0, 0]]))
        return st.tuples(st.just((name, "data_offsets")), st.just("set"), span)

    return st.lists(st.sampled_from(names).flatmap(edit), min_size=1, max_size=3)


def test_fuzz_safetensors(base, tmp_path):
    _, single, _ = base
    header, payload = read_safetensors(single / "model.safetensors")
    data = (single / "model.safetensors").read_bytes()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((single / "config.json").read_bytes())
    header_edits = st.one_of(st.tuples(json_edits(header), st.booleans()),
                             st.tuples(span_edits(header, len(payload)), st.booleans()),
                             st.tuples(nasty_texts, st.just(False)))
    strategy = st.one_of(st.tuples(header_edits, st.just([])),
                         st.tuples(st.none(), byte_edits(len(data), 8 + len(dumps(header)), fields=(0,))),
                         st.tuples(header_edits, byte_edits(len(data), 8 + len(dumps(header)), fields=(0,))))

    def body(mutation):
        edits, raw_edits = mutation
        blob = data
        if edits is not None:
            edits, consistent = edits
            if isinstance(edits, str):
                blob = safetensors_bytes(NASTY_TEXTS[edits], payload)
            else:
                doc = apply_json_edits(header, edits)
                blob = safetensors_bytes(dumps(fix_spans(doc) if consistent else doc), payload)
        blob = apply_byte_edits(blob, raw_edits)
        (ckpt / "model.safetensors").write_bytes(blob)
        return outcome(lambda: read_everything(ckpt, ckpt), ckpt, folder_bytes(ckpt), CheckpointError)

    run("safetensors", strategy, body)


def test_fuzz_sharded_index(base, tmp_path):
    """The index of a sharded checkpoint, and its shards deleted or swapped; a valid shard lies next to the
    checkpoint as bait for an index that points outside it."""
    _, _, sharded = base
    files = {p.name: p.read_bytes() for p in sharded.iterdir()}
    index = json.loads(files["model.safetensors.index.json"])
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(files[shards[0]])
    index_edits = st.one_of(json_edits(index), nasty_texts,
                            st.lists(st.tuples(st.sampled_from(list(json_paths(index["weight_map"])))
                                               .map(lambda p: ("weight_map",) + p), st.just("set"),
                                               st.sampled_from([*shards, "../outside.safetensors",
                                                                str(tmp_path / "outside.safetensors"), ".", "",
                                                                "config.json", "model.safetensors", "missing"])),
                                     min_size=1, max_size=3))
    file_edits = st.lists(st.tuples(st.sampled_from(shards), st.sampled_from(["delete", "swap", "empty"])), max_size=2)
    strategy = st.tuples(index_edits, file_edits)

    def body(mutation):
        edits, file_ops = mutation
        for p in ckpt.iterdir():
            p.unlink()
        for name, blob in files.items():
            (ckpt / name).write_bytes(blob)
        text = NASTY_TEXTS[edits] if isinstance(edits, str) else dumps(apply_json_edits(index, edits))
        (ckpt / "model.safetensors.index.json").write_bytes(text)
        for shard, op in file_ops:
            if op == "delete" and (ckpt / shard).exists():
                (ckpt / shard).unlink()
            elif op == "swap":
                (ckpt / shard).write_bytes(files[shards[(shards.index(shard) + 1) % len(shards)]])
            elif op == "empty":
                (ckpt / shard).write_bytes(b"")
        return outcome(lambda: read_everything(ckpt, ckpt), ckpt, folder_bytes(tmp_path), CheckpointError)

    run("sharded", strategy, body)


# ---- config.json ----------------------------------------------------------------------------------

def test_fuzz_config_json(base, tmp_path):
    _, single, _ = base
    config = json.loads((single / "config.json").read_text())
    original_keys = {"rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0, "rope_scaling_factor": 32.0}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((single / "model.safetensors").read_bytes())
    text = dumps(config)
    strategy = st.one_of(
        st.tuples(json_edits(config), st.booleans(), st.just([])),
        st.tuples(st.just([]), st.just(False), byte_edits(len(text), len(text))),
        st.tuples(nasty_texts, st.just(False), st.just([])),
        st.tuples(json_edits(dict(config, **original_keys)), st.just(True), st.just([])))

    def body(mutation):
        edits, original, raw_edits = mutation
        if isinstance(edits, str):
            blob = NASTY_TEXTS[edits]
        else:
            doc = dict(config, **original_keys) if original else config
            blob = apply_byte_edits(dumps(apply_json_edits(doc, edits)), raw_edits)
        (ckpt / "config.json").write_bytes(blob)
        return outcome(lambda: read_everything(ckpt, ckpt), ckpt, folder_bytes(ckpt), CheckpointError)

    run("config", strategy, body)


# ---- tokenizer.bin --------------------------------------------------------------------------------

def test_fuzz_tokenizer_bin(tmp_path):
    """A small vocabulary (the 256 bytes and a few merges, o200k_harmony's specials) as a tokenizer.bin."""
    tokens = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hello", b" world"]
    vocab = T.Vocabulary("o200k_harmony", r"\s?\w+|\s+|[^\s\w]+", tokens,
                         {name: i for i, name in T.SPECIAL_NAMES.items()})
    data = T.tokenizer_bin_bytes(vocab)
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(data)
    assert T.read_tokenizer_bin(path) == vocab
    fields = tuple(range(8, T.HEADER.size, 4))
    strategy = st.tuples(byte_edits(len(data), T.HEADER.size + 64, fields), st.booleans())

    def load():
        tok = T.load_tokenizer(path)
        assert tok.decode_bytes(range(len(tok.vocabulary.tokens))) == b"".join(tok.vocabulary.tokens)

    def body(mutation):
        edits, recrc = mutation
        blob = apply_byte_edits(data, edits)
        if recrc and len(blob) >= 4:
            blob = blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]))
        path.write_bytes(blob)
        return outcome(load, path, len(blob), T.TokenizerError)

    run("tokenizer", strategy, body)
