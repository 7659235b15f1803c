"""Reading an HTTP request body whole, within a size and a time limit: the server's middleware and
the gateway both do it before anything else, so an oversized body is refused whatever its
Content-Length says and a client that trickles its body is cut off instead of holding a socket (and
whatever the caller would take for it) for as long as it likes.

Pure ASGI and no FastAPI, so the gateway can use it without the server's imports.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope


class BodyRefused(Exception):
    """413 (too large) or 408 (too slow), with OpenAI's error code for it."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


async def read_body(scope: Scope, receive: Receive, limit: int, timeout: float) -> list[Message]:
    """Every ASGI message of the body, in order (the last one ends it, or is a disconnect)."""
    too_large = BodyRefused(413, f"The request body is larger than the limit of {limit} bytes.", "request_too_large")
    declared = dict(scope["headers"]).get(b"content-length", b"0")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    messages: list[Message] = []
    size = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            raise BodyRefused(408, f"The request body did not arrive within {timeout:g} seconds.",
                              "request_timeout") from None
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            raise too_large
        if not message.get("more_body", False):
            return messages
