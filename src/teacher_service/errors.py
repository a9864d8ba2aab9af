"""The one error taxonomy of the teacher service, mapped once to HTTP and once to gRPC codes.

The service and backends raise these; the HTTP and gRPC adapters only translate them.
Anything else escaping a handler is a server bug and surfaces as 500 / INTERNAL.
"""

from __future__ import annotations

import grpc
from pydantic import ValidationError


class TeacherError(Exception):
    """Base: a message for the caller and, for bad input, the offending field."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    kind = "internal_error"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict:
        return {"error": {"type": self.kind, "message": self.message, "field": self.field}}

    def grpc_details(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidRequest(TeacherError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    kind = "invalid_request"


class RequestTooLarge(TeacherError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "request_too_large"


class Overloaded(TeacherError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "overloaded"


class Unauthenticated(TeacherError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    kind = "unauthenticated"


class BackendUnavailable(TeacherError):
    """The model is not loaded yet, or the service is shutting down."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    kind = "unavailable"


def from_validation_error(error: ValidationError) -> InvalidRequest:
    """The first schema violation, with its location as a dotted field path (`sequences.0.prompt`)."""
    from teacher_service.protocol import INPUT_FORMS

    first = error.errors(include_url=False)[0]
    # A union's branch tag ("text", "token_ids") is in the location but names no field the caller sent.
    field = ".".join(str(part) for part in first["loc"] if part not in INPUT_FORMS) or "body"
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(message, field=field)
