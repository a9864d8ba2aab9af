"""The one error taxonomy of the teacher service, mapped once to HTTP and once to gRPC codes.

The service and backends raise these; the HTTP and gRPC adapters only translate them.
Anything else escaping a handler is a server bug and surfaces as 500 / INTERNAL, in the same
shape. Over gRPC the kind (and field) also travel as trailing metadata (`KIND_METADATA`,
`FIELD_METADATA`), so clients classify an error by its kind, never by its message text.
"""

from __future__ import annotations

import grpc
from pydantic import ValidationError


KIND_METADATA = "potstill-error-kind"
FIELD_METADATA = "potstill-error-field"


class TeacherError(Exception):
    """Base: a message for the caller and, for bad input, the offending field.

    Raised as such (not a subclass), it is a server fault: 500 / INTERNAL."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    kind = "internal_error"
    retry_after: int | None = None  # seconds, sent as Retry-After where the caller should come back

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict:
        """The OpenAI error shape as vLLM fills it (`param` names the field, `code` is the HTTP
        status), so the `openai` SDK's `error.param` works; `field` stays for our own clients."""
        return {
            "error": {"type": self.kind, "message": self.message, "param": self.field, "code": self.http_status,
                      "field": self.field}
        }

    def grpc_details(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        return ((KIND_METADATA, self.kind),) + (((FIELD_METADATA, self.field),) if self.field else ())


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
    retry_after = 1


class Unauthenticated(TeacherError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    kind = "unauthenticated"


class Forbidden(TeacherError):
    """The caller may be who it says, but this teacher does not allow the operation (admin calls
    on a teacher started without an admin key)."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    kind = "forbidden"


class BackendUnavailable(TeacherError):
    """The model is not loaded yet, or the service is shutting down."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    kind = "unavailable"
    retry_after = 1


class RequestTimeout(TeacherError):
    """The request body did not arrive in time."""

    http_status = 408
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    kind = "request_timeout"


def unexpected(error: BaseException) -> TeacherError:
    """A server bug as the caller sees it: its class only (the traceback goes to the log, once)."""
    return TeacherError(f"internal error ({type(error).__name__}); see the teacher's log")


def from_validation_error(error: ValidationError) -> InvalidRequest:
    """The first schema violation, with its location as a dotted field path (`sequences.0.prompt`)."""
    from teacher_service.protocol import FORM_TAG

    first = error.errors(include_url=False)[0]
    # A union's branch tag (FORM_TAG + "text", ...) is in the location but names no field the caller sent.
    field = ".".join(str(part) for part in first["loc"] if not str(part).startswith(FORM_TAG)) or "body"
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(message, field=field)
