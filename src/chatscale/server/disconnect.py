"""Cancel work whose client has gone, so an abandoned request stops using the engine at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from chatscale.server.errors import ClientDisconnected

T = TypeVar("T")


async def _until_disconnected(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or the server's own
    # end of the response, which comes only after we return).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (a non-streamed generation); if the client disconnects first, cancel it,
    which leaves the engine's iterator and so aborts the request, and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
