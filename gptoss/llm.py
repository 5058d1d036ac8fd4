"""The Python API, in the shape vLLM users know:

    from gptoss import LLM, SamplingParams

    llm = LLM("model.bin")  # device="auto": the GPU when CuPy finds one, else the NumPy reference
    for out in llm.generate(["Why is the sky blue?"], SamplingParams(max_tokens=64)):
        print(out.text, out.finish_reason)
    reply = llm.chat([{"role": "user", "content": "Hi!"}])
    print(reply.reasoning, reply.text)

An LLM holds the model's weights on its device, the tokenizer and one Engine; getp, generate and chat
(run.py) run on it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import Engine, EngineConfig
from .loader import resolve_model_path
from .sampling import SamplingParams
from .weights import open_weights

DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str  # the generated ids decoded ("" without detokenize)
    token_ids: list  # the generated ids (a stop id is not among them)
    finish_reason: str  # "stop" (a stop id came) or "length" (max_tokens or the context's end)


@dataclass(frozen=True)
class RequestOutput:
    """One prompt's result, as vLLM's RequestOutput (one completion per prompt here)."""
    request_id: int
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list
    outputs: list  # [CompletionOutput]

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


@dataclass(frozen=True)
class ChatOutput:
    """A harmony chat reply: the final channel's text apart from the reasoning (analysis channel)."""
    text: str
    reasoning: str
    token_ids: list
    finish_reason: str  # "stop" or "length"
    prompt_token_ids: list


def make_runner(weights, device: str = "auto", config: EngineConfig | None = None, progress: bool = True,
                tensor_parallel: int = 1, gpus: tuple | None = None, model=None, tp_peers=None):
    """The engine's model runner for `weights` on 'cpu' (the NumPy reference), 'gpu' or 'auto' (the GPU
    when CuPy finds one). tensor_parallel > 1: the model split over that many ranks, one process each
    (gptoss/parallel/tp_runner.py), on `gpus` (default 0..N-1) on a GPU; `model` is what each rank
    opens (default `weights` itself). tp_peers: ranks 1..N-1 already running elsewhere (an MPI group,
    gptoss/parallel/mpi_group.py) instead of child processes started here."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (got {device!r})")
    config = config or EngineConfig()
    if device == "auto":
        from .device import probe_gpu

        device = "gpu" if probe_gpu().usable else "cpu"
    if tensor_parallel > 1:
        from .parallel.tp_runner import TensorParallelRunner

        if device == "gpu" and gpus is None:
            gpus = tuple(range(tensor_parallel))
        return TensorParallelRunner(weights if model is None else model, device, tensor_parallel, config,
                                    gpus if device == "gpu" else None, progress, peers=tp_peers)
    if device == "cpu":
        from .engine.cpu_runner import CPUModelRunner

        return CPUModelRunner(weights, config)
    from .engine.gpu_runner import GPUModelRunner

    return GPUModelRunner(weights, config, progress=progress)


class LLM:
    """model: a .bin file or Hugging Face checkpoint directory (None: $GPTOSS_MODEL, ./model.bin, the
    Hugging Face cache), `synthetic:PRESET`, or a Weights object (gptoss.weights.open_weights,
    gptoss.weights.random_weights). device: 'auto', 'cpu' or 'gpu'. tokenizer: a tokenizer.bin or
    o200k_base.tiktoken file (default: found next to the model or in tiktoken's cache). progress: show
    the upload bar. tensor_parallel: split the model over that many ranks (processes; on `gpus`, one
    each; tp_peers: those ranks already running, an MPI group). engine_options: EngineConfig's fields
    (max_seqs, memory_limit, promise, ...)."""

    def __init__(self, model=None, device: str = "auto", tokenizer=None, progress: bool = True,
                 tensor_parallel: int = 1, gpus: tuple | None = None, tp_peers=None, **engine_options):
        from .tokenizer import STOP_IDS

        if model is not None and hasattr(model, "config") and hasattr(model, "names"):
            self.model_path, weights = None, model
        else:
            self.model_path = resolve_model_path(None if model is None else str(model))
            weights = open_weights(self.model_path)
        self.config = EngineConfig(**engine_options)
        self.runner = make_runner(weights, device, self.config, progress, tensor_parallel, gpus,
                                  model=self.model_path if self.model_path is not None else weights,
                                  tp_peers=tp_peers)
        self.model_config = weights.config
        self.engine = Engine(self.runner, self.config, eos_token_ids=STOP_IDS)
        self._tokenizer_path = tokenizer
        self._tokenizer = None

    @property
    def device(self) -> str:
        """What runs the model: "gpu (NVIDIA H200)" or "cpu (NumPy reference, float32)"."""
        return self.runner.name

    @property
    def tokenizer(self):
        """o200k_harmony (loaded on first use)."""
        if self._tokenizer is None:
            from .tokenizer import tokenizer_from_option

            local = self.model_path if isinstance(self.model_path, Path) else None
            self._tokenizer = tokenizer_from_option(self._tokenizer_path, local)
        return self._tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list | None = None,
                 detokenize: bool = True) -> list[RequestOutput]:
        """prompts: a text or a list of token ids, or a list of either; sampling_params: one for all or
        one per prompt (default greedy, 256 tokens). The draws of prompt i use sequence id i, so a
        sampled result does not depend on the other prompts (as getp's input lines)."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else np.asarray(p).tolist() for p in prompts]
        tokens, reasons = self._run(encoded, [p or SamplingParams() for p in params])
        return [RequestOutput(i, p if isinstance(p, str) else None, ids,
                              [CompletionOutput(0, self.tokenizer.decode(out) if detokenize else "", out, reason)])
                for i, (p, ids, out, reason) in enumerate(zip(prompts, encoded, tokens, reasons))]

    def chat(self, messages, sampling_params: SamplingParams | None = None, options=None) -> ChatOutput:
        """One assistant turn after `messages` (dicts with role and content, and optionally channel; or
        harmony.Message), rendered in the harmony format with `options` (harmony.ChatOptions: reasoning
        effort, instructions, tools); the reply is parsed into its final text and its reasoning."""
        from .harmony import Message, encode_chat, parse_assistant

        msgs = [m if isinstance(m, Message) else Message(m["role"], m["content"], m.get("channel"))
                for m in messages]
        prompt = encode_chat(msgs, options)
        (ids,), (reason,) = self._run([prompt], [sampling_params or SamplingParams()])
        reply = parse_assistant(ids)
        return ChatOutput(reply.final, reply.analysis, ids, reason, prompt)

    def _run(self, prompts: list, params: list) -> tuple[list, list]:
        """Every prompt through the engine to its end: (generated ids, finish reason) per prompt."""
        engine = self.engine
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                ids.append(engine.add_request(p, sp, sequence=i))
            index = {rid: i for i, rid in enumerate(ids)}
            tokens, reasons = [[] for _ in prompts], [None] * len(prompts)
            left = len(ids)
            while left:
                for ev in engine.step():
                    i = index.get(ev.request_id)
                    if i is None:
                        continue  # another caller's request
                    if ev.token is not None:
                        tokens[i].append(ev.token)
                    if ev.done:
                        reasons[i] = ev.reason
                        left -= 1
        finally:  # an exception or Ctrl-C: what is left of these requests frees its slot and pages
            for rid in ids:
                engine.abort(rid)
        return tokens, reasons
