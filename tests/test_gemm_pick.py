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


def test_wgmma_variants_for_large_m_only():
    """On sm_90a (wgmma=True): 128 x 256 tiles once they make a wave, else 128 x 128, else the mma.sync
    rule; decode shapes keep the streaming mma.sync variants (they give the same bits)."""
    assert pick_variant(4096, 5120, 132, wgmma=True) == "wg128x256"
    assert pick_variant(2048, 2880, 132, wgmma=True) == "wg128x256"  # 16 x 12 = 192 tiles
    assert pick_variant(512, 5120, 132, wgmma=True) == "wg128x128"   # 80 tiles of 128 x 256, 160 of 128 x 128
    assert pick_variant(512, 2880, 132, wgmma=True) == "64x64"       # 92 tiles of 128 x 128
    for M in (1, 7, 64):
        assert pick_variant(M, 5120, 132, wgmma=True) == pick_variant(M, 5120, 132)


def test_tma_variants_where_tensor_maps_exist():
    """The measured rule (docs/notes/gemm.md, "Mid-size M"): 128 x 256 tiles from half a wave of them,
    128 x 128 where their last wave is much fuller, 128 x 64 under half a wave."""
    for M, N in ((4096, 5120), (2048, 5120), (8192, 2880), (2048, 201088), (128, 201088)):
        assert pick_variant(M, N, 132, wgmma=True, tma=True) == "wgt128x256"
    assert pick_variant(1024, 2880, 132, wgmma=True, tma=True) == "wgt128x256"  # 96 tiles: half a wave
    assert pick_variant(512, 5120, 132, wgmma=True, tma=True) == "wgt128x256"   # 80 tiles
    assert pick_variant(1024, 5120, 132, wgmma=True, tma=True) == "wgt128x128"  # 160 wide tiles: 1.2 waves
    assert pick_variant(2048, 2880, 132, wgmma=True, tma=True) == "wgt128x128"  # 192 wide tiles
    for M, N in ((65, 5120), (256, 5120), (512, 2880)):                         # at most 48 wide tiles
        assert pick_variant(M, N, 132, wgmma=True, tma=True) == "wgt128x64"
    assert pick_variant(4096, 32, 132, wgmma=True, tma=True) == "64x64"         # the router's N: as before
    for M in (1, 64):
        assert pick_variant(M, 5120, 132, wgmma=True, tma=True) == pick_variant(M, 5120, 132, wgmma=True)
    assert pick_variant(4096, 5120, 132, wgmma=False, tma=True) == "128x128"  # tensor maps alone: no wgmma


def test_available_variants_hide_wgmma_without_sm90a():
    from gptoss.ops.gemm import available_variants

    wg = {name for name, v in VARIANTS.items() if v.wgmma}
    tma = {"wgt128x256", "wgt128x128", "wgt128x64"}
    assert wg == tma | {"wg128x256", "wg128x128"}
    assert not wg & set(available_variants(wgmma=False, tma=True))
    assert set(available_variants(wgmma=True, tma=True)) == set(VARIANTS)
    assert set(available_variants(wgmma=True, tma=False)) == set(VARIANTS) - tma
    for name in wg:  # two consumer warpgroups (+ a producer for TMA); 1 KB of alignment slack in the ring
        v = VARIANTS[name]
        assert v.threads == (384 if v.tma else 256) and v.smem == v.stages * (v.bm + v.bn) * v.bk * 2 + 1024
