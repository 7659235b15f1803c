"""GET /dashboard (the page) and GET /dashboard/data (its numbers): ten minutes of load, one row a second.

The server samples its own metrics every second into a ring of LoadRows (scrape.py), so a page
opened now shows the last ten minutes at once, and every viewer sees the same history. The page
polls /dashboard/data?since=T for the rows after T.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from chatscale.scrape import LoadRow, LoadWindow, Scrape
from chatscale.server.pages import page
from chatscale.server.state import ServerState

log = logging.getLogger("chatscale.server")
router = APIRouter()
INTERVAL_S = 1.0
HISTORY_ROWS = 600  # ten minutes


class History:
    def __init__(self) -> None:
        self.rows: deque[LoadRow] = deque(maxlen=HISTORY_ROWS)
        self.window = LoadWindow()

    def sample(self, state: ServerState) -> None:
        state.observe_engine()
        self.rows.append(self.window.push(Scrape.from_registry(state.metrics.registry)))

    async def run(self, state: ServerState) -> None:
        """Sample once a second, on the second, while the app runs (from when the engine is loaded)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if state.engine is not None:
                try:
                    self.sample(state)
                except Exception:  # a broken sample must not stop the next ones
                    log.exception("dashboard sample failed")
            next_at += INTERVAL_S
            await asyncio.sleep(max(0.0, next_at - loop.time()))


def _json_row(r: LoadRow) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return page("dashboard.html")


@router.get("/dashboard/data")
async def dashboard_data(request: Request, since: float = 0.0) -> dict:
    """The sampled rows newer than `since` (seconds since the epoch), oldest first."""
    history: History = request.app.state.history
    return {"interval_s": INTERVAL_S, "history_s": HISTORY_ROWS * INTERVAL_S, "now": time.time(),
            "rows": [_json_row(r) for r in history.rows if r.t > since]}
