"""POST /v1/responses, the basic cases: text and function calls, whole or streamed, stateless.

The input items (messages, function_call, function_call_output, reasoning) become harmony messages; the
reply's messages become output items: reasoning (the analysis channel), message (the final answer,
commentary for the user, text without a readable header) and function_call (a call to functions.NAME).
ResponseBuilder reads the reply id by id and gives the Responses API's stream events (response.created,
response.output_item.added, response.output_text.delta, ..., response.completed); a whole reply is the
last event's response.

The status: "completed"; "incomplete" (reason max_output_tokens) when the reply ran out; "failed" with
an error (code "invalid_model_output") when it broke the harmony format: its output items are kept, the
text after an unreadable header as a message."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from .. import harmony
from .protocol import MAX_TOKENS, FunctionDef, auto_or_none


class ResponseTool(FunctionDef):
    type: Literal["function"]
    strict: bool | None = None


class Reasoning(BaseModel):
    effort: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Union[str, list[dict]]
    instructions: str | None = None
    reasoning: Reasoning | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Any = None
    max_output_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    stream: StrictBool = False
    previous_response_id: Any = None

    _tool_choice = field_validator("tool_choice")(auto_or_none)

    @field_validator("previous_response_id")
    @classmethod
    def _stateless(cls, value):
        if value is not None:
            raise ValueError("the server keeps no responses: send the whole conversation as input "
                             f"(got previous_response_id={value!r})")
        return value


class InputError(ValueError):
    """An input item gptoss cannot read; param: where (input[i])."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InputError(f"{where}.content must be a text or a list of text parts", where)


