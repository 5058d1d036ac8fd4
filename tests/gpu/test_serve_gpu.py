"""run.py -m serve on the GPU path (tiny synthetic model): greedy answers served to concurrent clients
equal getp's (LLM.generate, every prompt in one batch) for the same prompts."""
import threading

import pytest

from tests.test_serve import LiveServer

pytestmark = pytest.mark.gpu


def test_served_greedy_tokens_equal_getps():
    from gptoss.llm import LLM
    from gptoss.sampling import SamplingParams
    from gptoss.serve import ServeOptions, build_app

    prompts = [f"Prompt number {i} says" for i in range(8)]
    want = [o.text for o in LLM("synthetic:tiny-chat", device="gpu", progress=False).generate(
        prompts, SamplingParams(max_tokens=12, ignore_eos=True))]
    llm = LLM("synthetic:tiny-chat", device="gpu", progress=False, max_seqs=4)
    server = LiveServer(build_app(llm.engine, llm.tokenizer, ServeOptions(model_name="tiny", reserve_slots=4)))
    try:
        client, got = server.client(), [None] * len(prompts)

        def ask(i):
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            got[i] = "".join(ch.choices[0].text for ch in stream if ch.choices)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == want
    finally:
        server.close()
