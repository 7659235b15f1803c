"""`chatscale serve`: the API under uvicorn, with a graceful drain on SIGTERM.

The port opens at once and the model loads behind it (/health: 503 "loading", then 200), so an
orchestrator can tell a slow start from a dead one. On SIGTERM or Ctrl-C uvicorn stops accepting
connections, in-flight requests get `--drain-timeout` seconds to finish (the rest are cancelled,
which aborts them in the engine), and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

import uvicorn

from chatscale.engine.async_engine import AsyncEngine
from chatscale.engine.config import EngineConfig
from chatscale.server.api import create_app
from chatscale.server.settings import ServerSettings
from chatscale.server.state import ServerState


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True  # /health says 503 at once, before uvicorn closes the port
        super().handle_exit(sig, frame)


def _log_to_stderr() -> None:
    """chatscale's own INFO lines (which model was loaded, its weights' formats and bytes, KV budget)
    next to uvicorn's; other libraries keep their defaults."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger = logging.getLogger("chatscale")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)


def serve(args: argparse.Namespace) -> int:
    _log_to_stderr()
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
                                    timeout_graceful_shutdown=settings.drain_timeout), app.state.server)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler makes a
    # drained shutdown exit 0 instead of dying by that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    server.run()
    return 1 if failed else 0


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass
