"""POST /v1/responses, the basic cases: text and function calls, whole (not streamed), stateless.

The input items (messages, function_call, function_call_output, reasoning) become harmony messages; the
reply's messages become output items: reasoning (the analysis channel), message (the final answer) and
function_call (a call to functions.NAME)."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .. import harmony
from .protocol import MAX_TOKENS, FunctionDef


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
    tool_choice: Literal["auto", "none"] | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: Literal[False] = Field(False, description="streaming /v1/responses is not supported")
    previous_response_id: None = Field(None, description="the server keeps no responses: send the whole input")


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


def response_body(req: ResponsesRequest, model: str, ids: list, reason: str, prompt_tokens: int) -> dict:
    """The Response object of a whole reply."""
    reply = harmony.parse_assistant(ids)
    output = []
    for m in reply.messages:
        if m.recipient and m.recipient.startswith("functions."):
            output.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}",
                           "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": m.recipient[len("functions."):],
                           "arguments": m.content, "status": "completed"})
        elif m.recipient:
            continue  # a call to a tool that is not a function
        elif m.channel == "analysis":
            output.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
                           "content": [{"type": "reasoning_text", "text": m.content}], "status": "completed"})
        else:
            output.append({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
                           "status": "completed",
                           "content": [{"type": "output_text", "text": m.content, "annotations": []}]})
    done = reason != "length"
    return {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": time.time(), "model": model,
            "status": "completed" if done else "incomplete",
            "incomplete_details": None if done else {"reason": "max_output_tokens"},
            "output": output, "error": None, "instructions": req.instructions, "parallel_tool_calls": False,
            "tool_choice": req.tool_choice or "auto", "tools": [t.model_dump() for t in req.tools or ()],
            "temperature": req.temperature, "top_p": req.top_p, "max_output_tokens": req.max_output_tokens,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": len(ids),
                      "total_tokens": prompt_tokens + len(ids), "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}
