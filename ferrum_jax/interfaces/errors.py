"""The `FerrumError` family: the one exception type every layer raises.

Mirrors `ferrum_types::FerrumError`: one base class carrying an `ErrorKind`, with a
constructor per kind (`FerrumError.backend(...)`, `FerrumError.unsupported(...)`, ...)
and a subclass per kind so callers can `except ResourceExhaustedError`. The serving
layer maps kinds to HTTP statuses, so the kind must be right, not only the message.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    BACKEND = "backend"
    UNSUPPORTED = "unsupported"
    INVALID_REQUEST = "invalid_request"
    INVALID_CONFIG = "invalid_config"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    NOT_FOUND = "not_found"
    MODEL = "model"
    INTERNAL = "internal"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class FerrumError(Exception):
    """Base of every ferrum error; `kind` says which family member it is."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        # The request field at fault, when there is one (OpenAI error objects carry it).
        self.param = param

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    @staticmethod
    def backend(message: str) -> "FerrumError":
        return BackendError(message)

    @staticmethod
    def unsupported(message: str) -> "FerrumError":
        return UnsupportedError(message)

    @staticmethod
    def invalid_request(message: str, param: str | None = None) -> "FerrumError":
        return InvalidRequestError(message, param)

    @staticmethod
    def invalid_config(message: str) -> "FerrumError":
        return InvalidConfigError(message)

    @staticmethod
    def resource_exhausted(message: str) -> "FerrumError":
        return ResourceExhaustedError(message)

    @staticmethod
    def not_found(message: str) -> "FerrumError":
        return NotFoundError(message)

    @staticmethod
    def model(message: str) -> "FerrumError":
        return ModelError(message)

    @staticmethod
    def internal(message: str) -> "FerrumError":
        return InternalError(message)

    @staticmethod
    def timeout(message: str) -> "FerrumError":
        return TimeoutError_(message)

    @staticmethod
    def cancelled(message: str) -> "FerrumError":
        return CancelledError(message)


class BackendError(FerrumError):
    kind = ErrorKind.BACKEND


class UnsupportedError(FerrumError):
    kind = ErrorKind.UNSUPPORTED


class InvalidRequestError(FerrumError):
    kind = ErrorKind.INVALID_REQUEST


class InvalidConfigError(FerrumError):
    kind = ErrorKind.INVALID_CONFIG


class ResourceExhaustedError(FerrumError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class NotFoundError(FerrumError):
    kind = ErrorKind.NOT_FOUND


class ModelError(FerrumError):
    kind = ErrorKind.MODEL


class InternalError(FerrumError):
    kind = ErrorKind.INTERNAL


class TimeoutError_(FerrumError):
    """Named with a trailing underscore so it does not shadow the builtin `TimeoutError`."""

    kind = ErrorKind.TIMEOUT


class CancelledError(FerrumError):
    kind = ErrorKind.CANCELLED
