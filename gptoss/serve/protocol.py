"""The bodies of the OpenAI API that the server reads and writes (the fields gptoss honours).

Requests are validated here: a wrong type, a negative or absurd number, or an unknown value answers 400
in OpenAI's error shape (app.py). Unknown fields are ignored, as OpenAI's server does; fields that
OpenAI defines but gptoss cannot honour (n > 1, a chat's stop strings, logprobs) are refused by name.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

U32 = 0xFFFFFFFF
MAX_TOKENS = 1 << 24  # more than any context; larger is refused as absurd


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The sampling fields both endpoints share."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=0, le=U32)
    n: StrictInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    logprobs: Literal[False, None] = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError(f"gptoss returns one choice per request: n must be 1 (got {n}); send {n} requests")
        return n



class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    parameters: dict | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    reasoning_content: str | None = None  # an assistant turn's reasoning, sent back while its tool calls run
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none"] | None = None

    @field_validator("stop")
    @classmethod
    def _no_stop_strings(cls, stop):
        if stop:
            raise ValueError("stop strings are supported by /v1/completions only (a chat reply stops at "
                             "the model's stop tokens and max_tokens)")
        return None


class CompletionRequest(Sampling):
    # a text, token ids, or a list of one of either (one prompt per request)
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    echo: Literal[False, None] = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if len(stops) > 4 or not all(stops):
            raise ValueError(f"stop takes up to 4 non-empty strings (got {stops!r})")
        return stops
