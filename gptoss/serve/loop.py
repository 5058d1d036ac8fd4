"""EngineLoop: the one thread that steps the Engine for every HTTP request.

The asyncio handlers never touch the engine: they send commands (add, abort) through a thread-safe
queue, which the loop drains between steps, and each request's TokenEvents come back to its own
asyncio.Queue through loop.call_soon_threadsafe. Requests that arrive while others run join the next
step (continuous batching). While nothing runs, the thread sleeps on the command queue.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..engine import Engine, TokenEvent
from ..sampling import SamplingParams


class EngineFailure:
    """Put on a request's queue instead of a TokenEvent when a step raised: the request is over."""

    def __init__(self, message: str):
        self.message = message


@dataclass
class _Stream:
    handle: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop closed (shutdown): nobody is listening any more
            pass


@dataclass
class LoopStats:
    """Counters for /metrics (written by the loop thread, read by the handlers)."""
    requests: int = 0          # requests added
    finished: int = 0          # ended by a stop id or their length
    aborted: int = 0           # aborted (a client went away, or shutdown)
    failed: int = 0            # ended by an engine error
    generated_tokens: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    first_token_seconds: list = field(default_factory=list)  # the latest times to first token


class EngineLoop:
    """Steps `engine` in a daemon thread (start() / stop()). add() queues a request and returns its
    handle; its TokenEvents (or an EngineFailure) arrive on `events`; abort(handle) drops it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = LoopStats()
        self._commands: queue.Queue = queue.Queue()
        self._handles = itertools.count()
        self._streams: dict[int, _Stream] = {}  # engine request id -> its stream
        self._rid_of: dict[int, int] = {}        # handle -> engine request id
        self._started_at: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- called from the event loop ------------------------------------------------------------------
    def add(self, prompt_ids: list, params: SamplingParams, events: asyncio.Queue, sequence: int = 0) -> int:
        handle = next(self._handles)
        self._commands.put(("add", handle, prompt_ids, params, sequence, _Stream(handle, events,
                                                                                   asyncio.get_running_loop())))
        return handle

    def abort(self, handle: int) -> None:
        """Drop a request (a no-op once it has finished); its slot and pages are free before the next step."""
        self._commands.put(("abort", handle))

    @property
    def running(self) -> int:
        """Requests the engine holds (waiting or running)."""
        return len(self._streams)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort every request still held and end the thread."""
        self._stopping = True
        self._commands.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def call(self, fn):
        """Run fn(engine) on the loop thread between steps and return its result (tests, metrics)."""
        done: Future = Future()
        self._commands.put(("call", fn, done))
        return done

    # ---- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._abort_all()
                    return
                self._do(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished():
                self._step()

    def _do(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, handle, prompt_ids, params, sequence, stream = command
            try:
                rid = self.engine.add_request(prompt_ids, params, sequence=sequence)
            except Exception as e:  # noqa: BLE001 (the handler checked the prompt; this is a last guard)
                stream.put(EngineFailure(str(e)))
                return
            self._streams[rid] = stream
            self._rid_of[handle] = rid
            self._started_at[rid] = time.perf_counter()
            self.stats.requests += 1
            self.stats.prompt_tokens += len(prompt_ids)
        elif kind == "abort":
            rid = self._rid_of.pop(command[1], None)
            if rid is not None and self._streams.pop(rid, None) is not None:
                self._started_at.pop(rid, None)
                self.engine.abort(rid)
                self.stats.aborted += 1
        elif kind == "call":
            _, fn, done = command
            try:
                done.set_result(fn(self.engine))
            except Exception as e:  # noqa: BLE001
                done.set_exception(e)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001: a failed step ends the requests it held, not the server
            message = f"the engine failed: {type(e).__name__}: {e}"
            for rid, stream in list(self._streams.items()):
                stream.put(EngineFailure(message))
                self.engine.abort(rid)
                self.stats.failed += 1
            self._forget_all()
            return
        t1 = time.perf_counter()
        self.stats.steps += 1
        self.stats.step_seconds += t1 - t0
        for ev in events:
            stream = self._streams.get(ev.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if ev.token is not None:
                self.stats.generated_tokens += 1
                started = self._started_at.pop(ev.request_id, None)
                if started is not None:
                    ttft = self.stats.first_token_seconds
                    ttft.append(t1 - started)
                    del ttft[:-1000]
            stream.put(ev)
            if ev.done:
                del self._streams[ev.request_id]
                self._rid_of.pop(stream.handle, None)
                self._started_at.pop(ev.request_id, None)
                self.stats.finished += 1

    def _abort_all(self) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            self.stats.aborted += 1
            stream.put(EngineFailure("the server is shutting down"))
        self._forget_all()

    def _forget_all(self) -> None:
        self._streams.clear()
        self._rid_of.clear()
        self._started_at.clear()


__all__ = ["EngineFailure", "EngineLoop", "LoopStats", "TokenEvent"]
