"""open_weights on Hugging Face directories (single file, sharded, MXFP4 and bf16 experts), OpenAI's
original/ layout, and every kind of bad input: each must fail with a one-line message naming the file."""
import json
import shutil
import struct

import numpy as np
import pytest

from gptoss.config import TINY
from gptoss.weights import CheckpointError, open_weights, random_weights, write_hf_checkpoint, write_safetensors
from gptoss.weights.mxfp4 import dequantize

H, Q = TINY.hidden_size, TINY.q_size


@pytest.fixture(scope="module")
def hf_mxfp4(tmp_path_factory):
    return write_hf_checkpoint(TINY, tmp_path_factory.mktemp("hf_mxfp4"), "mxfp4", seed=11)


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    return write_hf_checkpoint(TINY, tmp_path_factory.mktemp("hf_bf16"), "bf16", seed=12)


def assert_same(a, b):
    assert a.config == b.config and a.experts_format == b.experts_format
    assert a.names() == b.names()
    for name in a.names():
        assert a.info(name) == b.info(name), name
        np.testing.assert_array_equal(a.raw(name), b.raw(name), err_msg=name)


# ---- reading good checkpoints ---------------------------------------------------------------------

def test_hf_mxfp4_round_trip(hf_mxfp4):
    w = open_weights(hf_mxfp4)
    assert_same(w, random_weights(TINY, "mxfp4", seed=11))
    assert w.experts_format == "mxfp4"
    assert w.info("block.0.mlp.mlp1_weight.blocks").shape == (4, 128, 2, 16)
    blocks, scales = w.raw("block.1.mlp.mlp2_weight.blocks"), w.raw("block.1.mlp.mlp2_weight.scales")
    np.testing.assert_array_equal(w.expert_weights_f32(1, "mlp2"), dequantize(blocks, scales))
    assert w.f32("block.0.attn.sinks").dtype == np.float32
    with pytest.raises(TypeError, match="not a float tensor"):
        w.f32("block.0.mlp.mlp1_weight.scales")
    with pytest.raises(KeyError, match="no tensor"):
        w.raw("model.embed_tokens.weight")


def test_hf_bf16_experts_come_out_as_out_by_in(hf_bf16):
    w = open_weights(hf_bf16)
    generated = random_weights(TINY, "bf16", seed=12)
    assert w.experts_format == "bf16"
    assert w.info("block.0.mlp.mlp1_weight").shape == (4, 2 * TINY.intermediate_size, H)
    assert w.info("block.0.mlp.mlp2_weight").shape == (4, H, TINY.intermediate_size)
    for layer in range(TINY.num_layers):
        for which in ("mlp1", "mlp2"):
            np.testing.assert_array_equal(w.expert_weights_f32(layer, which),
                                          generated.expert_weights_f32(layer, which))
    assert_same(w, generated)


def test_tensors_are_memory_mapped_views(hf_mxfp4):
    w = open_weights(hf_mxfp4)
    emb = w.raw("embedding.weight")
    assert isinstance(emb.base, np.ndarray) and not emb.flags.owndata and not emb.flags.writeable
    assert emb.dtype == np.uint16


def test_sharded_equals_single_file(tmp_path, hf_mxfp4):
    sharded = write_hf_checkpoint(TINY, tmp_path / "s", "mxfp4", seed=11, max_shard_bytes=30_000)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 3
    assert_same(open_weights(sharded), open_weights(hf_mxfp4))


def test_shards_without_an_index_are_found_by_glob(tmp_path):
    d = write_hf_checkpoint(TINY, tmp_path / "s", "bf16", seed=1, max_shard_bytes=30_000)
    (d / "model.safetensors.index.json").unlink()
    assert_same(open_weights(d), random_weights(TINY, "bf16", seed=1))


