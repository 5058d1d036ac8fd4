"""The Python API (gptoss.LLM) on tiny models on the CPU: generate equals run.py's getp on the same
prompts, chat splits a harmony reply into its final text and its reasoning, `import gptoss` is cheap."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptoss.config import TINY, TINY_CHAT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from gptoss.weights import write_hf_checkpoint

    d = tmp_path_factory.mktemp("tiny_llm")
    write_hf_checkpoint(TINY, d, experts="mxfp4", seed=7)
    return d


@pytest.mark.parametrize("sampling", [(), ("-t", "0.8", "--top-p", "0.9", "-s", "5")])
def test_generate_equals_getp(tiny_model, tmp_path, sampling):
    import run
    from gptoss import LLM, SamplingParams

    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, TINY.vocab_size, int(n)).tolist() for n in (5, 40, 1, 17, 90)]
    inp, out = tmp_path / "prompts.txt", tmp_path / "out.txt"
    inp.write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    assert run.main([str(tiny_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "9", "--device", "cpu",
                     "--input-format", "ids", "--ignore-eos", "-q", *sampling]) == 0
    getp = [[int(t) for t in line.split()] for line in out.read_text().splitlines()]

    llm = LLM(tiny_model, device="cpu", max_seqs=3)
    params = SamplingParams(max_tokens=9, ignore_eos=True, **({} if not sampling else
                                                               dict(temperature=0.8, top_p=0.9, seed=5)))
    outs = llm.generate(prompts, params, detokenize=False)
    assert [o.token_ids for o in outs] == getp
    assert all(o.finish_reason == "length" and o.prompt_token_ids == p for o, p in zip(outs, prompts))
    assert llm.device.startswith("cpu") and not llm.engine.has_unfinished()
    # the same LLM again, the prompts in another order: each prompt's draws follow its place in the list
    again = llm.generate(prompts[::-1], params, detokenize=False)
    if not sampling:
        assert [o.token_ids for o in again] == getp[::-1]
    else:
        assert [o.token_ids for o in again] != getp[::-1]


def test_generate_text_stops_and_lengths():
    from gptoss import LLM, SamplingParams
    from gptoss.weights import random_weights

    llm = LLM(random_weights(TINY_CHAT, "mxfp4", seed=2), device="cpu")
    free = llm.generate("Hello there", SamplingParams(max_tokens=6))[0]
    assert free.prompt == "Hello there" and free.prompt_token_ids == llm.tokenizer.encode("Hello there")
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    assert free.text == llm.tokenizer.decode(free.token_ids)
    stop = free.token_ids[2]  # a stop id ends the request there, unemitted
    cut = llm.generate(["Hello there"], SamplingParams(max_tokens=6, stop_token_ids=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[:free.token_ids.index(stop)]
    one = llm.generate(np.asarray(free.prompt_token_ids), SamplingParams(max_tokens=6), detokenize=False)
    assert len(one) == 1 and one[0].token_ids == free.token_ids and one[0].text == ""
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate(["x"], [SamplingParams(), SamplingParams()])


class ScriptedRunner:
    """A ModelRunner that answers every request with the same ids, one per step."""

    name = "scripted"

    def __init__(self, model_config, config, script):
        self.model_config, self.config, self.script = model_config, config, script

    def allocate(self, capacity, slots, mean_positions):
        from gptoss.engine import Layout

        return Layout(slots, capacity, slots * -(-capacity // 64), slots + 4096, 256)

    def step(self, batch):  # (sampled requests: each row carries its count of tokens so far)
        return np.asarray([self.script[k] for k in batch.sampling.step.tolist()], np.int32)


def test_chat_parts_the_reasoning_from_the_answer():
    from gptoss import LLM, SamplingParams
    from gptoss.engine import Engine
    from gptoss.weights import random_weights
    from gptoss.tokenizer import CHANNEL, END, MESSAGE, RETURN, START, STOP_IDS

    llm = LLM(random_weights(TINY_CHAT, "mxfp4", seed=2), device="cpu")
    tok = llm.tokenizer
    script = ([CHANNEL] + tok.encode("analysis") + [MESSAGE] + tok.encode("They greet me.") + [END, START]
              + tok.encode("assistant") + [CHANNEL] + tok.encode("final") + [MESSAGE] + tok.encode("Hello!")
              + [RETURN])
    runner = ScriptedRunner(TINY_CHAT, llm.config, script)
    llm.engine = Engine(runner, llm.config, eos_token_ids=STOP_IDS)
    reply = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=1.0, max_tokens=100))
    assert (reply.text, reply.reasoning, reply.finish_reason) == ("Hello!", "They greet me.", "stop")
    assert reply.token_ids == script[:-1]
    assert reply.prompt_token_ids[-2:] == [START] + tok.encode("assistant")


def test_chat_on_a_tiny_model_runs_the_engine():
    from gptoss import LLM, SamplingParams
    from gptoss.harmony import ChatOptions, parse_assistant
    from gptoss.weights import random_weights

    llm = LLM(random_weights(TINY_CHAT, "mxfp4", seed=2), device="cpu")
    reply = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=8),
                     ChatOptions(reasoning_effort="low"))
    parsed = parse_assistant(reply.token_ids)
    assert (reply.text, reply.reasoning) == (parsed.final, parsed.analysis)
    again = llm.generate([reply.prompt_token_ids], SamplingParams(max_tokens=8), detokenize=False)[0]
    assert again.token_ids == reply.token_ids


def test_import_gptoss_is_cheap():
    code = ("import sys, gptoss; from gptoss import LLM, SamplingParams, EngineConfig; "
            "print(sorted(m for m in ('cupy', 'tiktoken', 'gptoss.model', 'gptoss.reference') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_bad_options_are_errors(tiny_model):
    from gptoss import LLM

    with pytest.raises(ValueError, match="device must be one of auto, cpu, gpu"):
        LLM(tiny_model, device="tpu")
    with pytest.raises(ValueError, match="max_seqs must be at least 1"):
        LLM(tiny_model, device="cpu", max_seqs=0)
    with pytest.raises(TypeError):
        LLM(tiny_model, device="cpu", no_such_option=1)
