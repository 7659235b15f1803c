"""`chatscale serve`: the API under uvicorn, with a graceful drain on SIGTERM.

The port opens at once and the model loads behind it (/health: 503 "loading", then 200), so an
orchestrator can tell a slow start from a dead one; one log line, "ready at http://HOST:PORT", says
when requests are served. On SIGTERM or Ctrl-C uvicorn stops accepting connections and in-flight
requests get `--drain-timeout` seconds to finish. Then the rest are cut: aborted in the engine, each
unfinished choice ends with finish_reason "abort" (streams: a last chunk and [DONE], as vLLM's), and
they get CUT_GRACE_S to send that before uvicorn cancels whatever is left. The engine process is
stopped last. The process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from uvicorn.logging import DefaultFormatter

from chatscale.distributed.sharding import check_divides
from chatscale.engine.async_engine import AsyncEngine
from chatscale.engine.config import EngineConfig
from chatscale.models.loader import model_config
from chatscale.server.api import create_app
from chatscale.server.settings import ServerSettings
from chatscale.server.state import ServerState

CUT_GRACE_S = 2.0
log = logging.getLogger("chatscale")


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
    _log_to_stderr()
    config = EngineConfig.from_args(args)
    # A missing or unsupported model, or one that does not split over the ranks: one line now, not a
    # failed server later.
    check_divides(model_config(config.model), config.tensor_parallel_size)
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

    def ready() -> None:
        log.info("ready at http://%s:%d (model %r)", settings.host, settings.port, settings.served_model_name)

    app = create_app(load, settings, on_ready=ready)
    server = _Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                    timeout_graceful_shutdown=settings.drain_timeout + CUT_GRACE_S), app.state.server)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler makes a
    # drained shutdown exit 0 instead of dying by that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    server.run()
    return 1 if failed else 0


def _log_to_stderr() -> None:
    """chatscale's INFO lines (the KV pool's size, the ready line) in uvicorn's format, beside its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass
