"""getp's RunningOutputs: the tokens of the prompts in flight, written a step at a time."""
import numpy as np
import pytest

from gptoss.getp import RunningOutputs


@pytest.mark.parametrize("max_new, width", [(40, 256), (40, 3)])
def test_running_outputs_match_per_token_appends(max_new, width):
    """Random steps over 300 prompts (more in flight than the first 64 rows), tokens or none (-1),
    prompts finishing at random: each finished prompt gets exactly its tokens in order (width 3: the
    rows widen several times on the way)."""
    rng = np.random.default_rng(0)
    n = 300
    out = RunningOutputs(n, max_new, width=width)
    want = {i: [] for i in range(n)}
    made = np.zeros(n, np.int64)
    waiting, running, got = list(range(n)), [], {}
    while waiting or running:
        while waiting and len(running) < 150:
            running.append(waiting.pop())
        index = rng.permutation(np.asarray(running, np.int64))
        token = rng.integers(0, 1000, len(index))
        token[rng.random(len(index)) < 0.1] = -1
        done = (made[index] + (token >= 0) >= max_new) | (rng.random(len(index)) < 0.05)
        out.add(index, token)
        for i, t in zip(index.tolist(), token.tolist()):
            if t >= 0:
                want[i].append(t)
                made[i] += 1
        for i in index[done].tolist():
            got[i] = out.pop(i)
            running.remove(i)
    assert got == want
    assert out.pop(5) == []  # not running: nothing


def test_running_outputs_memory_follows_the_answers_not_max_new():
    out = RunningOutputs(2048, 131072)
    assert out.buf.nbytes <= 64 * 256 * 4  # not 64 x 131072
    out.add(np.arange(4, dtype=np.int64), np.arange(4))
    for step in range(1, 600):
        out.add(np.asarray([1], np.int64), np.asarray([step]))
    assert out.buf.shape[1] == 1024  # 256 -> 512 -> 1024 for 600 tokens
    assert out.pop(1) == [1] + list(range(1, 600)) and out.pop(0) == [0]
