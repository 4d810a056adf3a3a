"""The one exception hierarchy of alignd.

Every error a client can see is an ``AligndError``; each class knows its
HTTP status, its OpenAI error ``type`` and ``code``, and the request field
(``param``) it is about. The server turns any of them into OpenAI error
JSON in exactly one place (``server.errors``).

AligndError (500, internal_error)
├── InvalidRequestError (400, invalid_request_error)
│   ├── ContextLengthExceededError (400, context_length_exceeded)
│   ├── WorkBudgetExceededError (400, work_budget_exceeded)
│   ├── RequestTooLargeError (413, request_too_large)
│   ├── RequestTimeoutError (408, request_timeout)
│   └── UnsupportedParameterError (400, unsupported_parameter)
├── AuthenticationError (401, invalid_api_key)
├── PermissionDeniedError (403, permission_denied)
├── ModelNotFoundError (404, model_not_found)
├── OverloadedError (429, model_overloaded; sends Retry-After)
│   └── RateLimitExceededError (429, rate_limit_exceeded)
├── EngineUnavailableError (503, service_unavailable)
│   └── StoreUnavailableError (503, store_unavailable)
└── UpstreamError (502, upstream_error)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic_core import PydanticCustomError

UNSUPPORTED = "unsupported_parameter"
CROSS_FIELD = "cross_field"


def cross_field_error(param: str, message: str) -> PydanticCustomError:
    """A model validator's error naming the field at fault (pydantic gives a model's own errors no location)."""
    return PydanticCustomError(CROSS_FIELD, message.replace("{", "{{").replace("}", "}}"), {"param": param})


"""The pydantic error type of an OpenAI parameter that alignd does not implement."""


class AligndError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error shape."""

    status_code: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the error response carries."""
        return {}


class InvalidRequestError(AligndError):
    """The request is malformed or asks for something that cannot be done."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the model's context."""

    code = "context_length_exceeded"


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than the server reads."""

    status_code = 413
    code = "request_too_large"


class RequestTimeoutError(InvalidRequestError):
    """The client took longer to send its request (headers or body) than the server waits."""

    status_code = 408
    code = "request_timeout"


class WorkBudgetExceededError(InvalidRequestError):
    """Samples x tokens x models exceeds the server's per-request compute budget."""

    code = "work_budget_exceeded"


class UnsupportedParameterError(InvalidRequestError):
    """An OpenAI parameter that alignd does not implement was set."""

    code = "unsupported_parameter"


class AuthenticationError(AligndError):
    """No API key, a malformed one, an unknown or an expired one."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(AligndError):
    """The API key may not use what the request asks for (an alignment method)."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "permission_denied"


class ModelNotFoundError(AligndError):
    """The requested model is not configured on this server."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist on this server.", param="model")


class OverloadedError(AligndError):
    """The model has as many requests in flight and queued as the server admits; try again later."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "model_overloaded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RateLimitExceededError(OverloadedError):
    """The API key (or, for bad keys, the client address) is over one of its limits; try again later."""

    code = "rate_limit_exceeded"


class EngineUnavailableError(AligndError):
    """The engine behind a model cannot take the request (down, shutting down)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "engine_unavailable"


class StoreUnavailableError(EngineUnavailableError):
    """The shared store of keys' limits cannot be reached, and the server is configured to fail closed."""

    code = "store_unavailable"


class UpstreamError(AligndError):
    """An engine failed while serving a valid request."""

    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"


def from_validation_errors(errors: Sequence[Mapping[str, Any]], *, prefix: str | None = None) -> InvalidRequestError:
    """The first of pydantic's errors as a 400 naming its field: the only translation of validation errors,
    for the request body (``loc`` starts with ``body``) and for anything validated under a ``prefix``."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members appear in the location as type names ("list[int]"); keep field names and indices only.
    names = [part for part in location if part.isidentifier() or part.isdigit()]
    param = ".".join([prefix, *names] if prefix else names) or None
    kind, message = first.get("type"), str(first.get("msg"))
    if kind == CROSS_FIELD:  # the model's own error: its location, then the field it names
        named = [*([prefix] if prefix else []), *names, str((first.get("ctx") or {})["param"])]
        return InvalidRequestError(message, param=".".join(named))
    if kind == "json_invalid":
        return InvalidRequestError(f"The request body is not valid JSON: {message}")
    if kind == "missing" and param:
        return InvalidRequestError(f"`{param}` is required.", param=param)
    if kind == "extra_forbidden" and param:
        return InvalidRequestError(f"`{param}` is not a recognised parameter.", param=param)
    if kind == UNSUPPORTED:
        return UnsupportedParameterError(message, param=param)
    return InvalidRequestError(f"`{param}`: {message}" if param else message, param=param)
