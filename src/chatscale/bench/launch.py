"""Start a server process for a benchmark (or a browser test) and know when it can take requests.

Servers load their model behind an open port (chatscale's and llama.cpp's /health answer 503 until
ready), so "the port accepts connections" is not "ready": wait for GET /health to say 200, within a
bound, and fail with the server's own log when it dies or never gets there.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(cmd: list[str], port: int, log: Path, timeout: float = 300.0) -> Iterator[str]:
    """Run `cmd` (a server listening on 127.0.0.1:`port`, output to `log`); yield its URL once
    /health answers 200; terminate it (then kill, if it will not stop) on exit."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