def chat_inputs(req: ResponsesRequest) -> tuple[list, harmony.ChatOptions]:
    """The harmony messages and options of a request."""
    instructions = [req.instructions] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    messages, names = [], {}
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), where)
            if role in ("system", "developer"):
                instructions.append(text)
            elif role in ("user", "assistant"):
                messages.append(harmony.Message(role, text))
            else:
                raise InputError(f"{where}.role must be user, assistant, system or developer (got {role!r})", where)
        elif kind == "reasoning":
            messages.append(harmony.Message("assistant", _text(item.get("content") or [], where), channel="analysis"))
        elif kind == "function_call":
            name, args = item.get("name"), item.get("arguments")
            if not (isinstance(name, str) and name and isinstance(args, str)):
                raise InputError(f"{where}: a function_call needs its name and arguments (a JSON text)", where)
            names[item.get("call_id")] = name
            messages.append(harmony.Message("assistant", args, channel="commentary", recipient=f"functions.{name}",
                                            content_type="<|constrain|>json"))
        elif kind == "function_call_output":
            name = names.get(item.get("call_id"))
            if name is None:
                raise InputError(f"{where}: call_id {item.get('call_id')!r} names no earlier function_call", where)
            messages.append(harmony.Message("tool", _text(item.get("output"), where), name=f"functions.{name}"))
        else:
            raise InputError(f"{where}.type {kind!r} is not supported (message, reasoning, function_call, "
                             "function_call_output)", where)
    tools = () if req.tool_choice == "none" else tuple(
        harmony.Tool(t.name, t.description, t.parameters) for t in req.tools or ())
    effort = (req.reasoning.effort if req.reasoning else None) or "medium"
    return messages, harmony.ChatOptions(reasoning_effort=effort, instructions="\n\n".join(instructions) or None,
                                         tools=tools)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """A reply's ids in, the Responses API's stream events out (dicts with `type` and `sequence_number`).

    start() gives response.created and response.in_progress; push(id) the events one generated id makes
    (an item added, a text or arguments delta, an item done); finish(engine_reason) the last ones, ending
    with response.completed, response.incomplete or response.failed, whose `response` is the whole
    Response object. functions: calls to functions.NAME become function_call items (False: tool_choice
    "none", they are dropped)."""

    def __init__(self, req: ResponsesRequest, model: str, prompt_tokens: int):
        self.parser = harmony.StreamParser()
        self.functions = req.tool_choice != "none"
        self.prompt_tokens, self.made, self.reasoning_tokens = prompt_tokens, 0, 0
        self.seq = 0
        self.output: list[dict] = []  # the items, finished or not
        self.open: dict | None = None  # the item being written
        self.response = {
            "id": _new_id("resp"), "object": "response", "created_at": time.time(), "model": model,
            "status": "in_progress", "incomplete_details": None, "output": self.output, "error": None,
            "instructions": req.instructions, "parallel_tool_calls": False, "tool_choice": req.tool_choice or "auto",
            "tools": [t.model_dump() for t in req.tools or ()], "temperature": req.temperature, "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens, "usage": None}

    def _event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": f"response.{kind}", "sequence_number": self.seq - 1, **fields}

    def error(self, message: str) -> dict:
        """The `error` event that ends a stream the engine failed."""
        self.seq += 1
        return {"type": "error", "sequence_number": self.seq - 1, "code": "server_error", "message": message,
                "param": None}

    def _snapshot(self) -> dict:
        return {**self.response, "output": [dict(item) for item in self.output]}

    def start(self) -> list[dict]:
        return [self._event("created", response=self._snapshot()), self._event("in_progress", response=self._snapshot())]

    def push(self, token: int | None) -> list[dict]:
        if token is None:
            return []
        self.made += 1
        delta = self.parser.push(token)
        if delta is not None and delta.channel == "analysis" and not delta.recipient:
            self.reasoning_tokens += 1
        return self._events(delta)

    def finish(self, engine_reason: str | None) -> list[dict]:
        events = self._events(self.parser.finish(stopped=engine_reason == "stop"))
        if self.open is not None:  # (a message the parser dropped: a header without its message)
            events += self._close()
        broken = self.parser.broken
        if broken is not None:
            status, end = "failed", "failed"
            self.response["error"] = {"code": "invalid_model_output",
                                      "message": f"the model's reply broke the harmony format: {broken}"}
        elif engine_reason == "stop":
            status, end = "completed", "completed"
        else:
            status, end = "incomplete", "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        self.response["status"] = status
        self.response["usage"] = {
            "input_tokens": self.prompt_tokens, "output_tokens": self.made, "total_tokens": self.prompt_tokens + self.made,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}
        return events + [self._event(end, response=self._snapshot())]

    def _kind(self, delta) -> str | None:
        if delta.recipient:
            return "function_call" if self.functions and delta.recipient.startswith("functions.") else None
        return "reasoning" if delta.channel == "analysis" else "message"

    def _events(self, delta) -> list[dict]:
        if delta is None:
            return []
        kind = self._kind(delta)
        if kind is None:  # a call that is not returned
            return self._close() if delta.ended and self.open is not None else []
        events = []
        if self.open is not None and (delta.started or self.open["type"] != kind):
            events += self._close()
        if self.open is None:
            events += self._add(kind, delta)
        if delta.text:
            events += self._text(delta.text)
        if delta.ended:
            events += self._close()
        return events

    def _add(self, kind: str, delta) -> list[dict]:
        if kind == "function_call":
            item = {"type": "function_call", "id": _new_id("fc"), "call_id": f"call_{uuid.uuid4().hex[:24]}",
                    "name": delta.recipient[len("functions."):], "arguments": "", "status": "in_progress"}
            part = None
        elif kind == "reasoning":
            item = {"type": "reasoning", "id": _new_id("rs"), "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": _new_id("msg"), "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.open = item
        self.output.append(item)
        index = len(self.output) - 1
        events = [self._event("output_item.added", output_index=index, item=dict(item, content=[]) if part else
                              dict(item))]
        if part is not None:
            item["content"] = [part]
            events.append(self._event("content_part.added", item_id=item["id"], output_index=index, content_index=0,
                                      part=dict(part)))
        return events

    def _text(self, text: str) -> list[dict]:
        item, index = self.open, len(self.output) - 1
        if item["type"] == "function_call":
            item["arguments"] += text
            return [self._event("function_call_arguments.delta", item_id=item["id"], output_index=index, delta=text)]
        item["content"][0]["text"] += text
        if item["type"] == "reasoning":
            return [self._event("reasoning_text.delta", item_id=item["id"], output_index=index, content_index=0,
                                delta=text)]
        return [self._event("output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                            delta=text, logprobs=[])]

    def _close(self) -> list[dict]:
        item, index = self.open, len(self.output) - 1
        self.open = None
        item["status"] = "completed"
        if item["type"] == "function_call":
            events = [self._event("function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"])]
        else:
            part = item["content"][0]
            done = "reasoning_text.done" if item["type"] == "reasoning" else "output_text.done"
            extra = {} if item["type"] == "reasoning" else {"logprobs": []}
            events = [self._event(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"],
                                  **extra),
                      self._event("content_part.done", item_id=item["id"], output_index=index, content_index=0,
                                  part=dict(part))]
        return events + [self._event("output_item.done", output_index=index, item=dict(item))]


def response_body(req: ResponsesRequest, model: str, ids: list, engine_reason: str, prompt_tokens: int) -> dict:
    """The Response object of a whole reply (the last event of its stream)."""
    build = ResponseBuilder(req, model, prompt_tokens)
    for token in ids:
        build.push(token)
    return build.finish(engine_reason)[-1]["response"]
