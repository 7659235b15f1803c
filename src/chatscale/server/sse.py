"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` events, a failure after the
headers went out as one `data: {"error": {...}}` event, and `data: [DONE]` last."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatscale.server.errors import error_event


def event(payload: BaseModel, include_usage: bool) -> str:
    """One event; `usage` appears (null until the last chunk) only when the client asked for it."""
    return f"data: {payload.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


async def _terminated(events: AsyncIterator[str]) -> AsyncIterator[str]:
    async with aclosing(events):
        try:
            async for e in events:
                yield e
        except Exception as exc:  # the status line is long gone: the error travels as an event
            yield error_event(exc)
    yield "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """An OpenAI event stream whose iterator is closed as soon as the response ends, however it ends.

    Starlette cancels the stream when the client disconnects; if that happens while the iterator
    is parked at a `yield`, only closing it runs its `finally` blocks, which abort the engine
    requests behind it and free their KV blocks now rather than whenever GC gets to it."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(_terminated(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
