"""FastAPI with the per-request machinery the hot path does not use taken out.

Measured with py-spy on the service at full load (one uvicorn worker, m = 30): of the
event loop's CPU, FastAPI's dependency solving for the rerank route (which has no
dependencies: it still parses the query string and cookies) took ~5%, and the native
OpenTelemetry check that FastAPI >= 0.16x runs on every request (it reads the tracer,
meter and logger providers, and the environment, even with no OpenTelemetry SDK
configured) ~4%. Both are switched off here, in the documented ways:

- `DirectRoute`, a custom APIRoute class (FastAPI's extension point for custom request
  handling): its handler calls the endpoint with the Request and nothing else. The
  endpoint reads and checks the raw body itself and returns a Response. The route keeps
  its response_model, responses and openapi_extra, so the OpenAPI schema (/docs) is the
  same, and the app's exception handlers still apply.
- `make_app`: FastAPI(...) with `telemetry` off unless asked for (`otel=True`: then
  FastAPI's native instrumentation runs, with whatever OpenTelemetry SDK the process
  configured). FastAPI versions without native telemetry simply do not get the argument.

The benchmark's echo endpoint (tests/bench/echo_app.py) is built the same way, so the
"framework floor" it measures stays the floor of this framework configuration.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute

Endpoint = Callable[[Request], Awaitable[Response]]
App = TypeVar("App", bound=FastAPI)

_TELEMETRY = "telemetry" in inspect.signature(FastAPI.__init__).parameters
_TELEMETRY_OFF = {"tracing": False, "metrics": False, "logs": False}


class DirectRoute(APIRoute):
    """An APIRoute whose endpoint takes the Request and returns a Response, called
    directly: no dependency solving, no parameter or body validation, no response-model
    serialization by FastAPI (the endpoint does its own)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request)

        return handler


def make_app(*, otel: bool = False, cls: type[App] = FastAPI, **kwargs: Any) -> App:  # type: ignore[assignment]
    """cls(**kwargs) (FastAPI or a subclass), with FastAPI's native OpenTelemetry off
    unless `otel`."""
    if _TELEMETRY and not otel:
        kwargs["telemetry"] = _TELEMETRY_OFF
    return cls(**kwargs)
