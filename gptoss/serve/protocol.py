"""The bodies of the OpenAI API that the server reads and writes (the fields gptoss honours).

Requests are validated here: a wrong type (no coercion: "0.5" is not a number, "yes" not a boolean), a
negative or absurd number, or an unknown value answers 400 in OpenAI's error shape (app.py). Unknown
fields are ignored, as vLLM does; fields that OpenAI defines but gptoss cannot honour (n > 1, logprobs,
echo, tool_choice "required" or a named function) are refused by name.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

U32 = 0xFFFFFFFF
MAX_TOKENS = 1 << 24  # more than any context; larger is refused as absurd
MAX_STOPS = 4


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


def stop_strings(stop) -> list[str]:
    """`stop` as a list: up to MAX_STOPS non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > MAX_STOPS or not all(stops):
        raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings (got {stops!r})")
    return stops


def no_logprobs(value):
    """logprobs (chat: true; completions: a count, 0 included) and top_logprobs (a count above 0) ask for
    log probabilities, which gptoss does not return: refused."""
    if value is None or value is False:
        return value
    raise ValueError(f"gptoss does not return log probabilities (got {value!r}): leave it out")


def no_top_logprobs(value):
    return value if type(value) is int and value == 0 else no_logprobs(value)


def auto_or_none(choice):
    """tool_choice: "auto" (the model may call a declared function) or "none" (no function is declared
    and a call the model writes anyway is not returned). "required" and a named function need decoding
    that forces a call, which gptoss does not have: refused by name."""
    if choice is None or choice in ("auto", "none"):
        return choice
    if choice == "required" or isinstance(choice, dict):
        raise ValueError(f"tool_choice {choice!r} is not supported: gptoss cannot force a tool call (it has "
                         "no guided decoding); use \"auto\" (the model decides) or \"none\"")
    raise ValueError(f"tool_choice must be \"auto\" or \"none\" (got {choice!r})")


class Sampling(BaseModel):
    """The sampling fields both endpoints share."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=0, le=U32)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None  # up to 4 strings; the text ends before the first one
    logprobs: Any = None
    top_logprobs: Any = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError(f"gptoss returns one choice per request: n must be 1 (got {n}); send {n} requests")
        return n

    _stop = field_validator("stop")(stop_strings)
    _logprobs = field_validator("logprobs")(no_logprobs)
    _top_logprobs = field_validator("top_logprobs")(no_top_logprobs)


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
    tool_choice: Any = None

    _tool_choice = field_validator("tool_choice")(auto_or_none)


class CompletionRequest(Sampling):
    # a text, token ids, or a list of one of either (one prompt per request)
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    echo: Any = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo is None or echo is False:
            return echo
        raise ValueError(f"gptoss does not echo the prompt (got echo={echo!r}): leave it out")
