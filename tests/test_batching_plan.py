"""plan_memory sizes the batch from free GPU memory (pure arithmetic: runs without a GPU)."""
import pytest

from gptoss.batching import PREFILL_CHUNK, plan_memory
from gptoss.config import GPT_OSS_20B, TINY
from gptoss.model import PAGE, KVCache, ModelTooLargeError, activation_bytes_per_token


def test_too_little_memory_names_the_numbers():
    with pytest.raises(ModelTooLargeError, match=r"needs [0-9.]+ GiB .* [0-9.]+ GiB is left"):
        plan_memory(GPT_OSS_20B, free_bytes=2 << 30, capacity=131072, wanted_slots=8)


def test_plan_fits_and_grows_with_memory():
    small = plan_memory(GPT_OSS_20B, free_bytes=20 << 30, capacity=2048, wanted_slots=100000)
    large = plan_memory(GPT_OSS_20B, free_bytes=60 << 30, capacity=2048, wanted_slots=100000)
    assert 0 < small.slots < large.slots and small.pages < large.pages
    for plan, free in ((small, 20 << 30), (large, 60 << 30)):
        assert plan.kv_bytes + plan.activation_bytes <= free - (1 << 30)
        assert plan.kv_bytes == ((plan.slots + 1) * KVCache.slot_bytes(GPT_OSS_20B, 2048, PREFILL_CHUNK)
                                 + (plan.pages + 1) * KVCache.page_bytes(GPT_OSS_20B))
        assert plan.pages >= plan.slots * (2048 // PAGE)  # no sharing assumed: every slot can fill up
        # all that is left beside the slots went to pages: one more page would not fit
        assert plan.kv_bytes + plan.activation_bytes + KVCache.page_bytes(GPT_OSS_20B) > free - (1 << 30) \
            or plan.pages == plan.slots * 2048 // PAGE


def test_sharing_pages_fits_more_slots():
    """Sequences expected to hold 600 of their 2,048 positions: more slots than at full capacity, and
    still the pages for one whole sequence."""
    full = plan_memory(GPT_OSS_20B, free_bytes=40 << 30, capacity=2048, wanted_slots=100000)
    shared = plan_memory(GPT_OSS_20B, free_bytes=40 << 30, capacity=2048, wanted_slots=100000, mean_positions=600)
    assert shared.slots > 2 * full.slots
    assert shared.pages >= shared.slots * -(-600 // PAGE) and shared.pages >= 2048 // PAGE
    assert shared.kv_bytes + shared.activation_bytes <= (40 << 30) - (1 << 30)


def test_plan_respects_the_cap():
    plan = plan_memory(TINY, free_bytes=8 << 30, capacity=64, wanted_slots=5)
    assert plan.slots == 5
    assert plan.max_step_tokens >= 5


def test_activation_count_covers_router_partials():
    cfg = GPT_OSS_20B
    assert activation_bytes_per_token(cfg) >= 4 * cfg.num_experts * 4 + cfg.hidden_size * 4
