"""benchmarks/roofline.py's byte and flop model, checked against numbers worked out by hand for the tiny
config, and profile_step.py's roofline report run on a made-up profile (no GPU)."""
import json
import re
from pathlib import Path

import pytest

from benchmarks.roofline import (FAMILIES, Ceilings, Row, StepShape, Work, Segment, attention_work,
                                 expected_experts_touched, expert_bytes, family_work, format_table, roofline_rows)
from gptoss.config import PRESETS, TINY

ROOT = Path(__file__).resolve().parent.parent
# TINY: H 64, 4 query heads and 2 KV heads of 16 (q 64, kv 32, qkv 128), 4 experts of which 2 per token,
# I 64, vocabulary 512, window 8, two layers: layer 0 sliding, layer 1 full.


def test_tiny_is_what_the_hand_numbers_assume():
    c = TINY
    assert (c.hidden_size, c.q_size, c.kv_size, c.qkv_size, c.head_dim, c.num_heads) == (64, 64, 32, 128, 16, 4)
    assert (c.num_experts, c.experts_per_token, c.intermediate_size, c.vocab_size, c.sliding_window) == (4, 2, 64, 512, 8)
    assert c.layer_types == ("sliding_attention", "full_attention")


def test_experts_touched_under_uniform_routing():
    assert expected_experts_touched(4, 2, 1) == 2.0  # one token: exactly k
    assert expected_experts_touched(4, 2, 2) == pytest.approx(3.0)  # 4 * (1 - (1/2)^2)
    assert expected_experts_touched(32, 4, 1) == pytest.approx(4.0)
    assert expected_experts_touched(32, 4, 256) == pytest.approx(32 * (1 - (28 / 32) ** 256))
    assert 31.99 < expected_experts_touched(32, 4, 256) < 32


def test_expert_bytes():
    assert expert_bytes(128, 64, "mxfp4") == 4096 + 256  # half a byte per weight, one scale byte per 32
    assert expert_bytes(128, 64, "bf16") == 16384
    with pytest.raises(ValueError, match="unknown experts format"):
        expert_bytes(128, 64, "fp8")


def test_tiny_decode_one_token_by_hand():
    """Batch 1, 10 cached positions (the new token at position 10): every family's bytes and flops."""
    w = family_work(TINY, StepShape.decode(1, 10))
    assert list(w) == list(FAMILIES)  # both layer types, in step order
    want = {
        # ids 4 + embedding row 128 + norm scale 256 + x 256 + t 128
        "embed + norm": (772, 0),
        # per layer: weights 2*(128*64 + 128) = 16640, t 128, qkv 256; flops 2*64*128
        "qkv gemm": (2 * 17024, 2 * 16384),
        # per layer: qkv 256, cos/sin 64, position + slot 8, q 128, K and V rows 128
        "rope + kv write": (2 * 584, 0),
        # layer 0: q 128 + sinks 16 + K, V of min(11, 8) = 8 positions 2*2*32*8 = 1024 + out 128; 4*4*16*8 flops
        "attention sliding": (1296, 2048),
        # layer 1: the same with all 11 positions: 1408 bytes of K and V; 4*4*16*11 flops
        "attention full": (1680, 2816),
        # per layer: weights 2*(64*64 + 64) = 8320, attn 128, o 128; flops 2*64*64
        "out gemm": (2 * 8576, 2 * 8192),
        # per layer: x 256 in, o 128, scale 256, x 256 out, t 128, t32 256
        "add + norm": (2 * 1280, 0),
        # per layer: t32 256, router 2*(4*64 + 4) = 520, ids and weights 16; flops 2*64*4
        "router": (2 * 792, 2 * 512),
        # per layer: ids 8 in, offsets 20, sorted slots 8
        "moe dispatch": (2 * 36, 0),
        # per layer: 2 experts * (128*64*17/32 = 4352 + bias 256), t 128, y 2*2*64 = 256; flops 2*2*64*128
        "moe mlp1 (gate/up + swiglu)": (2 * 9600, 2 * 32768),
        # per layer: 2 experts * (64*64*17/32 = 2176 + bias 128), y 256, weights 8, out 4*2*64 = 512; 2*2*64*64
        "moe mlp2 (down)": (2 * 5384, 2 * 16384),
        # layer 0: x 256 + out 512 + scale 256 + x 256 + t 128; layer 1 (the last): x 256 + out 512 + x 256
        "moe combine + norm": (1408 + 1024, 0),
        # x row 256, scale 256, unembedding 2*512*64 = 65536, logits 2048; flops 2*64*512
        "final norm + unembedding": (68096, 65536),
        "sampling": (2048 + 4, 0),
    }
    assert {name: (v.bytes, v.flops) for name, v in w.items()} == want


