"""Every failure as OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.

One mapping (`to_api_error`) serves the exception handlers and the mid-stream error event, so a
client sees the same error whether it broke before or after the first byte.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from chatscale.engine.errors import ContextLengthError, EngineDeadError, InvalidRequestError, RequestFailedError
from chatscale.engine.sampling_params import SamplingParamsError
from chatscale.server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("chatscale.server")

# Documented on every route, so /openapi.json says what a client can get back.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                        (413, "request body too large"), (429, "too many concurrent requests"),
                        (503, "loading or draining")]
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody is left to answer."""


def to_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code=exc.code)
    if isinstance(exc, (InvalidRequestError, SamplingParamsError)):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine stopped; this server cannot generate until restarted ({exc}).",
                        "server_error", code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"The server had an error while generating this answer: {exc}", "server_error")
    log.error("unexpected error", exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", "server_error")


class _ErrorJSON(JSONResponse):
    """An error body in ASCII JSON: an error may quote the request (a dict key in `param`), and a lone
    surrogate in it must come back escaped rather than break the response (and the connection)."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def error_response(err: APIError) -> JSONResponse:
    return _ErrorJSON({"error": err.detail.model_dump()}, err.status, headers=err.headers)


def error_event(exc: BaseException) -> str:
    """A mid-stream failure as OpenAI streams it: one SSE event carrying the error object."""
    return f"data: {json.dumps({'error': to_api_error(exc).detail.model_dump()})}\n\n"


def _field_path(err: dict) -> list[str | int]:
    """The error's location in the body, without pydantic's names of union members and validators."""
    return [p for p in err["loc"][1:] if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "none"}))]


def _validation_error(exc: RequestValidationError) -> APIError:
    # A value that fits no member of a union (a prompt: text, texts or token ids) has one error per
    # member; the deepest names the element at fault (`prompt.[1]`) rather than the whole field, and a
    # wrong value (-2 for a token id) says more than a wrong type (-2 is not a string).
    err = max(exc.errors(), key=lambda e: (len(_field_path(e)), not e["type"].endswith("_type")))
    if err["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {err['msg']}.")
    path = _field_path(err)
    param = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path) or None
    if err["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param or 'body'}'.", param=param,
                        code="missing_required_parameter")
    if err["type"] == "extra_forbidden":  # OpenAI's words for a field it does not define
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    where = f"Invalid value for '{param}'" if param else "Invalid request body"
    return APIError(400, f"{where}: {err['msg']}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return error_response(APIError(exc.status_code, message, headers=exc.headers))

    async def disconnected(_: Request, __: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; never reaches anyone

    for cls in (APIError, ValueError, EngineDeadError, RequestFailedError):
        app.add_exception_handler(cls, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnected, disconnected)
