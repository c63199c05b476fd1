"""service/routing.py: the rerank route skips FastAPI's per-request machinery (dependency
solving, native OpenTelemetry) and keeps its OpenAPI description."""

from __future__ import annotations

from typing import Any

import fastapi.routing
import pytest
from fastapi import Request, Response
from fastapi.testclient import TestClient

from service.routing import _TELEMETRY, DirectRoute, make_app


def _app() -> Any:
    app = make_app(title="t")

    async def direct(request: Request) -> Response:
        return Response(await request.body(), media_type="text/plain")

    async def plain(request: Request) -> Response:
        return Response(b"plain", media_type="text/plain")

    app.router.add_api_route("/direct", direct, methods=["POST"], route_class_override=DirectRoute)
    app.router.add_api_route("/plain", plain, methods=["POST"])
    return app


def test_a_direct_route_never_solves_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("solve_dependencies called")

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", refuse)
    client = TestClient(_app(), raise_server_exceptions=False)
    got = client.post("/direct?x=1", content=b"body", cookies={"c": "1"})
    assert got.status_code == 200 and got.content == b"body"
    assert client.post("/plain").status_code == 500  # an ordinary APIRoute does solve them


def test_a_direct_route_keeps_its_openapi_description() -> None:
    app = make_app(title="t")

    async def endpoint(request: Request) -> Response:
        return Response(b"")

    app.router.add_api_route("/x", endpoint, methods=["POST"], route_class_override=DirectRoute,
                             responses={422: {"description": "bad"}})  # fmt: skip
    op = app.openapi()["paths"]["/x"]["post"]
    assert set(op["responses"]) == {"200", "422"}


@pytest.mark.skipif(not _TELEMETRY, reason="this FastAPI has no native telemetry")
def test_native_telemetry_is_off_unless_asked_for() -> None:
    off, on = make_app()._telemetry, make_app(otel=True)._telemetry
    assert not (off["tracing"] or off["metrics"] or off["logs"])
    assert on["tracing"] and on["metrics"] and on["logs"]
