"""A real uvicorn serving `create_app(settings)` on a free loopback port, in a thread of the
test process (so a test can patch the engine and read the app's state)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from service.__main__ import HTTP_PROTOCOL
from service.app import create_app
from service.settings import Settings
from tests.support.redis_server import free_port


class ServerThread:
    """uvicorn.Server in a daemon thread; `url` once started. The admin listener is off,
    or with `admin` on a free port of its own (`admin_url`): tests run side by side."""

    def __init__(self, settings: Settings, admin: bool = False) -> None:
        self.admin_port = free_port() if admin else 0
        self.app: FastAPI = create_app(settings.model_copy(update={"admin_port": self.admin_port}))
        self.port = free_port()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            http=HTTP_PROTOCOL,  # as `python -m service` runs it: the door below ASGI
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 120.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_ready(client: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("not ready in time")
        time.sleep(0.05)


def metric_samples(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics, by (name, sorted labels)."""
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
