"""Tensor/expert parallel on the CPU (issue 14): a rank's share of the weights (ShardWeights) is exactly
what the sharded reference slices, the split over processes (TensorParallelRunner with the sharded NumPy
reference, run.py --device cpu --tensor-parallel N) runs the orchestration of a GPU run, and the flags
are checked before anything loads."""
import argparse
import dataclasses
import json
import threading

import numpy as np
import pytest

import run as run_py
from gptoss.config import TINY, TINY_REAL_HEADS
from gptoss.parallel.data import DataParallelOptions
from gptoss.parallel.shard_weights import ShardWeights, shard_config
from gptoss.parallel.tensor import ShardedReference
from gptoss.parallel.tp_runner import RAISE_ENV, RankReference, TensorParallelError
from gptoss.reference import ReferenceModel
from gptoss.weights import random_weights

CFG = dataclasses.replace(TINY_REAL_HEADS, num_experts=16)


@pytest.fixture(scope="module")
def weights():
    return random_weights(CFG, "mxfp4", seed=2)


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_shards_hold_what_the_plan_gives_each_rank(weights, ranks):
    shards = [ShardWeights(weights, ranks, r) for r in range(ranks)]
    D, q, kv = CFG.head_dim, CFG.q_size, CFG.kv_size
    for name in weights.names():
        full = weights.raw(name)
        parts = [s.raw(name) for s in shards]
        for s, p in zip(shards, parts):
            assert p.shape == s.info(name).shape and p.dtype == full.dtype, name
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):  # q | k | v, each split over the ranks
            n = q // ranks
            m = kv // ranks
            got = np.concatenate([np.concatenate([p[:n] for p in parts]), np.concatenate([p[n:n + m] for p in parts]),
                                  np.concatenate([p[n + m:] for p in parts])])
            assert np.array_equal(got, full), name
        elif name.endswith("attn.out.weight"):
            assert np.array_equal(np.concatenate(parts, axis=1), full)
        elif name.endswith(("attn.sinks",)) or ".mlp.mlp" in name:
            assert np.array_equal(np.concatenate(parts), full), name
        else:  # router, norms, embedding, unembedding, the out bias: whole on every rank
            assert all(np.array_equal(p, full) for p in parts), name
    assert [s.first_expert for s in shards] == [r * CFG.num_experts // ranks for r in range(ranks)]
    assert all(s.local_experts == CFG.num_experts // ranks for s in shards)
    assert shards[0].config == shard_config(CFG, ranks)
    assert shards[0].config.num_heads == CFG.num_heads // ranks and shards[0].config.num_experts == CFG.num_experts
    # the ranks hold the experts once between them and the dense weights R times
    experts = sum(weights.info(n).nbytes for n in weights.names() if ".mlp.mlp" in n)
    assert sum(s.total_bytes() for s in shards) - ranks * weights.total_bytes() == -(ranks - 1) * (
        experts + sum(weights.info(n).nbytes for n in weights.names() if n.endswith(
            ("qkv.weight", "qkv.bias", "sinks", "out.weight"))))


def test_a_rank_alone_computes_its_share_of_the_sharded_forward(weights):
    """Each rank in its own thread (its own model, cache and the all-gather) gives the sharded
    reference's logits bit for bit: the same partials, reduced in the same order."""
    ranks, tokens = 4, np.arange(9) * 37 % CFG.vocab_size
    sharded = ShardedReference(ReferenceModel(weights), ranks)
    expected = sharded.forward(tokens, sharded.new_cache())
    barrier, parts, out = threading.Barrier(ranks), [None] * ranks, [None] * ranks

    class Gather:
        def __init__(self, rank):
            self.rank = rank

        def gather_host(self, part):
            parts[self.rank] = part
            barrier.wait()
            got = list(parts)
            barrier.wait()
            return got

    def rank(r):
        model = RankReference(weights, ranks, r, Gather(r))
        out[r] = model.unembed(model.hidden(tokens, model.new_cache()))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(o, expected) for o in out)


@pytest.fixture
def model(tiny_bin):
    return tiny_bin


@pytest.fixture
def prompts(id_prompts):
    return id_prompts((3, 9, 1, 6))


def getp(model, inp, out, *extra):
    return run_py.main([str(model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "5", "--device", "cpu",
                        "--input-format", "ids", "--ignore-eos", "-q", *map(str, extra)])


def test_getp_over_two_cpu_ranks(model, prompts, tmp_path):
    """Two processes of the sharded reference: the same greedy tokens as one (the logits differ from the
    unsharded ones by float32 rounding, ~1e-7, which decides no argmax on this model and these prompts);
    with data parallel on top (2 replicas of 2 ranks) byte-identical to the 2 ranks alone."""
    one, two, four, record = (tmp_path / n for n in ("one.txt", "two.txt", "four.txt", "four.json"))
    assert getp(model, prompts, one) == 0
    assert getp(model, prompts, two, "--tensor-parallel", 2) == 0
    assert two.read_bytes() == one.read_bytes()
    assert getp(model, prompts, four, "--expert-parallel", 2, "--data-parallel", 2, "--json", record) == 0
    assert four.read_bytes() == two.read_bytes()
    rec = json.loads(record.read_text())
    assert rec["tensor_parallel"] == 2 and rec["data_parallel"] == 2
    assert sum(r["prompts"] for r in rec["replicas"]) == 4


def test_a_failing_rank_is_one_line(model, prompts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(RAISE_ENV, "1")
    assert getp(model, prompts, tmp_path / "out.txt", "--tensor-parallel", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"run.py: error: tensor-parallel rank 1 failed: RuntimeError: {RAISE_ENV}: rank 1"


def test_runner_error_names_the_rank(weights, monkeypatch):
    from gptoss.engine import EngineConfig
    from gptoss.llm import LLM
    from gptoss.sampling import SamplingParams

    monkeypatch.setenv(RAISE_ENV, "1")
    llm = LLM(random_weights(TINY, "mxfp4", seed=1), "cpu", progress=False, tensor_parallel=2)
    try:
        with pytest.raises(TensorParallelError, match="rank 1 failed"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), detokenize=False)
    finally:
        llm.runner.close()
    assert EngineConfig() == llm.config


@pytest.mark.parametrize("flags, message", [
    (["--tensor-parallel", "0"], "--tensor-parallel must be at least 1 (got 0)"),
    (["--tensor-parallel", "3"], "--tensor-parallel 3: 3 ranks do not divide the 4 query heads"),
    (["--expert-parallel", "4"], "--tensor-parallel 4: 4 ranks do not divide the 2 kv heads"),
])
def test_bad_flags_are_one_line(model, prompts, tmp_path, capsys, flags, message):
    assert getp(model, prompts, tmp_path / "o.txt", *flags) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"run.py: error: {message}"


def test_gpu_groups_are_checked_against_the_gpus():
    def args(tp, dp=None):
        return argparse.Namespace(tensor_parallel=tp, data_parallel=dp)

    gpus = tuple(range(8))
    assert run_py.tensor_parallel_gpus(args(2), gpus) == 4
    assert run_py.tensor_parallel_gpus(args(2, 3), gpus) == 3
    with pytest.raises(run_py.Failure, match=r"--tensor-parallel 3 must divide the chosen 8 GPUs \(0,1,2,3,4,5,6,7\); pick them with --gpus"):
        run_py.tensor_parallel_gpus(args(3), gpus)
    with pytest.raises(run_py.Failure, match="--data-parallel 5 x --tensor-parallel 2 needs 10 GPUs"):
        run_py.tensor_parallel_gpus(args(2, 5), gpus)
    dp = DataParallelOptions(replicas=4, device="gpu", gpus=gpus, tensor_parallel=2)
    assert [dp.gpus_of(r) for r in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert dp.name(1) == "replica 1 (GPUs 2,3)"
    with pytest.raises(ValueError, match="need 10 GPUs"):
        DataParallelOptions(replicas=5, device="gpu", gpus=gpus, tensor_parallel=2)
