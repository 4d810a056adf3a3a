"""Every error becomes OpenAI error JSON here, and only here.

``AligndError`` subclasses carry their own status and shape; framework
errors (validation, unknown routes) and unexpected exceptions are first
converted into one, then rendered by ``error_payload``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import AligndError, from_validation_errors

logger = logging.getLogger(__name__)


class RouteError(AligndError):
    """A request the router itself refused (unknown path, wrong method)."""

    error_type = "invalid_request_error"

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = "not_found" if status_code == 404 else "method_not_allowed" if status_code == 405 else None


class ClientDisconnectedError(AligndError):
    """The client went away before the response; its work was cancelled (nginx's 499)."""

    status_code = 499
    error_type = "client_disconnected"
    code = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("The client closed the connection before the response was ready.")


class InternalServerError(AligndError):
    """Anything unexpected; details go to the log, not to the client."""

    code = "internal_error"

    def __init__(self) -> None:
        super().__init__("The server had an error while processing your request.")


def error_payload(exc: AligndError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}


def as_aligned_error(exc: Exception) -> AligndError:
    """Converts any exception into the ``AligndError`` that describes it to a client."""
    if isinstance(exc, AligndError):
        return exc
    if isinstance(exc, RequestValidationError):
        return from_validation_errors(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        return RouteError(str(exc.detail), exc.status_code)
    logger.error("unexpected error", exc_info=exc)
    return InternalServerError()


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    error = as_aligned_error(exc)
    request.state.error_type = error.error_type
    return JSONResponse(error_payload(error), status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Errors that describe themselves; anything else is answered by ``RequestContextMiddleware``."""
    for exception_class in (AligndError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exception_class, error_response)
