"""What one server process knows at run time: its engine (once loaded), whether it is draining,
and how many sequences it holds. Handlers and middleware share this one object."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from chatscale.engine.async_engine import AsyncEngine
from chatscale.metrics import Metrics
from chatscale.server.admission import SequenceSlots
from chatscale.server.errors import APIError
from chatscale.server.settings import ServerSettings


@dataclass(eq=False)
class ServerState:
    settings: ServerSettings
    metrics: Metrics
    engine: AsyncEngine | None = None
    load_error: str | None = None
    draining: bool = False
    # Set when the drain timeout runs out: every request still generating ends with finish_reason "abort".
    # Made by the app's lifespan, so it belongs to the loop that serves the requests.
    drain_cut: asyncio.Event | None = None
    slots: SequenceSlots = field(init=False)

    def __post_init__(self) -> None:
        self.slots = SequenceSlots(self.settings.max_concurrent_sequences, self.settings.max_sequences_per_request)

    @property
    def status(self) -> str:
        """`ok` only when requests can be served: what /health reports to load balancers."""
        if self.draining:
            return "draining"
        if self.error is not None:
            return "failed"
        return "loading" if self.engine is None else "ok"

    @property
    def error(self) -> str | None:
        """Why the server failed: loading the model, or the engine stopping later."""
        return self.load_error or (self.engine.error if self.engine is not None else None)

    def observe_engine(self) -> None:
        """Refresh the load gauges from the engine's latest snapshot (sent with its last step)."""
        if self.engine is not None:
            self.metrics.observe_engine(self.engine.snapshot, self.engine.info.max_num_seqs)

    def ready_engine(self) -> AsyncEngine:
        status = self.status
        if status != "ok":
            message = {"loading": "The model is still loading; retry shortly.",
                       "draining": "This server is shutting down; retry on another replica.",
                       "failed": f"The engine is not running: {self.error}"}[status]
            raise APIError(503, message, "server_error", code=f"server_{status}", headers={"Retry-After": "1"})
        return self.engine
