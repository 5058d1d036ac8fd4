"""Expert and attention tensor parallel on the CPU with simulated ranks (gptoss/parallel/tensor.py): the
forward with heads and experts split over R ranks, partial sums reduced in rank order, equals the
unsharded reference forward within 1e-6 relative error, for R = 1, 2, 4, 8 and both models' head and
expert counts (64 query / 8 kv heads; 32 experts top-4 like 20b, 128 experts top-4 like 120b)."""
import dataclasses

import numpy as np
import pytest

from gptoss.config import TINY_REAL_HEADS
from gptoss.parallel.tensor import ShardedReference, ShardPlan, reduce_in_rank_order
from gptoss.reference import ReferenceModel
from gptoss.weights.synthetic import random_weights

SHAPES = {"20b-like": dataclasses.replace(TINY_REAL_HEADS, num_experts=32),
          "120b-like": dataclasses.replace(TINY_REAL_HEADS, num_experts=128)}
PROMPT = 20  # past the sliding window of 16, so both kinds of layer see their masks differ
DECODE = 3


def relative_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    return ReferenceModel(random_weights(SHAPES[request.param], "mxfp4", seed=11))


@pytest.fixture(scope="module")
def unsharded(model):
    """Prefill logits, then the logits of DECODE one-token steps through the cache."""
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, model.config.vocab_size, PROMPT)
    steps = rng.integers(0, model.config.vocab_size, DECODE)
    cache = model.new_cache()
    logits = [model.forward(prompt, cache)] + [model.forward([t], cache) for t in steps]
    return prompt, steps, logits


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_sharded_forward_equals_the_reference(model, unsharded, ranks):
    prompt, steps, expected = unsharded
    sharded = ShardedReference(model, ranks)
    caches = sharded.new_cache()
    got = [sharded.forward(prompt, caches)] + [sharded.forward([t], caches) for t in steps]
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert relative_error(g, e) < 1e-6
    for cache in caches:  # each rank holds only its kv heads, every position
        assert cache.k[0].shape == (PROMPT + DECODE, model.config.num_kv_heads // ranks, model.config.head_dim)
    # the split cache concatenated over ranks is the unsharded cache
    full = model.new_cache()
    model.forward(np.concatenate([prompt, steps]), full)
    for i in range(model.config.num_layers):
        k = np.concatenate([c.k[i] for c in caches], axis=1)
        assert relative_error(k, full.k[i]) < 1e-6
    if ranks == 1:  # nothing to reduce: the same operations as the reference, bit for bit
        assert all(np.array_equal(g, e) for g, e in zip(got, expected))


def test_sharded_forward_is_deterministic(model):
    sharded = ShardedReference(model, 4)
    tokens = np.arange(7) * 13 % model.config.vocab_size
    a, b = (sharded.forward(tokens, sharded.new_cache()) for _ in range(2))
    assert np.array_equal(a, b)


def test_plan_splits_heads_and_experts_into_equal_blocks():
    cfg = SHAPES["120b-like"]
    plan = ShardPlan(cfg, 8)
    assert [plan.q_heads(r) for r in (0, 7)] == [slice(0, 8), slice(56, 64)]
    assert [plan.kv_heads(r) for r in (0, 7)] == [slice(0, 1), slice(7, 8)]
    assert plan.experts(3) == range(48, 64)
    owned = [e for r in range(8) for e in plan.experts(r)]
    assert owned == list(range(cfg.num_experts))
    # query head h reads kv head h // (Hq / Hkv): a rank's query heads read only its own kv heads
    group = cfg.num_heads // cfg.num_kv_heads
    for r in range(8):
        assert {h // group for h in range(64)[plan.q_heads(r)]} == set(range(8)[plan.kv_heads(r)])
    for bad in (0, 3, 16):  # 3 divides nothing here; 16 does not divide the 8 kv heads
        with pytest.raises(ValueError):
            ShardPlan(cfg, bad)


def test_reduce_adds_in_rank_order():
    """float32 addition is not associative: the order is part of the result, and it is 0, 1, 2, ..."""
    p = [np.array([1e8], np.float32), np.array([1.0], np.float32), np.array([-1e8], np.float32)]
    assert reduce_in_rank_order(p)[0] == np.float32(0.0)  # (1e8 + 1) - 1e8 in float32
    assert reduce_in_rank_order([p[0], p[2], p[1]])[0] == np.float32(1.0)
