"""service/admin.py: the admin listener answers /healthz, /readyz and /metrics as the main
port does, from its own threads: while the event loop is blocked too. Port 0 is off, a
taken port is a warning, and with SO_REUSEPORT several workers share one port."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from model.network import GenReranker
from service.admin import AdminServer, start_admin
from service.app import Runtime, create_app
from service.settings import Settings
from tests.support.server import ServerThread, wait_ready

pytestmark = pytest.mark.integration


class LoopGate:
    """A route that keeps the event loop busy until released: a Python loop inside
    `async def`, holding the GIL but for the interpreter's switches, as a saturated event
    loop does; nothing else runs on the loop meanwhile."""

    def __init__(self) -> None:
        self.blocked, self.released = threading.Event(), threading.Event()

    async def block(self) -> dict[str, str]:
        self.blocked.set()
        deadline = time.monotonic() + 60
        while not self.released.is_set() and time.monotonic() < deadline:
            pass
        return {}


@pytest.fixture(scope="module")
def gate() -> LoopGate:
    return LoopGate()


@pytest.fixture(scope="module")
def server(
    tiny_bundle: tuple[Path, GenReranker],
    gate: LoopGate,
) -> Iterator[ServerThread]:
    """A real uvicorn with the admin listener, ready."""
    srv = ServerThread(Settings(bundle=tiny_bundle[0], max_k=10), admin=True)
    srv.app.add_api_route("/block", gate.block)
    srv.start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_ready(c)
    yield srv
    gate.released.set()
    srv.stop()


def not_ready_runtime(bundle: Path) -> tuple[Runtime, FastAPI]:
    """An app whose lifespan has not run (no bundle loaded), and its runtime."""
    app = create_app(Settings(bundle=bundle, admin_port=0))
    return app.state.runtime, app


def get_in_process(app: FastAPI, path: str) -> httpx.Response:
    """GET `path` from the app's own routes, in process (no lifespan runs)."""

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.get(path)

    return asyncio.run(get())


def family_names(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


def test_the_admin_port_answers_as_the_main_port(server: ServerThread) -> None:
    assert server.app.state.admin.port == server.admin_port
    with (
        httpx.Client(base_url=server.url, timeout=30) as main,
        httpx.Client(base_url=server.admin_url, timeout=30) as admin,
    ):
        for path in ("/healthz", "/readyz"):
            got, want = admin.get(path), main.get(path)
            assert (got.status_code, got.json()) == (want.status_code, want.json()), path
        assert admin.get("/readyz").json()["ready"] is True
        metrics = admin.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        names = family_names(metrics.text)
        assert names == family_names(main.get("/metrics").text)
        assert {"rerank_request_duration_seconds", "rerank_inflight_requests",
                "rerank_model_info", "rerank_redis_breaker_open"} <= names  # fmt: skip
        assert admin.get("/v1/rerank").status_code == 404
        assert admin.get("/nothing").json()["error"] == "not_found"


def test_readyz_is_503_with_the_same_body_until_the_bundle_is_loaded(
    tiny_bundle: tuple[Path, GenReranker],
) -> None:
    runtime, app = not_ready_runtime(tiny_bundle[0])
    admin = AdminServer(runtime, "127.0.0.1", 0, reuse_port=False).start()
    try:
        got = httpx.get(f"http://127.0.0.1:{admin.port}/readyz", timeout=30)
    finally:
        admin.close()
    want = get_in_process(app, "/readyz")
    assert got.status_code == want.status_code == 503
    assert got.json() == want.json() == runtime.readiness()
    assert got.json()["ready"] is False and got.json()["model_version"] is None


def test_it_answers_while_the_event_loop_is_blocked(server: ServerThread, gate: LoopGate) -> None:
    """The loop is busy in /block until the admin listener has answered: were the admin
    routes on the loop, they would time out here."""
    blocker = threading.Thread(target=httpx.get, args=(f"{server.url}/block",),
                               kwargs={"timeout": 120})  # fmt: skip
    blocker.start()
    try:
        assert gate.blocked.wait(30), "the /block route did not run"
        with pytest.raises(httpx.TimeoutException):  # the main port: the loop is stuck
            httpx.get(f"{server.url}/healthz", timeout=0.5)
        with httpx.Client(base_url=server.admin_url, timeout=5) as admin:
            assert admin.get("/healthz").json() == {"status": "alive"}
            assert admin.get("/readyz").status_code == 200
            assert "rerank_request_duration_seconds" in family_names(admin.get("/metrics").text)
        assert not gate.released.is_set()  # still blocked: the answers came from elsewhere
    finally:
        gate.released.set()
        blocker.join(timeout=60)
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200


def test_port_0_is_off(tiny_bundle: tuple[Path, GenReranker]) -> None:
    runtime, _ = not_ready_runtime(tiny_bundle[0])
    assert start_admin(runtime) is None


def test_a_taken_port_is_one_warning_and_the_service_serves(
    tiny_bundle: tuple[Path, GenReranker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = ServerThread(Settings(bundle=tiny_bundle[0], max_k=10), admin=True)
    with socket.socket() as taken, caplog.at_level(logging.WARNING, "service.admin"):
        taken.bind(("127.0.0.1", srv.admin_port))
        taken.listen()
        srv.start()
        try:
            assert srv.app.state.admin is None
            assert httpx.get(f"{srv.url}/healthz", timeout=30).status_code == 200
        finally:
            srv.stop()
    warnings = [r for r in caplog.records if r.name == "service.admin"]
    assert len(warnings) == 1 and "admin listener off" in warnings[0].getMessage()


def test_workers_share_the_port_with_reuseport(
    tiny_bundle: tuple[Path, GenReranker],
) -> None:
    """--workers N: each worker's listener binds the same port; a single worker's does not
    share (a taken port is a taken port)."""
    runtime, _ = not_ready_runtime(tiny_bundle[0])
    first = AdminServer(runtime, "127.0.0.1", 0, reuse_port=True).start()
    second = AdminServer(runtime, "127.0.0.1", first.port, reuse_port=True).start()
    try:
        with pytest.raises(OSError):
            AdminServer(runtime, "127.0.0.1", first.port, reuse_port=False)
        for _ in range(4):
            r = httpx.get(f"http://127.0.0.1:{first.port}/healthz", timeout=30)
            assert r.status_code == 200
    finally:
        first.close()
        second.close()
    with pytest.raises(httpx.TransportError):  # closed: nothing listens any more
        httpx.get(f"http://127.0.0.1:{first.port}/healthz", timeout=5)
