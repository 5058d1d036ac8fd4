"""The .bin format: bit-identical round trips, 4096-byte alignment, atomic writes, the export CLI, and a
one-line error for each kind of damaged file."""
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from gptoss.config import TINY, TINY_REAL_HEADS
from gptoss.weights import BinWeights, CheckpointError, open_weights, random_weights, write_bin, write_hf_checkpoint
from gptoss.weights.binfile import ALIGN, MAGIC, PRELUDE, VERSION

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    path = tmp_path_factory.mktemp("bin") / "tiny.bin"
    write_bin(path, random_weights(TINY, "mxfp4", seed=9))
    return path


def assert_bit_identical(a, b):
    assert a.config == b.config and a.experts_format == b.experts_format and a.names() == b.names()
    for name in a.names():
        assert a.info(name) == b.info(name), name
        x, y = a.raw(name), b.raw(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), name


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_round_trip_from_a_hf_checkpoint_is_bit_identical(tmp_path, experts):
    written = {"hf": 0, "bin": 0}  # what the writers report to a progress bar

    def count(key):
        return lambda n: written.__setitem__(key, written[key] + n)

    hf = write_hf_checkpoint(TINY_REAL_HEADS, tmp_path / "hf", experts, seed=3, max_shard_bytes=200_000,
                             on_bytes=count("hf"))
    source = open_weights(hf)
    write_bin(tmp_path / "m.bin", source, on_bytes=count("bin"))
    assert written["hf"] == written["bin"] == source.total_bytes()
    loaded = open_weights(tmp_path / "m.bin")
    assert isinstance(loaded, BinWeights)
    assert_bit_identical(loaded, source)
    assert_bit_identical(loaded, random_weights(TINY_REAL_HEADS, experts, seed=3))
    for layer in range(TINY_REAL_HEADS.num_layers):
        np.testing.assert_array_equal(loaded.expert_weights_f32(layer, "mlp1"),
                                      source.expert_weights_f32(layer, "mlp1"))
    assert not list(tmp_path.glob("*.tmp"))


def test_tensors_are_aligned_zero_copy_views(tiny_bin):
    w = open_weights(tiny_bin)
    for name in w.names():
        arr = w.raw(name)
        assert arr.ctypes.data % ALIGN == 0, name  # mmap starts page-aligned, offsets are multiples of 4096
        assert arr.flags.c_contiguous and not arr.flags.owndata and not arr.flags.writeable
    table = read_header(tiny_bin)[1]["tensors"]
    assert [t["name"] for t in table] == w.names()
    assert all(t["offset"] % ALIGN == 0 for t in table)
    assert tiny_bin.stat().st_size == table[-1]["offset"] + table[-1]["nbytes"]


def test_f32_tensors_survive_the_round_trip(tmp_path):
    class WithF32Sinks:  # a Weights whose sinks are f32, as some checkpoints have them
        def __init__(self, inner):
            self.inner, self.config, self.experts_format, self.source = inner, inner.config, "mxfp4", "test"

        def names(self):
            return self.inner.names()

        def info(self, name):
            info = self.inner.info(name)
            return type(info)(name, "f32", info.shape) if name.endswith("sinks") else info

        def raw(self, name):
            return self.inner.f32(name) if name.endswith("sinks") else self.inner.raw(name)

    inner = random_weights(TINY, "mxfp4", seed=1)
    write_bin(tmp_path / "f.bin", WithF32Sinks(inner))
    w = open_weights(tmp_path / "f.bin")
    assert w.info("block.1.attn.sinks").dtype == "f32" and w.raw("block.1.attn.sinks").dtype == np.float32
    np.testing.assert_array_equal(w.f32("block.1.attn.sinks"), inner.f32("block.1.attn.sinks"))


def test_an_interrupted_write_leaves_nothing(tmp_path):
    class Failing:
        def __init__(self, inner):
            self.inner, self.config, self.experts_format, self.source = inner, inner.config, "mxfp4", "test"
            self.names, self.info = inner.names, inner.info

        def raw(self, name):
            if name == "block.1.attn.qkv.weight":
                raise OSError("disk gone")
            return self.inner.raw(name)

    with pytest.raises(OSError, match="disk gone"):
        write_bin(tmp_path / "x.bin", Failing(random_weights(TINY)))
    assert list(tmp_path.iterdir()) == []


# ---- damaged files --------------------------------------------------------------------------------

def read_header(path):
    data = path.read_bytes()
    magic, version, crc, length = PRELUDE.unpack(data[:PRELUDE.size])
    return data, json.loads(data[PRELUDE.size:PRELUDE.size + length])


