"""The engine, one file per part, read top to bottom as a request lives:

  request.py    Request, the Job it is while it waits, the TokenEvents / StepTokens steps hand back
  scheduler.py  admission, chunked prefill beside decode, page grants, preemption and recompute
  pages.py      the KV page pool and the page table's host copy
  runner.py     what the engine needs from a model: Layout, the ModelRunner protocol
  gpu_runner.py the GPU model (weights, KV cache, graphs) and its memory plan
  cpu_runner.py the NumPy reference, so that the whole engine runs on the CPU
  engine.py     Engine: add_request / abort / step / has_unfinished
  config.py     EngineConfig
"""
from .config import EngineConfig
from .engine import Engine
from .request import LENGTH, STOP, Request, StepTokens, TokenEvent
from .runner import Layout, ModelRunner

__all__ = ["Engine", "EngineConfig", "Layout", "ModelRunner", "Request", "StepTokens", "TokenEvent", "STOP",
           "LENGTH"]