def write_original(directory, cfg, seed, beta_slow=1.0, beta_fast=32.0):
    """OpenAI's original/ layout: canonical names, norm scales in f32, its own config.json keys."""
    directory.mkdir(parents=True)
    w = random_weights(cfg, "mxfp4", seed)
    tensors = []
    for name in w.names():
        arr = w.f32(name) if name.endswith("norm.scale") else w.raw(name)
        dtype = "f32" if name.endswith("norm.scale") else w.info(name).dtype
        tensors.append((name, dtype, arr.shape, [arr]))
    write_safetensors(directory / "model.safetensors", tensors)
    config = {"num_hidden_layers": cfg.num_layers, "num_experts": cfg.num_experts,
              "experts_per_token": cfg.experts_per_token, "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "swiglu_limit": cfg.swiglu_limit, "head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "sliding_window": cfg.sliding_window,
              "initial_context_length": cfg.rope_initial_context, "rope_theta": cfg.rope_theta,
              "rope_scaling_factor": cfg.rope_scaling_factor, "rope_ntk_alpha": beta_slow,
              "rope_ntk_beta": beta_fast}
    (directory / "config.json").write_text(json.dumps(config))
    return w


def test_original_layout(tmp_path):
    generated = write_original(tmp_path / "ckpt" / "original", TINY, seed=4, beta_slow=2.0, beta_fast=16.0)
    for path in (tmp_path / "ckpt" / "original", tmp_path / "ckpt"):  # the folder, or its parent
        w = open_weights(path)
        cfg = w.config
        assert (cfg.rope_beta_slow, cfg.rope_beta_fast) == (2.0, 16.0)
        assert (cfg.num_layers, cfg.num_experts, cfg.experts_per_token) == (2, 4, 2)
        assert cfg.hidden_size == H and cfg.sliding_window == TINY.sliding_window
        assert w.experts_format == "mxfp4" and w.names() == generated.names()
        assert w.info("norm.scale").dtype == "f32"
        np.testing.assert_array_equal(w.f32("norm.scale"), generated.f32("norm.scale"))
        for name in generated.names():
            if not name.endswith("norm.scale"):
                np.testing.assert_array_equal(w.raw(name), generated.raw(name))