def with_header(path, out, edit):
    """Copy a .bin with its JSON header edited (the checksum recomputed, so only the edit is wrong)."""
    data, header = read_header(path)
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    first = min(t["offset"] for t in read_header(path)[1]["tensors"])
    assert PRELUDE.size + len(text) <= first
    prelude = PRELUDE.pack(MAGIC, VERSION, zlib.crc32(text), len(text))
    out.write_bytes(prelude + text + b"\0" * (first - PRELUDE.size - len(text)) + data[first:])
    return out


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_weights(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_truncated_body(tiny_bin, tmp_path):
    data = tiny_bin.read_bytes()
    bad = tmp_path / "t.bin"
    bad.write_bytes(data[:-1])
    assert error_of(bad) == (f"{bad}: truncated: the header describes {len(data)} bytes, the file has "
                             f"{len(data) - 1} (the export was interrupted or the copy is incomplete)")
    bad.write_bytes(data[:100])
    assert error_of(bad).startswith(f"{bad}: truncated: the header needs")
    bad.write_bytes(data[:10])
    assert error_of(bad) == f"{bad}: only 10 bytes, too short to be a gptoss .bin"


def test_wrong_magic(tiny_bin, tmp_path):
    bad = tmp_path / "m.bin"
    bad.write_bytes(b"GGUF\0\0\0\0" + tiny_bin.read_bytes()[8:])
    assert error_of(bad).startswith(f"{bad}: not a gptoss .bin (magic b'GGUF\\x00\\x00\\x00\\x00'")


def test_unknown_version(tiny_bin, tmp_path):
    data = bytearray(tiny_bin.read_bytes())
    data[8:12] = struct.pack("<I", 2)
    bad = tmp_path / "v.bin"
    bad.write_bytes(bytes(data))
    assert error_of(bad) == (f"{bad}: .bin format version 2, this code reads version 1; export the model "
                             "again with this version")


def test_corrupt_header(tiny_bin, tmp_path):
    data = bytearray(tiny_bin.read_bytes())
    data[PRELUDE.size + 20] ^= 0x01
    bad = tmp_path / "c.bin"
    bad.write_bytes(bytes(data))
    assert error_of(bad) == f"{bad}: corrupt header (checksum mismatch)"
    broken = with_header(tiny_bin, tmp_path / "k.bin", lambda h: h.pop("experts_format"))
    assert error_of(broken) == f"{broken}: corrupt header (KeyError: 'experts_format')"
    unknown = with_header(tiny_bin, tmp_path / "u.bin", lambda h: h["config"].update(colour="blue"))
    assert error_of(unknown).startswith(f"{unknown}: corrupt header (ValueError: unknown config fields")


def test_table_entry_pointing_outside_the_file(tiny_bin, tmp_path):
    size = tiny_bin.stat().st_size

    def move_last(h):
        h["tensors"][-1]["offset"] += 2 * ALIGN

    bad = with_header(tiny_bin, tmp_path / "o.bin", move_last)
    last = read_header(bad)[1]["tensors"][-1]
    assert error_of(bad) == (f"{bad}: unembedding.weight at bytes [{last['offset']}, "
                             f"{last['offset'] + last['nbytes']}) points outside the file ({size} bytes)")


def test_table_entry_with_wrong_nbytes_or_alignment(tiny_bin, tmp_path):
    def shrink(h):
        h["tensors"][3]["nbytes"] -= 2

    bad = with_header(tiny_bin, tmp_path / "n.bin", shrink)
    name = read_header(bad)[1]["tensors"][3]["name"]
    assert f"{bad}: {name} has nbytes" in error_of(bad) and "needs" in error_of(bad)

    def misalign(h):
        h["tensors"][3]["offset"] += 2

    bad = with_header(tiny_bin, tmp_path / "a.bin", misalign)
    assert "not a multiple of 4096" in error_of(bad)

    def overlap(h):
        h["tensors"][4]["offset"] = h["tensors"][3]["offset"]

    bad = with_header(tiny_bin, tmp_path / "l.bin", overlap)
    assert "overlaps" in error_of(bad)


def test_table_that_does_not_match_the_config(tiny_bin, tmp_path):
    def wrong_shape(h):
        h["config"]["num_experts"] = 8

    bad = with_header(tiny_bin, tmp_path / "s.bin", wrong_shape)
    assert error_of(bad) == f"{bad}: block.0.mlp.gate.weight has shape [4, 64], config expects [8, 64]"

    def drop(h):
        h["tensors"] = [t for t in h["tensors"] if t["name"] != "block.1.attn.sinks"]

    bad = with_header(tiny_bin, tmp_path / "d.bin", drop)
    assert error_of(bad).startswith(f"{bad}: block.1.attn.sinks is missing")

    def wrong_dtype(h):
        h["tensors"][0]["dtype"] = "u8"
        h["tensors"][0]["nbytes"] //= 2

    bad = with_header(tiny_bin, tmp_path / "t.bin", wrong_dtype)
    assert error_of(bad) == f"{bad}: embedding.weight has dtype u8, expected bf16 or f32"


def test_header_values_of_the_wrong_kind(tiny_bin, tmp_path):
    """Every table and header value is type-checked before it is used as a number or a key."""
    def entry(key, value):
        return lambda h: h["tensors"][0].update({key: value})

    cases = [
        (lambda h: h["tensors"][0].pop("dtype"), "tensors[0] has no dtype"),
        (lambda h: h.update(file_size=float("inf")), "file_size inf is not a size"),
        (entry("offset", 1e300), "embedding.weight has offset 1e+300, not a byte count"),
        (entry("nbytes", -2), "embedding.weight has nbytes -2, not a byte count"),
        (entry("shape", ["512", 64]), "embedding.weight has shape ['512', 64], not a list of sizes"),
        (entry("name", None), "tensors[0] name and dtype must be strings"),
        (lambda h: h.update(tensors={}), "tensors is not a list: {}"),
        (lambda h: h.update(experts_format="fp8"), "experts_format 'fp8' is not one of ('mxfp4', 'bf16')"),
        (lambda h: h["config"].update(num_layers=10**9, layer_types=[]),
         "invalid model config: num_layers 1000000000 is more than 4096"),
        (lambda h: h["config"].update(rope_theta="150000"),
         "invalid model config: rope_theta must be a finite number (got '150000')"),
    ]
    for i, (edit, message) in enumerate(cases):
        bad = with_header(tiny_bin, tmp_path / f"{i}.bin", edit)
        assert error_of(bad) == f"{bad}: corrupt header (ValueError: {message})"


def test_header_that_is_not_a_json_object(tmp_path):
    bad = tmp_path / "deep.bin"
    for text, why in ((b"[" * 100_000, "JSON nested too deeply"), (b"[]", "not a JSON object: []")):
        bad.write_bytes(PRELUDE.pack(MAGIC, VERSION, zlib.crc32(text), len(text)) + text)
        assert error_of(bad) == f"{bad}: corrupt header (ValueError: {why})"


# ---- the export CLI -------------------------------------------------------------------------------

def export(*args):
    return subprocess.run([sys.executable, str(ROOT / "export" / "export_model_bin.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd="/")


def test_export_cli_end_to_end(tmp_path):
    hf = write_hf_checkpoint(TINY, tmp_path / "hf", "bf16", seed=6, max_shard_bytes=100_000)
    out = tmp_path / "model.bin"
    proc = export("--model", hf, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}") and "(bf16)" in proc.stdout
    assert_bit_identical(open_weights(out), open_weights(hf))

    again = export("--model", hf, "--output", out)
    assert again.returncode == 2 and again.stderr == (f"export_model_bin.py: error: {out} exists; pass --force "
                                                      "to overwrite it\n")
    copy = export("--model", out, "--output", out.with_name("copy.bin"), "--quiet")  # a .bin is a source too
    assert copy.returncode == 0 and copy.stdout == ""
    assert out.with_name("copy.bin").read_bytes() == out.read_bytes()


def test_export_cli_bad_input_is_one_line(tmp_path):
    proc = export("--model", tmp_path / "missing", "--output", tmp_path / "m.bin")
    assert proc.returncode == 2
    assert proc.stderr == f"export_model_bin.py: error: {tmp_path}/missing: no such file or directory\n"

    hf = write_hf_checkpoint(TINY, tmp_path / "hf", "mxfp4", seed=0)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:-10])
    proc = export("--model", hf, "--output", tmp_path / "m.bin")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "truncated" in proc.stderr
    assert not (tmp_path / "m.bin").exists()

    (hf / "model.safetensors").write_bytes(data)
    proc = export("--model", hf, "--output", tmp_path / "no" / "dir" / "m.bin")
    assert proc.returncode == 2 and "no such directory" in proc.stderr

    proc = export("--model", hf)
    assert proc.returncode == 2 and "--output" in proc.stderr


def test_export_cli_help_explains_each_flag():
    text = export("--help").stdout
    for flag in ("--model", "--output", "--force", "--quiet"):
        assert flag in text
    assert "original/" in text and "docs/BIN_FORMAT.md" in text
