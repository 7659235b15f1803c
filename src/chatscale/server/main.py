"""`chatscale serve`: the API under uvicorn, with a graceful drain on SIGTERM.

The port opens at once and the model loads behind it (/health: 503 "loading", then 200), so an
orchestrator can tell a slow start from a dead one. On SIGTERM or Ctrl-C uvicorn stops accepting
connections and in-flight requests get `--drain-timeout` seconds to finish. Then the rest are cut:
aborted in the engine, each unfinished choice ends with finish_reason "abort" (streams: a last chunk
and [DONE], as vLLM's), and they get CUT_GRACE_S to send that before uvicorn cancels whatever is
left. The process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from types import FrameType

import uvicorn

from chatscale.engine.async_engine import AsyncEngine
from chatscale.engine.config import EngineConfig
from chatscale.server.api import create_app
from chatscale.server.settings import ServerSettings
from chatscale.server.state import ServerState

CUT_GRACE_S = 2.0


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True  # /health says 503 at once, before uvicorn closes the port
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        cut = asyncio.get_running_loop().call_later(self.state.settings.drain_timeout, self._cut)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    def _cut(self) -> None:
        if self.state.drain_cut is not None:  # None only if the app never started
            self.state.drain_cut.set()


def serve(args: argparse.Namespace) -> int:
    config = EngineConfig.from_args(args)
    settings = ServerSettings.from_args(args, config.model)
    failed = False
    server: _Server | None = None

    def load() -> AsyncEngine:
        nonlocal failed
        try:
            return AsyncEngine.from_config(config)
        except BaseException:
            failed = True
            server.should_exit = True  # no model, nothing to serve: exit instead of a 503 forever
            raise

    app = create_app(load, settings)
    server = _Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                    timeout_graceful_shutdown=settings.drain_timeout + CUT_GRACE_S), app.state.server)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler makes a
    # drained shutdown exit 0 instead of dying by that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    server.run()
    return 1 if failed else 0


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass
