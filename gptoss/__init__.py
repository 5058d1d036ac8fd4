"""gptoss: gpt-oss-20b / gpt-oss-120b from scratch. The NumPy reference (reference.py) is the oracle; the
GPU engine (engine/, model.py) runs our own kernels (kernels/*.hip) through CuPy.

    from gptoss import LLM, SamplingParams

The names below load on first use, so `import gptoss` stays cheap (no CuPy, no tokenizer).
"""
from __future__ import annotations

import importlib

_EXPORTS = {"LLM": "llm", "RequestOutput": "llm", "CompletionOutput": "llm", "ChatOutput": "llm",
            "SamplingParams": "sampling", "EngineConfig": "engine", "Engine": "engine",
            "GptossError": "errors"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptoss' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