def test_f32_float_tensors_are_accepted(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    sinks = np.linspace(-1, 1, TINY.num_heads, dtype=np.float32)
    rewrite(d / "model.safetensors", replace={"model.layers.0.self_attn.sinks": ("f32", sinks)})
    w = open_weights(d)
    assert w.info("block.0.attn.sinks").dtype == "f32"
    np.testing.assert_array_equal(w.f32("block.0.attn.sinks"), sinks)


# ---- bad input ------------------------------------------------------------------------------------

def copy_checkpoint(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def read_all(path):
    """name -> (our dtype, array) with an independent header parse."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    kinds = {"BF16": ("bf16", np.uint16), "F32": ("f32", np.float32), "U8": ("u8", np.uint8)}
    out = {}
    for name, meta in header.items():
        dtype, np_dtype = kinds[meta["dtype"]]
        a, b = meta["data_offsets"]
        out[name] = (dtype, np.frombuffer(data[8 + n + a:8 + n + b], dtype=np_dtype).reshape(meta["shape"]))
    return out


def rewrite(path, drop=(), replace=None):
    """Rewrite one safetensors file without some tensors and with others replaced (or added)."""
    tensors = read_all(path)
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    write_safetensors(path, [(n, d, a.shape, [a]) for n, (d, a) in tensors.items()])


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_weights(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_tensor(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    rewrite(d / "model.safetensors", drop=["model.layers.1.mlp.router.bias"])
    assert error_of(d) == (f"{d}/model.safetensors: model.layers.1.mlp.router.bias is missing; config.json "
                           "describes 2 layers, 4 experts")


def test_unexpected_tensor(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    rewrite(d / "model.safetensors", replace={"model.layers.2.mlp.router.bias": ("bf16", np.ones(4, np.uint16))})
    message = error_of(d)
    assert message.startswith(f"{d}/model.safetensors: unexpected tensor model.layers.2.mlp.router.bias")
    assert "2 layers" in message


def test_wrong_shape(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    bad = np.zeros((Q, H // 2), dtype=np.uint16)
    rewrite(d / "model.safetensors", replace={"model.layers.1.self_attn.q_proj.weight": ("bf16", bad)})
    assert error_of(d) == (f"{d}/model.safetensors: model.layers.1.self_attn.q_proj.weight has shape "
                           f"[{Q}, {H // 2}], config expects [{Q}, {H}]")


def test_wrong_dtype(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"
    scales = read_all(d / "model.safetensors")[name][1]
    rewrite(d / "model.safetensors", replace={name: ("bf16", scales.astype(np.uint16))})
    assert error_of(d) == f"{d}/model.safetensors: {name} has dtype bf16, expected u8"


def test_wrong_dtype_in_a_shard_names_the_shard(tmp_path):
    d = write_hf_checkpoint(TINY, tmp_path / "s", "mxfp4", seed=0, max_shard_bytes=30_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.sinks"
    shard = d / index[name]
    rewrite(shard, replace={name: ("u8", np.zeros(TINY.num_heads, np.uint8))})
    assert error_of(d) == f"{shard}: {name} has dtype u8, expected bf16 or f32"


def test_config_that_does_not_match_the_tensors(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    config = json.loads((d / "config.json").read_text())
    json.dump(dict(config, hidden_size=128), open(d / "config.json", "w"))
    assert error_of(d) == (f"{d}/model.safetensors: model.embed_tokens.weight has shape [512, 64], config "
                           "expects [512, 128]")
    json.dump(dict(config, num_local_experts=8), open(d / "config.json", "w"))
    assert "model.layers.0.mlp.router.weight has shape [4, 64], config expects [8, 64]" in error_of(d)
    json.dump(dict(config, num_hidden_layers=3, layer_types=None), open(d / "config.json", "w"))
    assert "model.layers.2.input_layernorm.weight is missing" in error_of(d)
    json.dump(dict(config, num_hidden_layers=1, layer_types=None), open(d / "config.json", "w"))
    assert "unexpected tensor model.layers.1." in error_of(d)
    json.dump({k: v for k, v in config.items() if k != "head_dim"}, open(d / "config.json", "w"))
    assert error_of(d) == f"{d}/config.json: config.json lacks head_dim"
    (d / "config.json").write_text("{not json")
    assert error_of(d).startswith(f"{d}/config.json: not valid JSON")
    (d / "config.json").unlink()
    assert error_of(d).startswith(f"{d}/config.json: missing")


def test_truncated_safetensors(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    message = error_of(d)
    assert message.startswith(f"{path}: truncated: lm_head.weight ends at byte {len(data)}, the file has "
                              f"{len(data) - 100} bytes")
    path.write_bytes(data[:1000])
    assert error_of(d).startswith(f"{path}: header length") and "runs past the end of the file" in error_of(d)
    path.write_bytes(data[:5])
    assert "too short to be a safetensors file" in error_of(d)


def test_corrupt_safetensors_header(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("[")  # the JSON object now starts as an array
    path.write_bytes(bytes(data))
    assert error_of(d).startswith(f"{path}: corrupt safetensors header")


def test_index_naming_a_missing_shard(tmp_path):
    d = write_hf_checkpoint(TINY, tmp_path / "s", "mxfp4", seed=0, max_shard_bytes=30_000)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert error_of(d) == f"{d}/model.safetensors.index.json: lists shard {victim.name}, which is not in {d}"


def test_no_checkpoint_at_all(tmp_path):
    assert error_of(tmp_path / "nowhere") == f"{tmp_path}/nowhere: no such file or directory"
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    assert "no model.safetensors" in error_of(tmp_path)


def test_a_single_safetensors_file_is_refused_with_a_hint(hf_mxfp4):
    assert "pass the checkpoint directory" in error_of(hf_mxfp4 / "model.safetensors")


def test_synthetic_preset_names_random_weights_of_its_shape():
    weights = open_weights("synthetic:tiny")
    assert weights.config == TINY and weights.experts_format == "mxfp4"
    reference = random_weights(TINY, "mxfp4", seed=0)
    for name in ("embedding.weight", "block.1.mlp.mlp2_weight.blocks"):
        np.testing.assert_array_equal(weights.raw(name), reference.raw(name))
    message = error_of("synthetic:no-such-preset")
    assert message.startswith("synthetic:no-such-preset: unknown preset 'no-such-preset'; presets: ")
    assert "tiny" in message and "gpt-oss-20b" in message


def edit_header(path, edit):
    """Rewrite a safetensors file with its JSON header edited in place and the data untouched."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_safetensors_entries_of_the_wrong_kind(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    path = d / "model.safetensors"
    original = path.read_bytes()
    cases = [
        ({"dtype": []}, "dtype [] is not a string"),
        ({"shape": [1e300, 64]}, "shape [1e+300, 64] is not a list of sizes"),
        ({"shape": [-512, -64]}, "shape [-512, -64] is not a list of sizes"),
        ({"data_offsets": [0, float("inf")]}, "data_offsets [0, inf] is not two byte offsets"),
        ({"data_offsets": [0, 1, 2]}, "data_offsets [0, 1, 2] is not two byte offsets"),
    ]
    for change, why in cases:
        path.write_bytes(original)
        edit_header(path, lambda h: h["lm_head.weight"].update(change))
        assert error_of(d) == f"{path}: corrupt safetensors header entry for lm_head.weight ({why})"
    edit_header(path, lambda h: h["lm_head.weight"].pop("dtype"))
    assert error_of(d) == f"{path}: corrupt safetensors header entry for lm_head.weight (no dtype)"
    path.write_bytes(struct.pack("<Q", 100_000) + b"[" * 100_000)
    assert error_of(d) == f"{path}: corrupt safetensors header (JSON nested too deeply)"


def test_tensors_sharing_bytes_are_refused(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    path = d / "model.safetensors"
    shared = {}

    def alias(h):
        shared.update(h["model.layers.0.input_layernorm.weight"])
        h["model.norm.weight"]["data_offsets"] = shared["data_offsets"]

    edit_header(path, alias)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    start, end = (8 + n + o for o in shared["data_offsets"])
    assert error_of(d) == (f"{path}: model.norm.weight at bytes [{start}, {end}) overlaps "
                           "model.layers.0.input_layernorm.weight")


def test_names_from_the_file_cannot_break_the_message_line(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    rewrite(d / "model.safetensors", replace={"x\ny\x1b[2J": ("u8", np.zeros(4, np.uint8))})
    assert error_of(d) == (f"{d}/model.safetensors: unexpected tensor x\\ny\\x1b[2J; config.json describes 2 "
                           "layers, 4 experts")


def test_index_shard_names_stay_in_the_checkpoint(tmp_path):
    """A weight_map value is a file name in the checkpoint directory: a path, even to a valid shard, or a
    value that is not a string is refused before any file is opened."""
    d = write_hf_checkpoint(TINY, tmp_path / "s", "mxfp4", seed=0, max_shard_bytes=30_000)
    index = d / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    first = original["weight_map"]["model.embed_tokens.weight"]
    shutil.copy(d / first, tmp_path / "outside.safetensors")  # a valid shard, outside
    for value in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "..", None, ["a"]):
        weight_map = {name: value if file == first else file for name, file in original["weight_map"].items()}
        index.write_text(json.dumps(dict(original, weight_map=weight_map)))
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        assert error_of(d) == f"{index}: model.embed_tokens.weight is in {shown}, not a file name in {d}"
    index.write_text("[" * 100_000)
    assert error_of(d) == f"{index}: not a valid index (needs a 'weight_map' object)"


def test_config_json_values_of_the_wrong_kind(tmp_path, hf_mxfp4):
    d = copy_checkpoint(hf_mxfp4, tmp_path)
    config = json.loads((d / "config.json").read_text())
    path = d / "config.json"
    cases = [
        (dict(config, hidden_size=float("inf")), "hidden_size must be an integer (got inf)"),
        ({k: v for k, v in config.items() if k != "layer_types"} | {"num_hidden_layers": 10**9},
         "invalid model config: num_layers 1000000000 is more than 4096"),
        (dict(config, rope_scaling=None, rope_parameters=None, rope_theta=1),
         "invalid model config: rope_theta must be above 1 (got 1.0)"),
        ([config], "not a JSON object"),
    ]
    for raw, why in cases:
        path.write_text(json.dumps(raw))
        assert error_of(d) == f"{path}: {why}"
    path.write_text("[" * 100_000)
    assert error_of(d) == f"{path}: not valid JSON (JSON nested too deeply)"
    path.unlink()
    path.mkdir()
    assert error_of(d) == f"{path}: cannot read (Is a directory)"
