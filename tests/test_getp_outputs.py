"""getp's RunningOutputs: the tokens of the prompts in flight, written a step at a time."""
import numpy as np

from gptoss.getp import RunningOutputs


def test_running_outputs_match_per_token_appends():
    """Random steps over 300 prompts (more in flight than the first 64 rows), tokens or none (-1),
    prompts finishing at random: each finished prompt gets exactly its tokens in order."""
    rng = np.random.default_rng(0)
    n, max_new = 300, 40
    out = RunningOutputs(n, max_new)
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