def test_tiny_prefill_attention_is_causal():
    """Ten tokens from position 0: full layers attend 1 + 2 + ... + 10 = 55 (query, key) pairs, sliding
    ones 1 + ... + 8 + 8 + 8 = 52; both read the 10 K and V rows once."""
    step = StepShape.prefill(10)
    kv_rows = 2 * 2 * 32 * 10
    q_and_out = 2 * 2 * 10 * 64
    assert attention_work(TINY, step, 0) == Work(q_and_out + 16 + kv_rows, 4 * 4 * 16 * 55)
    assert attention_work(TINY, step, 8) == Work(q_and_out + 16 + kv_rows, 4 * 4 * 16 * 52)
    # a later chunk (positions 10..14) of a sliding layer reads from position 10 - 8 + 1 = 3: 12 rows,
    # and every query attends 8 positions
    later = StepShape((Segment(10, 5),), 1)
    assert attention_work(TINY, later, 8) == Work(2 * 2 * 5 * 64 + 16 + 2 * 2 * 32 * 12, 4 * 4 * 16 * 5 * 8)
    w = family_work(TINY, step)
    assert w["final norm + unembedding"].flops == 2 * 64 * 512  # one logit row
    # ten tokens over 4 experts, 2 each: 4 * (1 - (1/2)^10) experts' weights read
    touched = 4 * (1 - 0.5 ** 10)
    assert w["moe mlp1 (gate/up + swiglu)"].bytes == pytest.approx(
        2 * (touched * 4608 + 2 * 10 * 64 + 2 * 10 * 2 * 64))


def test_experts_touched_override_and_bounds():
    one = family_work(TINY, StepShape.decode(8, 4), experts_touched=1)
    four = family_work(TINY, StepShape.decode(8, 4), experts_touched=4)
    assert four["moe mlp1 (gate/up + swiglu)"].bytes - one["moe mlp1 (gate/up + swiglu)"].bytes == 2 * 3 * 4608
    assert four["moe mlp2 (down)"].bytes - one["moe mlp2 (down)"].bytes == 2 * 3 * 2304
    with pytest.raises(ValueError, match="outside 0..4"):
        family_work(TINY, StepShape.decode(1, 4), experts_touched=5)


def test_20b_batch_one_reads_about_the_issue_figure():
    """gpt-oss-20b at batch 1: about 3.7 GB read per token (the issue's ≈ 3.5 GB, which leaves out the biases
    and the expert scales), most of it weights."""
    w = family_work(PRESETS["gpt-oss-20b"], StepShape.decode(1, 1024))
    total = sum(v.bytes for v in w.values())
    assert 3.6e9 < total < 3.9e9
    assert w["final norm + unembedding"].bytes == pytest.approx(2 * 201088 * 2880 + 4 * 201088 + 8 * 2880)


def test_share_of_the_roofline():
    c = Ceilings(copy_tbps=4.0, bf16_tflops=800.0)
    assert c.bound_ms(Work(bytes=8e9, flops=0)) == pytest.approx(2.0)  # 8 GB at 4 TB/s
    assert c.bound_ms(Work(bytes=8e9, flops=4e12)) == pytest.approx(5.0)  # 4 TFLOP at 800 TFLOP/s
    rows, step, bounds = roofline_rows({"a": 4.0, "b": 10.0, "other": 1.0},
                                       {"a": Work(8e9, 0), "b": Work(0, 4e12)}, c)
    assert [(r.name, r.limit) for r in rows] == [("a", "bytes"), ("b", "flops"), ("other", "")]
    assert rows[0].share == pytest.approx(0.5) and rows[1].share == pytest.approx(0.5)
    assert rows[2].share is None and rows[2].work is None
    # the step: 15 ms against max(8 GB / 4 TB/s, 4 TFLOP / 800) = 5 ms; the families' bounds add to 7 ms
    assert step.ms == 15.0 and step.bound_ms == pytest.approx(5.0) and step.share == pytest.approx(1 / 3)
    assert bounds == pytest.approx(7.0)
    assert Row("x", 0.0, Work(1, 1), 1.0).share is None


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| family") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def fake_profile(cfg, extra=()) -> dict:
    """Milliseconds per family as GPUModel.profile returns them, made up: 0.1 ms plus 0.01 per place."""
    names = [n for n in FAMILIES if n in family_work(cfg, StepShape.decode(1, 1))] + list(extra)
    return {name: 0.1 + 0.01 * i for i, name in enumerate(names)}


