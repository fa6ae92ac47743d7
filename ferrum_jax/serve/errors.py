"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can cause leaves the server as one of these with a 4xx status:
engine `FerrumError`s map by kind, FastAPI's request validation (malformed JSON, schema
violations) becomes 400 instead of its default 422, and unknown routes keep their
404/405. Only a genuine server fault is a 500. Streams that fail after their headers
went out carry the same object as an SSE `data:` event (see `sse_error`).
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ferrum_jax.interfaces.errors import ErrorKind, FerrumError

# Error kind -> (HTTP status, OpenAI error type). Kinds a request cannot cause are 500s.
_BY_KIND = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorKind.UNSUPPORTED: (400, "invalid_request_error"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error"),
    ErrorKind.RESOURCE_EXHAUSTED: (503, "server_error"),
    ErrorKind.CANCELLED: (503, "server_error"),
    ErrorKind.TIMEOUT: (504, "server_error"),
}


class APIError(Exception):
    """An error reply; raise it from a handler and the app's handler renders it."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> "APIError":
        return cls(400, message, param=param, code=code)

    @classmethod
    def from_ferrum(cls, err: FerrumError, param: str | None = None) -> "APIError":
        status, type_ = _BY_KIND.get(err.kind, (500, "server_error"))
        return cls(status, err.message, type=type_, param=param or err.param, code=err.kind.value)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def sse_error(err: APIError) -> str:
    """The SSE event a stream sends when it fails after its headers went out."""
    return f"data: {json.dumps(err.body())}\n\n"


def _location(loc: tuple) -> str:
    # loc is ("body", field, index / sub-field / union member...) for body errors.
    return ".".join(str(p) for p in loc if p != "body") or "body"


def _validation_param(loc: tuple) -> str | None:
    # The top-level request field: the deeper path can name pydantic's union members
    # ("prompt.list[int].1"), which are no field of the API. The message has the path.
    fields = [p for p in loc if p != "body"]
    return str(fields[0]) if fields else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(FerrumError)
    async def _ferrum_error(_: Request, exc: FerrumError):
        return APIError.from_ferrum(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return APIError.bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": ")).response()
        messages = [f"{_location(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors]
        return APIError.bad_request("; ".join(messages), param=_validation_param(tuple(first.get("loc", ())))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=type_).response()

    # A bug, not bad input. Starlette re-raises it after this reply, so uvicorn logs the traceback.
    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception):
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error").response()
