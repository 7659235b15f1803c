"""The engine's errors, as the server maps them to HTTP: a request that cannot be served (400), a
request whose step failed (500, the engine goes on), and an engine that stopped for good (503)."""

from __future__ import annotations


class ContextLengthError(ValueError):
    """The prompt plus the requested completion does not fit the model's context."""

    code = "context_length_exceeded"


class InvalidRequestError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestFailedError(RuntimeError):
    """The engine step running this request raised; other requests and the engine go on."""


class EngineDeadError(RuntimeError):
    """The engine cannot go on (its process died, or too many steps failed in a row)."""
