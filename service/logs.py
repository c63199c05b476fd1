"""JSON log lines for the service and uvicorn (a module of its own: uvicorn's spawned
workers re-create the formatter from its import path)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class RateLimit(logging.Filter):
    """At most `per_second` records per logger through (a token bucket); the next record
    let through says how many were suppressed. An overload makes every request degraded:
    a warning line each would cost the service more CPU than the requests themselves."""

    def __init__(self, per_second: float = 20.0, burst: int = 50) -> None:
        super().__init__()
        self.rate, self.burst = per_second, float(burst)
        self.tokens, self.last = float(burst), time.monotonic()
        self.suppressed = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            t = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate)
            self.last = t
            if self.tokens < 1:
                self.suppressed += 1
                return False
            self.tokens -= 1
            if self.suppressed:
                record.msg = f"{record.msg} ({self.suppressed} similar lines suppressed)"
                self.suppressed = 0
            return True


def log_config(level: str) -> dict[str, Any]:
    """logging.config dict for the service and uvicorn (uvicorn applies it per worker)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "service.logs.JsonFormatter"}},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": "INFO"},
            "uvicorn.access": {"level": "WARNING"},  # the service logs its own requests
        },
    }
