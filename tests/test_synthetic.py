"""Random checkpoints: layout exactly as the spec's Hugging Face table, determinism, weight scales, and a
forward pass through gptoss.reference that stays well scaled with non-flat logits."""
import dataclasses
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptoss.config import TINY, TINY_REAL_HEADS, ModelConfig
from gptoss.weights import canonical_layout, open_weights, random_weights, synthetic, write_hf_checkpoint
from gptoss.weights.bf16 import from_bf16_bits

ROOT = Path(__file__).resolve().parent.parent


def read_safetensors(path):
    """An independent minimal reader: name -> (safetensors dtype, shape, raw bytes as uint8)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    body = np.frombuffer(data, dtype=np.uint8, offset=8 + n)
    return {k: (v["dtype"], tuple(v["shape"]), body[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}


def spec_table(cfg: ModelConfig, experts: str) -> dict:
    """The Hugging Face checkpoint's tensor table (openai/gpt-oss-20b's model.safetensors.index.json and
    transformers' modeling_gpt_oss.py), written out independently of gptoss.weights."""
    H, E, I, V = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    t = {"model.embed_tokens.weight": ("BF16", (V, H)), "model.norm.weight": ("BF16", (H,)),
         "lm_head.weight": ("BF16", (V, H))}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        t.update({
            p + "input_layernorm.weight": ("BF16", (H,)),
            p + "self_attn.q_proj.weight": ("BF16", (q, H)), p + "self_attn.q_proj.bias": ("BF16", (q,)),
            p + "self_attn.k_proj.weight": ("BF16", (kv, H)), p + "self_attn.k_proj.bias": ("BF16", (kv,)),
            p + "self_attn.v_proj.weight": ("BF16", (kv, H)), p + "self_attn.v_proj.bias": ("BF16", (kv,)),
            p + "self_attn.o_proj.weight": ("BF16", (H, q)), p + "self_attn.o_proj.bias": ("BF16", (H,)),
            p + "self_attn.sinks": ("BF16", (cfg.num_heads,)),
            p + "post_attention_layernorm.weight": ("BF16", (H,)),
            p + "mlp.router.weight": ("BF16", (E, H)), p + "mlp.router.bias": ("BF16", (E,)),
            p + "mlp.experts.gate_up_proj_bias": ("BF16", (E, 2 * I)),
            p + "mlp.experts.down_proj_bias": ("BF16", (E, H)),
        })
        if experts == "mxfp4":
            t.update({
                p + "mlp.experts.gate_up_proj_blocks": ("U8", (E, 2 * I, H // 32, 16)),
                p + "mlp.experts.gate_up_proj_scales": ("U8", (E, 2 * I, H // 32)),
                p + "mlp.experts.down_proj_blocks": ("U8", (E, H, I // 32, 16)),
                p + "mlp.experts.down_proj_scales": ("U8", (E, H, I // 32)),
            })
        else:  # [in, out]
            t.update({p + "mlp.experts.gate_up_proj": ("BF16", (E, H, 2 * I)),
                      p + "mlp.experts.down_proj": ("BF16", (E, I, H))})
    return t


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_hf_checkpoint_has_exactly_the_spec_layout(tmp_path, experts):
    cfg = TINY_REAL_HEADS
    write_hf_checkpoint(cfg, tmp_path, experts, seed=0)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    assert {k: v[:2] for k, v in tensors.items()} == spec_table(cfg, experts)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert ModelConfig.from_hf_dict(hf) == cfg
    assert ("quantization_config" in hf) == (experts == "mxfp4")
    assert not list(tmp_path.glob("*.tmp"))


def test_bf16_experts_are_written_transposed_in_and_out(tmp_path):
    cfg = TINY
    write_hf_checkpoint(cfg, tmp_path, "bf16", seed=5)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    w = random_weights(cfg, "bf16", seed=5)
    for proj, which in (("gate_up_proj", "mlp1"), ("down_proj", "mlp2")):
        _, shape, raw = tensors[f"model.layers.1.mlp.experts.{proj}"]
        in_out = from_bf16_bits(raw.view(np.uint16).reshape(shape))  # [E, in, out]
        out_in = w.expert_weights_f32(1, which)  # [E, out, in]
        np.testing.assert_array_equal(in_out, out_in.transpose(0, 2, 1))


def test_q_k_v_are_the_rows_of_the_fused_qkv(tmp_path):
    cfg = TINY
    write_hf_checkpoint(cfg, tmp_path, "mxfp4", seed=2)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    qkv = random_weights(cfg, "mxfp4", seed=2).raw("block.0.attn.qkv.weight")
    parts = [tensors[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    joined = np.concatenate([raw.view(np.uint16).reshape(shape) for _, shape, raw in parts])
    np.testing.assert_array_equal(joined, qkv)


def test_same_seed_same_weights_in_any_order_other_seed_differs():
    a, b, c = random_weights(TINY, seed=1), random_weights(TINY, seed=1), random_weights(TINY, seed=2)
    names = a.names()
    assert names == list(canonical_layout(TINY, "mxfp4"))
    first = {n: a.raw(n).copy() for n in names}
    for n in reversed(names):
        np.testing.assert_array_equal(b.raw(n), first[n])
        assert b.info(n).shape == first[n].shape
    assert not np.array_equal(c.raw("embedding.weight"), first["embedding.weight"])
    # distinct names draw distinct streams
    assert not np.array_equal(first["block.0.attn.out.bias"], first["block.1.attn.out.bias"])


def test_chunked_generation_is_identical_whole_or_streamed(monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ELEMENTS", 100)  # many chunks, made by several threads
    w = random_weights(TINY, "mxfp4", seed=3)
    for name in ("embedding.weight", "block.0.mlp.mlp1_weight.blocks", "block.1.mlp.mlp2_weight.scales"):
        whole = w.raw(name)
        chunks = list(w.chunks(name))
        assert len(chunks) > 1
        np.testing.assert_array_equal(np.concatenate(chunks), whole)
        np.testing.assert_array_equal(random_weights(TINY, "mxfp4", seed=3).raw(name), whole)


def test_raw_arrays_are_read_only():
    w = random_weights(TINY)
    with pytest.raises(ValueError):
        w.raw("embedding.weight")[0, 0] = 1


def test_weight_scales():
    cfg = TINY_REAL_HEADS
    H, I = cfg.hidden_size, cfg.intermediate_size
    w = random_weights(cfg, "mxfp4", seed=0)
    bf = random_weights(cfg, "bf16", seed=0)

    def near(x, target, rel):
        assert abs(float(x) - target) <= rel * target, (float(x), target)

    near(w.f32("embedding.weight").std(), 1.0, 0.03)
    near(w.f32("unembedding.weight").std(), 3 / math.sqrt(H), 0.03)
    near(w.f32("block.0.attn.qkv.weight").std(), 1 / math.sqrt(H), 0.03)
    near(w.f32("block.0.attn.out.weight").std(), 1 / math.sqrt(cfg.q_size), 0.03)
    near(w.f32("block.0.mlp.gate.weight").std(), 1 / math.sqrt(H), 0.1)
    near(w.f32("block.1.mlp.norm.scale").mean(), 1.0, 0.05)
    near(w.f32("block.1.mlp.norm.scale").std(), 0.1, 0.3)
    assert w.f32("block.0.attn.sinks").std() > 0.5
    assert 0 < w.f32("block.0.mlp.mlp1_bias").std() < 0.05
    for which, fan_in in (("mlp1", H), ("mlp2", I)):
        near(w.expert_weights_f32(1, which).std(), 1 / math.sqrt(fan_in), 0.15)
        near(bf.expert_weights_f32(1, which).std(), 1 / math.sqrt(fan_in), 0.03)
    scales = w.raw("block.0.mlp.mlp1_weight.scales")
    assert len(np.unique(scales)) >= 2  # jitter: neighbouring powers of two
    codes = w.raw("block.0.mlp.mlp1_weight.blocks")
    nibbles = np.concatenate([codes & 15, codes >> 4]).ravel()
    assert np.bincount(nibbles, minlength=16).min() > 0.8 * len(nibbles) / 16  # all 16 codes, uniformly


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_forward_stays_well_scaled_and_logits_are_not_flat(experts):
    reference = pytest.importorskip("gptoss.reference")
    cfg = dataclasses.replace(TINY, num_layers=8, layer_types=())
    model = reference.ReferenceModel(random_weights(cfg, experts, seed=0))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 24)
    positions = np.arange(len(tokens))
    cos, sin = reference.rope_cos_sin(cfg, positions)
    cache = model.new_cache()
    x = model.embed(tokens)
    for i in range(cfg.num_layers):  # forward's loop, watching the residual stream and the router
        x = x + model.attention_block(i, x, positions, cos, sin, cache)
        t = reference.rmsnorm(x, model.mlp_norm[i], cfg.rms_norm_eps)
        router = t @ model.moe[i].router_weight.T + model.moe[i].router_bias
        assert 0.5 < router.std(axis=1).mean() < 1.5, (i, router.std(axis=1).mean())
        x = x + reference.moe(t, model.moe[i], cfg)
        rms = np.sqrt(np.mean(x ** 2))
        assert 0.8 < rms < 1.5 * math.sqrt(i + 2), (i, rms)  # grows like a random walk, no blow-up
    logits = model.forward(tokens, model.new_cache())
    assert np.isfinite(logits).all()
    assert 2.0 < logits.std(axis=1).mean() < 4.0
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(p + 1e-30)).sum(axis=1).mean()
    assert 1.0 < entropy < 0.8 * math.log(cfg.vocab_size)  # neither flat nor one-hot
    assert len(set(logits.argmax(axis=1).tolist())) > len(tokens) // 3  # the prediction depends on the input


def test_sharded_checkpoint_keeps_shards_under_the_limit(tmp_path):
    write_hf_checkpoint(TINY, tmp_path, "mxfp4", seed=0, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    total = 0
    for f in files:
        tensors = read_safetensors(tmp_path / f)
        size = sum(len(raw) for _, _, raw in tensors.values())
        assert size <= 60_000 or len(tensors) == 1
        assert all(index["weight_map"][k] == f for k in tensors)
        total += size
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(spec_table(TINY, "mxfp4"))


def test_holds_checkpoint_only_when_finished_with_the_same_arguments(tmp_path):
    write_hf_checkpoint(TINY, tmp_path, "mxfp4", seed=1, max_shard_bytes=100_000)
    assert synthetic.holds_checkpoint(tmp_path, TINY, "mxfp4", seed=1, max_shard_bytes=100_000)
    for other in ({"seed": 2}, {"experts": "bf16"}, {"max_shard_bytes": 200_000}):
        args = {"experts": "mxfp4", "seed": 1, "max_shard_bytes": 100_000, **other}
        assert not synthetic.holds_checkpoint(tmp_path, TINY, **args)
    assert not synthetic.holds_checkpoint(tmp_path, TINY_REAL_HEADS, "mxfp4", 1, 100_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])  # a shard cut short (an interrupted write)
    assert not synthetic.holds_checkpoint(tmp_path, TINY, "mxfp4", 1, 100_000)
    shard.write_bytes(data)
    (tmp_path / synthetic.RECIPE_FILE).write_text("{not json")
    assert not synthetic.holds_checkpoint(tmp_path, TINY, "mxfp4", 1, 100_000)
    assert not synthetic.holds_checkpoint(tmp_path / "nowhere", TINY, "mxfp4", 1, 100_000)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "export" / "make_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd="/")


def test_make_checkpoint_cli(tmp_path):
    out = tmp_path / "m"
    proc = run_cli("--preset", "tiny", "--experts", "bf16", "--seed", "7", "--out", out, "--shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "seed 7" in proc.stdout
    assert (out / "model.safetensors.index.json").exists()
    loaded, expected = open_weights(out), random_weights(TINY, "bf16", seed=7)
    assert loaded.config == TINY and loaded.experts_format == "bf16"
    for name in expected.names():
        np.testing.assert_array_equal(loaded.raw(name), expected.raw(name))

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_cli("--preset", "tiny", "--out", out)  # other arguments: refused, nothing touched
    assert again.returncode == 2 and "already holds another checkpoint; pass --force" in again.stderr
    assert "Traceback" not in again.stderr
    same = run_cli("--preset", "tiny", "--experts", "bf16", "--seed", "7", "--out", out, "--shard-size", "100KB")
    assert same.returncode == 0 and "already holds this checkpoint" in same.stdout, same.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    from_config = run_cli("--config", out / "config.json", "--out", tmp_path / "c", "--quiet")
    assert from_config.returncode == 0, from_config.stderr
    assert open_weights(tmp_path / "c").config == TINY

    own_keys = tmp_path / "own.json"  # ModelConfig.to_dict() keys
    own_keys.write_text(json.dumps(TINY.to_dict()))
    assert run_cli("--config", own_keys, "--out", tmp_path / "o", "--quiet").returncode == 0
    assert open_weights(tmp_path / "o").config == TINY
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    proc = run_cli("--config", not_object, "--out", tmp_path / "l")
    assert proc.returncode == 2 and "not a JSON object" in proc.stderr and "Traceback" not in proc.stderr

    bad = run_cli("--preset", "tiny", "--out", tmp_path / "x", "--shard-size", "2XB")
    assert bad.returncode == 2 and "is not a size" in bad.stderr
    assert run_cli("--help").stdout.count("--shard-size") >= 1
