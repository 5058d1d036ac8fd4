"""The GPU runner's memory plan sizes the batch from free GPU memory, counting what GPUModel allocates
from the shapes it allocates (pure arithmetic: runs without a GPU)."""
import numpy as np
import pytest

from gptoss.config import GPT_OSS_20B, TINY
from gptoss.engine import EngineConfig
from gptoss.engine.gpu_runner import HEADROOM, plan_memory
from gptoss.errors import ModelTooLargeError
from gptoss.gpu_weights import check_dense_experts, dense_expert_bytes
from gptoss.kernels import KernelOptions
from gptoss.kv_cache import PAGE, KVCache
from gptoss.model import GPUModel, StepBuffers
from gptoss.weights import random_weights


def test_too_little_memory_names_the_numbers():
    with pytest.raises(ModelTooLargeError, match=r"needs [0-9.]+ GiB .* [0-9.]+ GiB is left"):
        plan_memory(GPT_OSS_20B, free_bytes=2 << 30, capacity=131072, wanted_slots=8)


def test_plan_fits_and_grows_with_memory():
    small = plan_memory(GPT_OSS_20B, free_bytes=20 << 30, capacity=2048, wanted_slots=100000)
    large = plan_memory(GPT_OSS_20B, free_bytes=60 << 30, capacity=2048, wanted_slots=100000)
    assert 0 < small.slots < large.slots and small.pages < large.pages
    for plan, free in ((small, 20 << 30), (large, 60 << 30)):
        assert plan.bytes == GPUModel.nbytes(GPT_OSS_20B, plan.slots, 2048, plan.max_step_tokens, plan.pages)
        assert plan.bytes <= free - HEADROOM
        assert plan.pages >= plan.slots * (2048 // PAGE)  # no sharing assumed: every slot can fill up
        # all that is left beside the slots went to pages: one more page would not fit
        assert plan.bytes + KVCache.page_bytes(GPT_OSS_20B) > free - HEADROOM or plan.pages == plan.slots * 2048 // PAGE


def test_sharing_pages_fits_more_slots():
    """Sequences expected to hold 600 of their 2,048 positions: more slots than at full capacity, and
    still the pages for one whole sequence."""
    full = plan_memory(GPT_OSS_20B, free_bytes=40 << 30, capacity=2048, wanted_slots=100000)
    shared = plan_memory(GPT_OSS_20B, free_bytes=40 << 30, capacity=2048, wanted_slots=100000, mean_positions=600)
    assert shared.slots > 2 * full.slots
    assert shared.pages >= shared.slots * -(-600 // PAGE) and shared.pages >= 2048 // PAGE
    assert shared.bytes <= (40 << 30) - HEADROOM


def test_plan_respects_the_cap_and_the_engine_config():
    plan = plan_memory(TINY, free_bytes=8 << 30, capacity=64, wanted_slots=5)
    assert plan.slots == 5 and plan.max_step_tokens >= 5
    config = EngineConfig(prefill_tokens=100)
    plan = plan_memory(GPT_OSS_20B, free_bytes=40 << 30, capacity=2048, wanted_slots=64, config=config)
    assert plan.max_step_tokens == 64 + 100


def test_rings_hold_the_window_and_the_staging_cache_a_steps_chunks():
    """The sliding layers' rings hold exactly the window (whole sequences where the capacity is
    shorter); the staging cache that prompt chunks go through grows with the step's tokens, not with
    the slots, and exists only where a ring wraps."""
    cfg = GPT_OSS_20B
    row = 2 * cfg.num_kv_heads * cfg.head_dim * 2  # K and V of one position, bf16
    table = 9 * -(-2048 // PAGE) * 4
    assert KVCache.nbytes(cfg, 9, 2048, 0) == 12 * 9 * 128 * row + 12 * PAGE * row + table  # (+ the spare pages)
    assert KVCache.nbytes(TINY, 3, TINY.sliding_window, 0) == KVCache.nbytes(TINY, 3, TINY.sliding_window, 0, stage_tokens=500)
    assert KVCache.staging_pages(cfg, 2048, 0) == 0 and KVCache.staging_pages(cfg, 128, 4096) == 0
    small, large = (KVCache.nbytes(cfg, 9, 2048, 0, stage_tokens=t) - KVCache.nbytes(cfg, 9, 2048, 0)
                    for t in (1024, 8192))
    # 64 chunks of window - 1 older keys each, on at most 4 pages a chunk, beside the tokens' own pages
    assert small == (1024 // PAGE + 64 * 4 + 1) * PAGE * row
    assert large - small == (8192 - 1024) * row
    assert GPUModel.nbytes(cfg, 8, 2048, 100, 50) == KVCache.nbytes(cfg, 9, 2048, 50, stage_tokens=100) + \
        StepBuffers.nbytes(cfg, 100, 8) + 4 * GPUModel._decode_floats(cfg, 8, 2048)
    # a whole-capacity ring per slot where the capacity is shorter than the window (no staging)
    assert KVCache.layer_shape(cfg, 0, 9, 100, 0)[1] == 100 and KVCache.layer_shape(cfg, 0, 9, 2048, 0)[1] == 128


def test_counts_are_the_allocated_shapes():
    """The step buffers' count is their shapes' bytes, the MoE workspace's included; the KV cache's is
    linear in pages with page_bytes a page; the model's is its parts."""
    cfg = GPT_OSS_20B
    own = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype, _ in StepBuffers.shapes(cfg, 300, 70).values())
    assert own > 300 * cfg.hidden_size * (4 + 2 + 4 + 2) + 70 * cfg.vocab_size * 4
    assert StepBuffers.nbytes(cfg, 300, 70) > own  # + the router partials and expert rows
    assert StepBuffers.nbytes(cfg, 600, 70) - StepBuffers.nbytes(cfg, 300, 70) >= 300 * 32 * cfg.num_experts * 4
    a, b = (KVCache.nbytes(cfg, 9, 2048, pages) for pages in (10, 11))
    assert b - a == KVCache.page_bytes(cfg) == 12 * PAGE * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    # a slot's rings (what a swap copies beside its pages): 12 sliding layers x window 128
    ring = 12 * 128 * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    assert KVCache.slot_bytes(cfg, 2048) == ring == 2 * KVCache.page_bytes(cfg)
    assert KVCache.slot_bytes(cfg, 2048, "fp8") * 2 == ring
    tokens, rows = GPUModel.step_sizes(8, 100)
    assert (tokens, rows) == (100, 8)
    assert GPUModel.nbytes(cfg, 8, 2048, 100, 50) > KVCache.nbytes(cfg, 9, 2048, 50) + \
        StepBuffers.nbytes(cfg, 100, 8)


def test_fp8_cache_halves_the_kv_bytes_and_doubles_the_pages():
    """An fp8 (e4m3) cache stores a byte per K/V element: half the KV bytes, so about twice the pages in
    the same memory (the step buffers and page table are the same size either way)."""
    cfg = GPT_OSS_20B
    assert KVCache.page_bytes(cfg, "fp8") * 2 == KVCache.page_bytes(cfg)
    table = 9 * -(-2048 // PAGE) * 4
    bf16, fp8 = (KVCache.nbytes(cfg, 9, 2048, 50, dtype, stage_tokens=300) for dtype in ("bf16", "fp8"))
    assert (fp8 - table) * 2 == bf16 - table
    free = 60 << 30
    plans = {dtype: plan_memory(cfg, free, 2048, 100000, config=EngineConfig(kv_cache_dtype=dtype))
             for dtype in ("bf16", "fp8")}
    assert 1.9 < plans["fp8"].slots / plans["bf16"].slots < 2.1
    assert 1.9 < plans["fp8"].pages / plans["bf16"].pages < 2.1
    p = plans["fp8"]
    assert p.bytes == GPUModel.nbytes(cfg, p.slots, 2048, p.max_step_tokens, p.pages,
                                      kv_cache_dtype="fp8") <= free - HEADROOM
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp16")


def test_dense_experts_is_off_by_default_and_its_bytes_are_4x_the_mxfp4_blocks():
    """The dense expert copy (EngineConfig.dense_experts) is bf16 [E, 2I, H] + [E, H, I] per layer: 20b's
    hand-computed bytes, 4x its MXFP4 blocks (half a byte a weight), and a tensor-parallel rank's share."""
    assert EngineConfig().dense_experts is False
    assert EngineConfig(dense_experts=True).dense_experts is True
    assert dense_expert_bytes(GPT_OSS_20B) == 24 * 32 * (5760 * 2880 + 2880 * 2880) * 2
    blocks = sum(int(np.prod(random_weights(TINY, "mxfp4").info(f"block.{i}.mlp.{m}_weight.blocks").shape))
                 for i in range(TINY.num_layers) for m in ("mlp1", "mlp2"))
    assert dense_expert_bytes(TINY) == 4 * blocks
    assert dense_expert_bytes(GPT_OSS_20B, experts=8) * 4 == dense_expert_bytes(GPT_OSS_20B)


def test_dense_experts_are_refused_where_no_kernel_reads_them(monkeypatch):
    """Only the wgmma expert kernels read the copy: bf16 experts and the portable kernels are refused in
    one line that says what to do."""
    import gptoss.ops.moe as moe

    with pytest.raises(ValueError, match="^--dense-experts is for MXFP4 experts; these are bf16 already$"):
        check_dense_experts("bf16")
    with pytest.raises(ValueError, match="wgmma.*drop --dense-experts$"):
        check_dense_experts("mxfp4", KernelOptions(portable=True))
    monkeypatch.setattr(moe, "uses_wgmma", lambda fmt, kernels=None: fmt == "mxfp4")
    check_dense_experts("mxfp4", KernelOptions())
