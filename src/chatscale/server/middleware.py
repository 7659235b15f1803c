"""Gatekeeping that runs before a handler reads the body or the engine sees the request:
the API key (401), the concurrency limit (429) and the body size limit (413).

Pure ASGI rather than BaseHTTPMiddleware, so a streamed response passes through untouched and a
request's concurrency slot is held exactly until its last byte is sent.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatscale.server.errors import APIError, error_response
from chatscale.server.state import ServerState

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
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
            generation = scope["path"] in GENERATION_PATHS and scope["method"] == "POST"
            if generation:
                self._admit()
        except APIError as err:
            return await error_response(err)(scope, receive, send)
        if generation:
            self.state.in_flight += 1
        try:
            await self._with_body_limit(scope, receive, send)
        finally:
            if generation:
                self.state.in_flight -= 1

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

    def _admit(self) -> None:
        limit = self.state.settings.max_concurrent_requests
        if self.state.in_flight >= limit:
            raise APIError(429, f"This server is at capacity ({limit} concurrent requests); retry shortly.",
                           "requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})

    async def _with_body_limit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the whole body first (it is small next to generation) and replay it, so an
        oversized one is refused before any handler runs, whatever its Content-Length says."""
        limit = self.state.settings.max_body_bytes
        too_large = APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            return await error_response(too_large)(scope, receive, send)
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return await error_response(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)
