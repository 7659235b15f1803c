"""AsyncEngine: the step loop in a background thread, many asyncio callers in front of it.

Only the loop thread touches the LLMEngine. Callers post add/abort commands to it and read their
request's outputs from an asyncio queue that the thread fills with `call_soon_threadsafe`.
Torch releases the GIL while it computes, so the event loop stays responsive during a step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

from chatscale.engine.config import EngineConfig
from chatscale.engine.engine import LLMEngine
from chatscale.engine.outputs import RequestOutput
from chatscale.engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="chatscale-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, num_blocks: int | None = None) -> "AsyncEngine":
        return cls(LLMEngine(config, num_blocks=num_blocks))

    # ---- caller side (any asyncio loop) -------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving the iterator early (a client disconnect, a
        cancelled task) aborts the request in the engine and frees its pages."""
        if self.error is not None:
            raise EngineDeadError(f"the engine loop died: {self.error!r}")
        request_id = request_id or f"areq-{next(self._ids)}"
        params = replace(params or SamplingParams())
        # Validate here, in the caller, so a bad request fails fast with its own exception.
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.engine.check_request(ids, params)
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", request_id, ids, params, cache_salt))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop died: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- loop thread --------------------------------------------------------------------------
    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, ids, params, cache_salt = command
            if request_id in self._streams:  # not cancelled while queued
                try:
                    self.engine.add_request(ids, params, request_id, cache_salt)
                except ValueError as exc:
                    self._deliver(exc, request_id)
        elif command[0] == "abort":
            self.engine.abort_request(command[1])

    def _deliver(self, out: RequestOutput | BaseException, request_id: str) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    self._apply(self._commands.get(timeout=0.5) if block else self._commands.get_nowait())
                    while True:
                        self._apply(self._commands.get_nowait())
                except queue.Empty:
                    pass
                for out in self.engine.step():
                    self._deliver(out, out.request_id)
        except BaseException as exc:  # surface a crash to every waiting caller, never hang them
            self.error = exc
            for request_id in list(self._streams):
                self._deliver(exc, request_id)
            raise
