"""Helpers for the server tests: a tiny engine, and real uvicorn servers on free 127.0.0.1 ports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from chatscale.engine.async_engine import AsyncEngine, same_path_env
from chatscale.engine.config import EngineConfig
from chatscale.server.api import create_app
from chatscale.server.settings import ServerSettings

MODEL = "tiny"


def make_engine(path: Path, num_blocks: int = 256, **config) -> AsyncEngine:
    """An engine process on `path` (`executor="fault_executors:SlowExecutor"` etc. for fault tests)."""
    # One torch thread: on a small shared machine, two spinning threads make a step 50x slower.
    return AsyncEngine.from_config(EngineConfig(model=str(path), threads=1, **config), num_blocks=num_blocks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(engine: AsyncEngine | Callable[[], AsyncEngine], **settings) -> FastAPI:
    return create_app(engine, ServerSettings(served_model_name=MODEL, **settings))


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """A uvicorn server for `app` in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, 20), "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def cli_server(args: list[str], output=subprocess.DEVNULL, timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """`chatscale ARGS --port P` in its own process on a free port, once its /health answers 200."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatscale.cli", *args, "--port", str(port)], stdout=output,
                            stderr=subprocess.STDOUT, env=same_path_env())  # the tests' executors importable
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, f"chatscale {args[0]} exited"
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(healthy, timeout):
        proc.kill()
        raise AssertionError(f"chatscale {args[0]} did not become healthy")
    return proc, url


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def engine_idle(engine: AsyncEngine) -> bool:
    """No request anywhere in the engine process and every KV block back in the pool, as its
    latest snapshot says (the engine sends one after every step and every batch of commands)."""
    snap = engine.snapshot
    return (snap.num_running == 0 and snap.num_waiting == 0 and snap.num_requests == 0
            and snap.num_used_blocks == 0 and engine.num_unfinished == 0 and not engine.outputs.requests)


def sse_events(lines: Iterator[str]) -> list[dict | str]:
    """The `data:` payloads of an SSE stream, parsed; `[DONE]` stays a string."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]
