"""APIError and the OpenAI error envelope, on every error path of the app.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Handlers turn APIError, tierlm's InvalidParameterError, request-validation errors (FastAPI's 422 becomes
400, naming the first offending field as `param`), Starlette's HTTP errors (404 route, 405 method) and
anything unexpected (500, logged) into that envelope.
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierlm.core.errors import InvalidParameterError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
          503: "overloaded_error", 504: "timeout_error"}


class APIError(Exception):
    """An error answered with the OpenAI envelope and an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return envelope(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The envelope as one server-sent event (errors that happen after a stream started)."""
        return f"data: {json.dumps(self.body())}\n\n"

    @classmethod
    def from_invalid(cls, e: InvalidParameterError) -> "APIError":
        return cls(400, str(e), param=e.param, code="context_length_exceeded" if _is_context(e) else None)


def _is_context(e: InvalidParameterError) -> bool:
    return "maximum context length" in str(e)


def envelope(message: str, type: str = "invalid_request_error", param: str | None = None,
             code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _validation_param(errors: list) -> str | None:
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if loc:
            return loc[0] if not loc[0].isdigit() else None
    return None


def _validation_message(errors: list) -> str:
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(InvalidParameterError)
    async def _invalid(_: Request, e: InvalidParameterError):
        return APIError.from_invalid(e).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        errors = list(e.errors())
        return APIError(400, _validation_message(errors), param=_validation_param(errors)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else "request failed"
        headers = dict(e.headers) if e.headers else None
        return APIError(e.status_code, msg, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}").response()
