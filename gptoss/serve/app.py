"""The FastAPI app: OpenAI's endpoints over one EngineLoop.

  GET  /health                 200 while the engine thread runs
  GET  /v1/models              the one model
  POST /v1/chat/completions    messages rendered to harmony; the reply's analysis channel comes back as
                               `reasoning_content`, its final channel as `content`, its calls to
                               functions.NAME as `tool_calls`; streamed as server-sent events or whole
  POST /v1/completions         a raw prompt (text or token ids) continued as written
  POST /v1/responses           the Responses API's text and function-call cases, whole or streamed
                               (responses.py)
  GET  /metrics                Prometheus text: requests, tokens, tokens/s, slots, KV pages, time to
                               first token

A request's `model` must name the served model (ServeOptions.model_name or an alias; 404
model_not_found otherwise). A chat reply that breaks the harmony format keeps its text and ends with
finish reason "error"; a chat's stop strings end its content (ChatStream).

Every error answers in OpenAI's shape {"error": {"message", "type", "param", "code"}}. A client that
goes away aborts its request, which frees its slot and pages before the next step.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import harmony
from ..engine import Engine
from ..sampling import SamplingParams
from ..tokenizer import StreamDecoder
from .loop import RATE_WINDOW, EngineFailure, EngineLoop, Mailbox
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, Sampling
from .responses import InputError, ResponseBuilder, ResponsesRequest, chat_inputs, response_body
from .stops import StopMatcher


@dataclass(frozen=True)
class ServeOptions:
    """model_name: the id /v1/models lists; a request's `model` must be it or one of model_aliases
    (else 404 model_not_found; a request without `model` gets this one). api_key: required as `Authorization: Bearer KEY` on /v1/
    and /metrics (None: open). max_body_bytes: larger request bodies answer 413. max_pending: requests
    held at once (running or waiting); more answer 503 with Retry-After. reserve_slots: size the KV cache
    for this many sequences when the server starts (None: the engine sizes it as requests come).
    max_model_len: the longest sequence (prompt and new tokens) served (None: the model's context).
    slot_positions: positions the reserved cache plans per sequence on average: the sequences share
    its pages (any one may grow to max_model_len), and every byte beyond the slots goes to pages."""

    model_name: str = "gpt-oss"
    model_aliases: tuple = ()
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    max_pending: int = 1024
    reserve_slots: int | None = None
    max_model_len: int | None = None
    slot_positions: int = 2048


DISCONNECT_POLL = 0.25  # seconds between looks at whether a whole reply's client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes answers 413 before it is read in full."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than {self.limit} bytes",
                                 code="request_too_large")
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooBig:
            await too_big(scope, receive, send)


class _TooBig(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# Chat messages to harmony, and the reply back.

def chat_options(req: ChatCompletionRequest) -> harmony.ChatOptions:
    """OpenAI's system and developer messages become the developer message's instructions; the tools
    its function list; reasoning_effort goes into the system message."""
    instructions = "\n\n".join(m.text() for m in req.messages if m.role in ("system", "developer") and m.text())
    tools = () if req.tool_choice == "none" else tuple(
        harmony.Tool(t.function.name, t.function.description, t.function.parameters) for t in req.tools or ())
    return harmony.ChatOptions(reasoning_effort=req.reasoning_effort or "medium", instructions=instructions or None,
                               tools=tools)


def harmony_messages(messages: list[ChatMessage]) -> list[harmony.Message]:
    out, tool_names = [], {}
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            continue  # (chat_options)
        if m.role == "user":
            out.append(harmony.Message("user", m.text()))
        elif m.role == "assistant":
            if m.reasoning_content:
                out.append(harmony.Message("assistant", m.reasoning_content, channel="analysis"))
            if m.text():
                out.append(harmony.Message("assistant", m.text(), channel="final" if not m.tool_calls else "commentary"))
            for call in m.tool_calls or ():
                tool_names[call.id] = call.function.name
                out.append(harmony.Message("assistant", call.function.arguments, channel="commentary",
                                           recipient=f"functions.{call.function.name}",
                                           content_type="<|constrain|>json"))
        else:  # a tool's result
            name = tool_names.get(m.tool_call_id or "") or m.name
            if not name:
                raise ApiError(400, f"messages[{i}]: a tool message needs the tool_call_id of an earlier "
                                    "assistant tool call (or the tool's name)", param=f"messages[{i}]")
            out.append(harmony.Message("tool", m.text(), name=f"functions.{name}"))
    return out


def route(channel: str | None, recipient: str | None, functions: bool = True) -> str:
    """Where a reply message goes: "reasoning" (analysis), "tool" (a call to functions.NAME), "content"
    (the final answer, commentary for the user, text without a readable header) or "drop" (a call to a
    tool that is not a function, or to any tool when `functions` is off: tool_choice "none")."""
    if recipient:
        return "tool" if functions and recipient.startswith("functions.") else "drop"
    return "reasoning" if channel == "analysis" else "content"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatStream:
    """Generated ids in, OpenAI chat deltas out (dicts for choices[0].delta); a whole reply is the sum of
    its deltas (message()).

    stop: stop strings, matched on `content` only (the text the user reads: never the reasoning or a
    call's arguments); the first one ends the content before it (.stopped: the caller ends the request).
    functions: tool calls are parsed into `tool_calls` (False: tool_choice "none", they are dropped)."""

    def __init__(self, stop=(), functions: bool = True):
        self.parser = harmony.StreamParser()
        self.stops = StopMatcher(stop)
        self.functions = functions
        self.calls: list[dict] = []  # the tool calls as streamed: id, type, function {name, arguments}
        self.in_tool = False
        self.messages = {"content": 0, "reasoning": 0}  # messages started, by where they go
        self.text = {"content": [], "reasoning": []}     # what went out, by where

    @property
    def stopped(self) -> bool:
        return self.stops.hit

    def push(self, token: int | None) -> list[dict]:
        return self._deltas(self.parser.push(token) if token is not None else None)

    def finish(self, engine_reason: str | None) -> list[dict]:
        """The last deltas: the cut message's end and the content held back for a stop string.
        engine_reason: "stop" when the reply ended on a stop id (which the engine does not hand over)."""
        out = self._deltas(self.parser.finish(stopped=engine_reason == "stop"))
        held = self.stops.flush()
        if held:
            self.text["content"].append(held)
            out.append({"content": held})
        return out

    def finish_reason(self, engine_reason: str) -> str:
        """"error" when the reply broke the harmony format, "tool_calls" when it called a function, "stop"
        on a stop string, else the engine's ("stop" at a stop id, "length")."""
        if self.parser.broken is not None:
            return "error"
        return "tool_calls" if self.calls else "stop" if self.stopped else engine_reason

    def message(self) -> dict:
        """The whole reply's message: content (None for a reply of tool calls only), reasoning_content,
        tool_calls."""
        content = "".join(self.text["content"])
        message = {"role": "assistant",
                   "content": content if content or self.messages["content"] or not self.calls else None,
                   "reasoning_content": "".join(self.text["reasoning"]) or None}
        if self.calls:
            message["tool_calls"] = self.calls
        return message

    def _deltas(self, d) -> list[dict]:
        if d is None or self.stopped:
            return []
        out = []
        where = route(d.channel, d.recipient, self.functions)
        if where == "tool":
            if d.started or not self.in_tool:
                self.in_tool = True
                call = {"id": call_id(), "type": "function",
                        "function": {"name": d.recipient[len("functions."):], "arguments": ""}}
                self.calls.append(call)
                out.append({"tool_calls": [{"index": len(self.calls) - 1, **call,
                                            "function": dict(call["function"])}]})
            if d.text:
                self.calls[-1]["function"]["arguments"] += d.text
                out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": d.text}}]})
        elif where in self.messages:
            text = d.text
            if d.started:  # a message after another of its kind: "\n" between them
                text = "\n" * (self.messages[where] > 0) + text
                self.messages[where] += 1
            if where == "content":
                text = self.stops.push(text)
            if text:
                self.text[where].append(text)
                out.append({"reasoning_content" if where == "reasoning" else "content": text})
        if d.ended:
            self.in_tool = False
        return out


# ---------------------------------------------------------------------------------------------------
# The app.

def sampling_params(req: Sampling, max_tokens: int | None, room: int) -> SamplingParams:
    """room: new tokens the context leaves after the prompt (the default and the cap of max_tokens)."""
    return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p,
                          seed=secrets.randbits(32) if req.seed is None else req.seed,
                          max_tokens=max(1, min(max_tokens or room, room)), ignore_eos=req.ignore_eos)


def build_app(engine: Engine, tokenizer, options: ServeOptions | None = None) -> FastAPI:
    """The app over `engine` (its EngineLoop starts and stops with the app: app.state.loop)."""
    options = options or ServeOptions()
    cfg = engine.runner.model_config
    context = min(options.max_model_len or cfg.max_context, cfg.max_context)
    loop = EngineLoop(engine)
    pending = {"n": 0}

    @asynccontextmanager
    async def lifespan(app):
        if options.reserve_slots:
            engine.reserve(context, options.reserve_slots, options.slot_positions)
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="gptoss", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loop = loop
    app.state.options = options

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                                  code="invalid_json")
        where, msg = ".".join(loc), first["msg"].removeprefix("Value error, ")
        return error_response(400, f"{where}: {msg}" if where else msg, param=where or None,
                              code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                              else "server_error")

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    async def check_key(request: Request):
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not (header.startswith("Bearer ") and secrets.compare_digest(header[7:].encode(), options.api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                           "authentication_error", code="invalid_api_key")

    api = APIRouter(dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health():
        alive = loop._thread is not None and loop._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "gptoss", "max_model_len": context}]}

    @api.get("/metrics")
    async def metrics():
        s, sched = loop.stats, engine.scheduler
        ttft = s.first_token_seconds
        pool = sched.pool
        pages = (pool.pages, pool.pages - len(pool.free)) if pool is not None else (0, 0)
        lines = [
            ("gptoss_requests_open", "gauge", "generation requests being answered", pending["n"]),
            ("gptoss_requests_held", "gauge", "requests the engine holds (running or waiting)", loop.running),
            ("gptoss_requests_waiting", "gauge", "requests waiting for a slot", len(sched.waiting)),
            ("gptoss_slots_free", "gauge", "free sequence slots of the KV cache", len(sched.free)),
            ("gptoss_kv_pages", "gauge", "pages of the KV cache", pages[0]),
            ("gptoss_kv_pages_in_use", "gauge", "pages of the KV cache held by sequences", pages[1]),
            ("gptoss_generation_tokens_per_second", "gauge",
             f"tokens generated in the last {RATE_WINDOW:g} s, per second", s.tokens_per_second()),
            ("gptoss_requests_total", "counter", "requests added", s.requests),
            ("gptoss_requests_finished_total", "counter", "requests ended by a stop id or their length", s.finished),
            ("gptoss_requests_aborted_total", "counter", "requests aborted (client gone or shutdown)", s.aborted),
            ("gptoss_requests_failed_total", "counter", "requests ended by an engine error", s.failed),
            ("gptoss_prompt_tokens_total", "counter", "prompt tokens of the requests added", s.prompt_tokens),
            ("gptoss_generation_tokens_total", "counter", "tokens generated", s.generated_tokens),
            ("gptoss_steps_total", "counter", "engine steps", s.steps),
            ("gptoss_step_seconds_total", "counter", "seconds spent in engine steps", s.step_seconds),
            ("gptoss_engine_host_seconds_total", "counter", "the engine's host seconds between model steps",
             engine.stats["host_seconds"]),
            ("gptoss_time_to_first_token_seconds_mean", "gauge", "mean time to first token (latest 1000)",
             sum(ttft) / len(ttft) if ttft else 0.0),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def check_prompt(ids: list) -> int:
        """The room the context leaves for new tokens; 400 when the prompt does not fit."""
        if not ids:
            raise ApiError(400, "the prompt is empty (it has no tokens)", param="prompt")
        if len(ids) + 1 > context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {context} "
                                "(prompt and at least one new token)", param="messages", code="context_length_exceeded")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside this model's vocabulary (0..{cfg.vocab_size - 1})",
                           param="prompt")
        return context - len(ids)

    served_names = (options.model_name, *options.model_aliases)

    def check_model(model: str | None) -> None:
        if model is not None and model not in served_names:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {options.model_name!r}",
                           param="model", code="model_not_found")

    def check_common(req: Sampling) -> None:
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def admit() -> None:
        if pending["n"] >= options.max_pending:
            raise ApiError(503, f"the server holds {pending['n']} requests, its most; retry shortly", "server_error",
                           code="overloaded", headers={"Retry-After": "1"})

    async def generate_batches(ids: list, params: SamplingParams, request: Request | None):
        """Yields the request's TokenEvents as the engine makes them, in lists: every event that came
        since the consumer last asked (one per step while it keeps up; more when it lags, so that it
        writes them at once). The request is aborted when the consumer stops early (a streamed
        response's client gone: Starlette cancels the stream) or, given `request` (a whole reply), when
        its client disconnects (looked at every DISCONNECT_POLL seconds)."""
        mailbox = Mailbox()
        pending["n"] += 1
        handle = loop.add(ids, params, mailbox)
        done = False
        looked = time.monotonic()
        try:
            while True:
                events = await mailbox.get(DISCONNECT_POLL if request is not None else None)
                if request is not None and (not events or time.monotonic() - looked > DISCONNECT_POLL):
                    looked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if not events:
                    continue
                if isinstance(events[-1], EngineFailure):
                    done = True
                    raise ApiError(500, events[-1].message, "server_error")
                done = events[-1].done
                yield events
                if done:
                    return
        finally:
            pending["n"] -= 1
            if not done:
                loop.abort(handle)

    async def generate(ids: list, params: SamplingParams, request: Request | None):
        """generate_batches' events one at a time."""
        async with aclosing(generate_batches(ids, params, request)) as batches:
            async for events in batches:
                for ev in events:
                    yield ev

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(body, error_chunk):
        """Server-sent events from an async iterator of chunks or lists of chunks (a list is written at
        once; a str is an event already encoded); an engine failure ends the stream with an error event,
        then [DONE]."""
        try:
            async for chunks in body:
                if isinstance(chunks, list):
                    yield "".join(c if isinstance(c, str) else sse(c) for c in chunks)
                else:
                    yield sse(chunks)
        except ApiError as e:
            yield sse(error_chunk(e))
        yield "data: [DONE]\n\n"

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        check_common(req)
        try:
            options_ = chat_options(req)
            ids = harmony.encode_chat(harmony_messages(req.messages), options_)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        room = check_prompt(ids)
        params = sampling_params(req, req.max_completion_tokens or req.max_tokens, room)
        admit()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": options.model_name}

        async def replied(parse: ChatStream, whole: bool):
            """(deltas, tokens made so far, the finish reason once it ends) as the tokens come; a stop
            string in the content ends the reply (and aborts the request: aclosing)."""
            made = 0
            async with aclosing(generate(ids, params, request if whole else None)) as events:
                async for ev in events:
                    made += ev.token is not None
                    deltas = parse.push(ev.token)
                    if ev.done or parse.stopped:
                        reason = ev.reason if ev.done else "stop"
                        yield deltas + parse.finish(reason), made, parse.finish_reason(reason)
                        return
                    yield deltas, made, None

        new_reply = lambda: ChatStream(req.stop or (), functions=req.tool_choice != "none")  # noqa: E731
        if not req.stream:
            parse, made = new_reply(), 0
            finish = "length"
            async for _, made, end in replied(parse, whole=True):
                finish = end or finish
            return {"id": rid, "object": "chat.completion", "created": created, "model": options.model_name,
                    "choices": [{"index": 0, "message": parse.message(), "finish_reason": finish,
                                 "logprobs": None}],
                    "usage": usage(len(ids), made)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks():
            made, finish = 0, "length"
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]}
            async for deltas, made, end in replied(new_reply(), whole=False):
                finish = end or finish
                for d in deltas:
                    yield {**head, "choices": [{"index": 0, "delta": d, "finish_reason": None, "logprobs": None}]}
            yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None}]}
            if include_usage:
                yield {**head, "choices": [], "usage": usage(len(ids), made)}

        return StreamingResponse(stream_events(chunks(), lambda e: error_body(e.message, e.type)),
                                 media_type="text/event-stream")

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        check_common(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request (got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        room = check_prompt(ids)
        params = sampling_params(req, req.max_tokens or 16, room)  # OpenAI's default max_tokens here: 16
        admit()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": options.model_name}

        async def pieces(whole: bool):
            """(text, finish reason or None, tokens made so far) as the tokens come (the text of every
            token that came since the last piece); a stop string ends the text before it, aborts the
            request and finishes with "stop"."""
            text, stops, made = StreamDecoder(tokenizer), StopMatcher(req.stop or ()), 0
            async for events in generate_batches(ids, params, request if whole else None):
                piece = ""
                for ev in events:
                    if ev.token is not None:
                        made += 1
                        piece += stops.push(text.push(ev.token))
                    if stops.hit:
                        yield piece, "stop", made
                        return  # (generate's clean-up aborts the request)
                    if ev.done:
                        piece += stops.push(text.flush()) + stops.flush()
                        yield piece, "stop" if stops.hit else ev.reason, made
                        return
                if piece:
                    yield piece, None, made

        if not req.stream:
            out, reason, made = [], "length", 0
            async for piece, finish, made in pieces(whole=True):
                out.append(piece)
                reason = finish or reason
            return {**head, "choices": [{"index": 0, "text": "".join(out), "finish_reason": reason,
                                         "logprobs": None}], "usage": usage(len(ids), made)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks():
            # each chunk's JSON is built around its text: the fixed fields are encoded once
            before = sse({**head, "choices": [{"index": 0, "text": ""}]}).rsplit('""', 1)[0]
            after = ', "logprobs": null, "finish_reason": null}]}\n\n'
            made = 0
            async for piece, finish, made in pieces(whole=False):
                if finish is None:
                    yield [before + json.dumps(piece, ensure_ascii=False) + after]
                else:
                    yield [{**head, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]}]
            if include_usage:
                yield [{**head, "choices": [], "usage": usage(len(ids), made)}]

        return StreamingResponse(stream_events(chunks(), lambda e: error_body(e.message, e.type)),
                                 media_type="text/event-stream")

    @api.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request):
        check_model(req.model)
        try:
            messages, chat = chat_inputs(req)
            ids = harmony.encode_chat(messages, chat)
        except InputError as e:
            raise ApiError(400, str(e), param=e.param) from None
        except ValueError as e:
            raise ApiError(400, str(e), param="input") from None
        room = check_prompt(ids)
        params = SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, seed=secrets.randbits(32),
                                max_tokens=max(1, min(req.max_output_tokens or room, room)))
        admit()
        if not req.stream:
            out, reason = [], "length"
            async for ev in generate(ids, params, request):
                if ev.token is not None:
                    out.append(ev.token)
                reason = ev.reason or reason
            return response_body(req, options.model_name, out, reason, len(ids))

        async def events():
            """The Responses API's events, each as `event: TYPE` and its data; an engine failure ends the
            stream with an `error` event."""
            build = ResponseBuilder(req, options.model_name, len(ids))
            body = build.start()
            try:
                async for ev in generate(ids, params, None):
                    body += build.push(ev.token)
                    if ev.done:
                        body += build.finish(ev.reason)
                    for event in body:
                        yield f"event: {event['type']}\n{sse(event)}"
                    body = []
            except ApiError as e:
                yield f"event: error\n{sse(build.error(e.message))}"

        return StreamingResponse(events(), media_type="text/event-stream")

    app.include_router(api)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    return app
