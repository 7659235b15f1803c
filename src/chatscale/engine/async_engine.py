"""AsyncEngine: the server's handle on an engine core running in its own process.

The server's process keeps what is about text and HTTP — tokenizing, validating, detokenizing,
stop strings (engine/output_processor.py) — and the engine process runs steps (engine/core_process.py).
They speak over two ZeroMQ IPC sockets with msgpack (measured: benchmarks/engine_channel.py): token
ids and sampling parameters in, each step's new tokens, stats and load snapshot out.

A reader thread receives the engine's messages, turns them into request outputs and hands each
asyncio caller its own, one wake-up per event loop and step. It also watches the engine process:
if it dies, every open request fails at once and `error` is set (/health turns 503), never a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import zmq

from chatscale.engine.config import EngineConfig
from chatscale.engine.errors import EngineDeadError, RequestFailedError
from chatscale.engine.messages import (
    Abort, AddRequest, Dead, EngineInfo, EngineSnapshot, FromEngine, Ready, Shutdown, StepResult, StepStats,
    ToEngine, decoder, encoder,
)
from chatscale.engine.output_processor import OutputProcessor
from chatscale.engine.outputs import RequestOutput
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.validation import EngineFront
from chatscale.models.tokenizer import Tokenizer

log = logging.getLogger("chatscale.engine")
__all__ = ["AsyncEngine", "EngineDeadError", "RequestFailedError"]


class AsyncEngine(EngineFront):
    def __init__(self, config: EngineConfig, num_blocks: int | None = None, start_timeout: float = 600.0) -> None:
        """Start the engine process and wait until its model is loaded (raises if it fails to)."""
        self.config = config
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.error: str | None = None
        # Called with every step's StepStats on the reader thread (metrics histograms).
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self._ids = itertools.count()
        self._dir = tempfile.TemporaryDirectory(prefix="chatscale-engine-")
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PUSH)  # to the engine
        self._inbox.setsockopt(zmq.SNDHWM, 0)  # never block a caller on a burst of requests
        self._outbox = self._ctx.socket(zmq.PULL)  # from the engine
        requests_addr, results_addr = f"ipc://{self._dir.name}/requests", f"ipc://{self._dir.name}/results"
        self._inbox.bind(requests_addr)
        self._outbox.bind(results_addr)
        self._encode = encoder().encode
        self._decode = decoder(FromEngine).decode
        self._send_lock = threading.Lock()  # ZeroMQ sockets are not thread-safe
        self._lock = threading.Lock()  # the output processor and the streams, shared with the reader
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        from chatscale.engine.core_process import command

        level = logging.getLogger("chatscale").getEffectiveLevel()
        self.process = subprocess.Popen([sys.executable, *command(config, num_blocks, requests_addr, results_addr,
                                                                   level)], env=same_path_env())
        self._exited = os.pidfd_open(self.process.pid)  # readable once the process has exited
        try:
            self.info: EngineInfo = self._wait_ready(start_timeout)
        except BaseException:
            self._stop_process(0.0)
            self._close()
            raise
        self.snapshot = EngineSnapshot(num_blocks=self.info.num_blocks)
        self.outputs = OutputProcessor(self.tokenizer)
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="chatscale-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def from_config(cls, config: EngineConfig, num_blocks: int | None = None) -> "AsyncEngine":
        return cls(config, num_blocks)

    def _wait_ready(self, timeout: float) -> EngineInfo:
        poller = zmq.Poller()
        poller.register(self._outbox, zmq.POLLIN)
        poller.register(self._exited, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = dict(poller.poll(100))
            if self._outbox in events:
                message = self._decode(self._outbox.recv())
                if isinstance(message, Ready):
                    return message.info
                if isinstance(message, Dead):
                    raise RuntimeError(message.message)
            elif self._exited in events:
                raise RuntimeError(f"the engine process exited while loading (exit code {self.process.wait()})")
        raise TimeoutError(f"the engine did not load within {timeout:.0f} s")

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- caller side (any asyncio loop, any thread) --------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, cache_salt: str | None = None,
                       arrival_time: float | None = None, group_id: str = "") -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving the iterator early (a client disconnect, a
        cancelled task) aborts the request in the engine and frees its pages. Requests with one
        `group_id` (the prompts of one API call) share one fair share of the batch."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        request_id = request_id or f"areq-{next(self._ids)}"
        params = replace(params or SamplingParams())
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(ids, params)  # here, in the caller: a bad request fails fast with its own error
        arrival = arrival_time or time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.outputs.add(request_id, ids, params, arrival)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._send(AddRequest(request_id, ids, params, cache_salt, arrival, group_id))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(item.error)
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
                if not finished:
                    self.outputs.abort(request_id)
            if not finished and self.error is None:
                self._send(Abort(request_id))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.outputs.abort(request_id)
        self._send(Abort(request_id))

    def _send(self, message: ToEngine) -> None:
        """Queue a message for the engine; never blocks (with no engine connected it is dropped:
        the engine is gone, and its process watcher fails every request)."""
        try:
            with self._send_lock:
                self._inbox.send(self._encode(message), zmq.DONTWAIT)
        except zmq.Again:
            log.warning("the engine process is not connected; dropped %s", type(message).__name__)

    # ---- the reader thread ---------------------------------------------------------------------------
    def _read_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._outbox, zmq.POLLIN)
        poller.register(self._exited, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                events = dict(poller.poll(200))
                if self._outbox in events:
                    while not self._closed.is_set():
                        try:
                            message = self._decode(self._outbox.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                        if isinstance(message, StepResult):
                            self._on_step(message)
                        elif isinstance(message, Dead):
                            return self._fail(message.message)
                elif self._exited in events:
                    return self._fail(f"the engine process exited unexpectedly (exit code {self.process.wait()})")
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("the engine reader failed")
            self._fail(f"the engine reader failed: {exc!r}")

    def _on_step(self, result: StepResult) -> None:
        self.snapshot = result.snapshot
        if result.stats is not None:
            for listener in self.step_listeners:
                listener(result.stats)
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            outputs, aborts = self.outputs.process(result)
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    batches[target[0]].append((target[1], out))
        for abort in aborts:
            self._send(abort)
        for loop, items in batches.items():
            _post(loop, items)

    def _fail(self, message: str) -> None:
        """The engine is gone: fail every open request at once, and say so from now on."""
        self.error = message
        log.error("the engine is dead: %s", message)
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            for loop, queue in self._streams.values():
                batches[loop].append((queue, EngineDeadError(message)))
        for loop, items in batches.items():
            _post(loop, items)

    # ---- shutdown ------------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine process (after the server drained) and release the channel."""
        if self._closed.is_set():
            return
        self._closed.set()  # from here on the engine's exit is expected
        self._reader.join(timeout)
        if self.process.poll() is None:
            self._send(Shutdown())
        self._stop_process(timeout)
        self._close()

    def _stop_process(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _close(self) -> None:
        os.close(self._exited)
        self._ctx.destroy(linger=0)
        self._dir.cleanup()


def same_path_env() -> dict[str, str]:
    """This process's environment for a child Python process that must import what this one imports
    (as multiprocessing's spawn does): the same import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    """Hand items to queues of one event loop with a single wake-up (nothing if the loop is gone)."""
    def put() -> None:
        for queue, item in items:
            queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:
        pass  # the caller's loop has closed: nobody is waiting
