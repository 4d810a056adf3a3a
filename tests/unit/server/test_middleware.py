"""An error no handler caught: one log line that carries the request's id, a 500 in OpenAI's shape, no re-raise."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI

from server.errors import install_error_handlers
from server.logs import RequestIdFilter
from server.metrics import Metrics
from server.middleware import RequestContextMiddleware


def app() -> FastAPI:
    application = FastAPI()
    install_error_handlers(application)

    @application.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    application.add_middleware(RequestContextMiddleware, metrics=Metrics())
    return application


async def test_an_unexpected_error_is_one_logged_500_with_the_request_id(caplog: pytest.LogCaptureFixture):
    caplog.handler.addFilter(RequestIdFilter())
    transport = httpx.ASGITransport(app=app(), raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with caplog.at_level(logging.ERROR):
            response = await client.get("/boom", headers={"x-request-id": "req-42"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "req-42"
    assert response.json()["error"]["code"] == "internal_error"
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].request_id == "req-42"  # type: ignore[attr-defined]
    assert errors[0].exc_info is not None and "kaput" in str(errors[0].exc_info[1])