def test_table_has_every_profiled_family():
    profile = fake_profile(TINY, extra=["all-gather + reduce"])
    work = family_work(TINY, StepShape.decode(1, 10))
    rows = table_rows(format_table(profile, work, Ceilings()))
    assert list(rows) == list(profile) + ["**step**"]
    assert rows["all-gather + reduce"][2:] == ["-"] * 7  # a time without a model: no GB, rates, bound
    # qkv: 34048 bytes in 0.11 ms = 0.31 GB/s; share = (34048 / 4.3e12 s) / 0.11 ms
    qkv = rows["qkv gemm"]
    assert qkv[0] == "0.110" and qkv[2] == f"{34048 / 1e9:.3f}" and qkv[6] == "bytes"
    assert qkv[8] == f"{100 * 34048 / 4.3e9 / 0.11:.1f}%"
    step = rows["**step**"]
    assert step[0] == f"{sum(profile.values()):.3f}" and step[1] == "100.0%"
    assert step[2] == f"{sum(w.bytes for w in work.values()) / 1e9:.3f}"


def test_every_marked_family_is_modelled():
    """The names gptoss/model.py and gptoss/ops/moe.py mark are the model's families, bar the two
    tensor-parallel ones: a renamed family would otherwise print without its bytes."""
    marked = set()
    for path in ("gptoss/model.py", "gptoss/ops/moe.py"):
        for call in re.findall(r"mark\((.*?)\)\n", (ROOT / path).read_text()):
            marked.update(re.findall(r'"([^"]+)"', call))
    assert {"attention full", "attention sliding", "sampling", "router"} <= marked
    assert marked - set(FAMILIES) == {"out gemm (rank)", "all-gather + reduce"}
    assert set(FAMILIES) <= marked


def test_report_on_a_made_up_profile(tmp_path, capsys):
    """profile_step.py roofline's report path, fed a made-up profile instead of the GPU's: every family in
    the printed table, the experts line, and the JSON record."""
    from benchmarks.profile_step import main, median_profile, report_steps, roofline_steps
    import argparse

    assert median_profile([{"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 4.0}, {"a": 2.0, "b": 9.0}]) == {"a": 2.0, "b": 5.0}
    args = argparse.Namespace(preset="tiny", context=10, repeats=3, copy_tbps=4.3, peak_tflops=790.0,
                              experts_touched="last-layer", json=str(tmp_path / "r.json"))
    steps = roofline_steps(TINY, [1, 3], 10, 12)
    assert [(t, s.tokens, len(b.tokens)) for t, s, b in steps] == [
        ("decode, batch 1, context 10", 1, 1), ("decode, batch 3, context 10", 3, 3), ("prefill of 12 tokens", 12, 12)]
    profile = fake_profile(TINY, extra=["out gemm (rank)"])
    results = report_steps(args, TINY, steps, lambda step, shape: (profile, 3), "made up")
    out = capsys.readouterr().out
    sections = out.split("### ")[1:]
    assert len(sections) == 3
    for section in sections:
        assert list(table_rows(section)) == list(profile) + ["**step**"]
    assert "experts read per layer: 3.00 of 4 (last-layer used; uniform routing expects 2.00; the last layer's " \
           "routing touched 3)" in sections[0]
    record = json.loads((tmp_path / "r.json").read_text())
    assert record == json.loads(json.dumps(results))
    decode = record["steps"]["decode, batch 1, context 10"]
    assert decode["profile_ms"] == profile and decode["experts_touched"] == 3.0
    assert set(decode["work"]) == set(FAMILIES)
    # --json is refused before anything runs (no GPU needed)
    existing = tmp_path / "r.json"
    assert main(["roofline", "--json", str(existing)]) == 2
    assert capsys.readouterr().err.strip() == f"profile_step.py: error: {existing} exists; pass --force to overwrite it"
