"""JSON logs, each line carrying the id of the request it belongs to."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def logging_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for alignd and uvicorn, JSON on stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "filters": ["request_id"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {
            "json": {
                "()": JsonFormatter,
                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            }
        },
        "handlers": {"stderr": handler},
        "loggers": {
            "": {"handlers": ["stderr"], "level": level.upper()},
            # Our middleware logs one line per request; uvicorn's access log would repeat it.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            # One line per upstream call would drown the request lines; failures are logged by alignd.
            "httpx": {"level": "WARNING"},
        },
    }
