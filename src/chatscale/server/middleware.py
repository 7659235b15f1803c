"""Gatekeeping that runs before a handler sees the request: the API key (401), then the whole body,
read within a size limit (413) and a time limit (408).

Admission (429) is not here: a request's cost is its sequences (prompts x n), known only from its
body, so the handler takes its slots through the `Hold` this middleware puts in `request.state`, and
the middleware gives them back when the response has ended. Nothing is held while a body arrives,
so clients that send their bodies slowly hold no slot.

Pure ASGI rather than BaseHTTPMiddleware, so a streamed response passes through untouched and a
request's slots are held exactly until its last byte is sent.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatscale.request_body import BodyRefused, read_body
from chatscale.server.admission import Hold
from chatscale.server.errors import APIError, error_response
from chatscale.server.state import ServerState

# Open without the API key: health probes, and the chat page's and dashboard's own files, which
# hold no data (the pages ask for the key and send it with their API calls).
OPEN_PATHS = frozenset({"/health", "/", "/dashboard"})
OPEN_PREFIXES = ("/static/",)


class GateMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._authorize(scope)
            body = await self._read_body(scope, receive)
        except APIError as err:
            return await error_response(err)(scope, receive, send)

        async def replay() -> Message:
            return body.pop(0) if body else await receive()

        hold = Hold(self.state.slots)
        scope.setdefault("state", {})["hold"] = hold
        try:
            await self.app(scope, replay, send)
        finally:
            hold.release()

    def _authorize(self, scope: Scope) -> None:
        key = self.state.settings.api_key
        path = scope["path"]
        if key is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return
        sent = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = sent.partition(b" ")
        # The scheme is case-insensitive (RFC 9110); the key is compared in constant time.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode()):
            message = "Incorrect API key provided." if sent else "You didn't provide an API key."
            raise APIError(401, message + " Send it as `Authorization: Bearer KEY`.", code="invalid_api_key")

    async def _read_body(self, scope: Scope, receive: Receive) -> list[Message]:
        """The whole body first (it is small next to generation), so an oversized or slow one is
        refused before any handler runs."""
        settings = self.state.settings
        try:
            return await read_body(scope, receive, settings.max_body_bytes, settings.body_timeout)
        except BodyRefused as refused:
            raise APIError(refused.status, str(refused), code=refused.code) from None
