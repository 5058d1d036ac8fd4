"""The dense GEMM's tile choice (pure host logic, measured rule in docs/notes/gemm.md)."""
from gptoss.ops.gemm import VARIANTS, pick_variant


def test_decode_shapes_take_the_streaming_variants():
    for M in (1, 8, 64):
        for N in (32, 2880, 5120, 201088):
            name = pick_variant(M, N, 132)
            assert name.startswith("d") and VARIANTS[name].bm >= M


def test_prefill_shapes():
    assert pick_variant(4096, 5120, 132) == "128x128"
    assert pick_variant(2048, 2880, 132) == "128x128"
    assert pick_variant(512, 201088, 132) == "128x128"
    assert pick_variant(512, 5120, 132) == "64x64"  # 160 tiles of 128x128: under two waves
    assert pick_variant(65, 2880, 132) == "64x64"
