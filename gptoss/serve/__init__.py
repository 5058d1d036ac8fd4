"""An OpenAI-compatible HTTP server over one Engine (run.py -m serve):

  protocol.py  the request and response bodies in OpenAI's wire format (pydantic models)
  loop.py      EngineLoop: the thread that steps the Engine and hands each request its tokens
  stops.py     StopMatcher: stop strings on streamed text
  responses.py /v1/responses: input items to harmony, the reply to stream events and output items
  app.py       the FastAPI app: /v1/chat/completions (ChatStream: ids to chat deltas), /v1/completions,
               /v1/responses, /v1/models, /health, /metrics
"""
from .app import ServeOptions, build_app
from .loop import EngineLoop

__all__ = ["EngineLoop", "ServeOptions", "build_app"]
