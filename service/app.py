"""The FastAPI app: `create_app(settings)`; engine, cache and Redis client live in the
lifespan and on `app.state.runtime` (service/lifecycle.py: open, warm, swap, reload,
drain); routes are thin and get it through a typed dependency.

/readyz answers 503 until the bundle is warmed (so does /v1/rerank: an orchestrator
routes nothing here yet) and again once a shutdown drain begins.
/healthz, /readyz and /metrics are also served on the admin port (service/admin.py), off
the event loop, so that probes and scrapes are answered under overload.

One idea, kept in one module at its size: the service's HTTP face (the app and its door,
the rerank route from the body's bytes to the response, the probes); what they serve
lives in lifecycle.py, rerank.py and request_reader.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from service.admission import (
    ASKED,
    UPLOADING,
    Admission,
    AdmissionConfig,
    Door,
    Message,
    Scope,
    Send,
)
from service.api import (
    ApiError,
    ErrorOut,
    Parsed,
    RerankOut,
    bad_request_id,
    invalid,
    request_schema,
)
from service.lifecycle import Runtime, lifespan
from service.logs import RateLimit
from service.metrics import Metrics
from service.rerank import Outcome
from service.routing import DirectRoute, make_app
from service.settings import Settings

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")
degraded_log = logging.getLogger("service.degraded")  # one warning per degraded request,
degraded_log.addFilter(RateLimit())  # at most 20/s (+ a count of the suppressed)

_JSON = "application/json"
# numpy values as they are: a float32 score prints as its shortest float32 form (0.1234567,
# not the float64 widening 0.12345670163631439)
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


async def get_runtime(request: Request) -> Runtime:
    """async: a plain def dependency would cost every request a thread-pool hop."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


_ID_PREFIX = uuid.uuid4().hex[:12]  # per process: ids are unique across workers and restarts
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A unique request id without uuid4's system call per request."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body, option=_DUMPS_OPTIONS), status_code=status,
                    media_type=_JSON, headers=headers)  # fmt: skip


def header(request: Request, name: bytes) -> str | None:
    """One request header (name in lower case), read from the ASGI scope: starlette's
    request.headers builds a Headers object of every header first, on every request."""
    for key, value in request.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 beyond `limit` bytes (Content-Length, then the bytes),
    and with 408 when it has not all arrived `timeout_s` after the headers."""
    length = header(request, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "body_too_large", f"{length} bytes, at most {limit}", "body")
    chunks, size = [], 0
    # a timer that cancels this task (asyncio.timeout's way, which Python 3.10 lacks;
    # wait_for would cost a task per request)
    task = asyncio.current_task()
    assert task is not None
    timer = _BodyTimer(task)
    handle = asyncio.get_running_loop().call_later(timeout_s, timer.expire)
    # the ASGI messages themselves: starlette's request.stream() (an async generator)
    # costs several times the CPU of this loop for a body that came in one piece
    receive = request.receive
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: gone before its body
                raise ClientDisconnect()  # arrived: nobody reads the answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"more than {limit} bytes", "body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except ClientDisconnect:
        raise ApiError(499, "client_closed_request", "the client closed the connection "
                       "before its body arrived", "body") from None  # fmt: skip
    except asyncio.CancelledError:
        if not timer.expired:
            raise
        raise _body_timeout(request, task, timeout_s, size) from None
    finally:
        handle.cancel()
    return b"".join(chunks)


def _body_timeout(request: Request, task: asyncio.Task[Any], timeout_s: float,
                  size: int) -> ApiError:  # fmt: skip
    """The 408 of a body that did not arrive in time; this task's cancel is handled, and
    the connection is closed after the answer (the rest of the body may still come)."""
    uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
    if uncancel is not None:
        uncancel()
    headers = getattr(request.state, "headers", None)
    if headers is None:
        request.state.headers = headers = {}
    headers["Connection"] = "close"
    return ApiError(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s of "
                    f"the headers ({size} bytes came)", "body")  # fmt: skip


class _BodyTimer:
    """Cancels the reading task once, when the body read's time is up."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task, self.expired = task, False

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()


# the Server-Timing header (tests/bench/echo_app.py sends the same, with zeros)
SERVER_TIMING = ", ".join(f"{name};dur=%.3f" for name in ("queue", "cache", "encode", "decode",
                                                          "total"))  # fmt: skip


def _server_timing(out: Outcome, total_s: float) -> str:
    return SERVER_TIMING % (out.queue_s * 1000, out.cache_s * 1000, out.encode_s * 1000,
                             out.decode_s * 1000, total_s * 1000)  # fmt: skip


def _observe(metrics: Metrics, out: Outcome, total_s: float, m: int) -> None:
    stage = metrics.stage_of
    if out.queued:  # stages a shed request never reached are not observed as 0 s
        stage["queue"].observe(out.queue_s)
    if out.looked_up:
        stage["cache"].observe(out.cache_s)
    if out.passes:
        stage["encode"].observe(out.encode_s)
        stage["decode"].observe(out.decode_s)
        stage["total_model"].observe(out.encode_s + out.decode_s)
        metrics.decode_passes.observe(out.passes)
    metrics.candidates.observe(m)
    metrics.duration_of["degraded" if out.degraded else "ok"].observe(total_s)
    if out.reason is not None:
        metrics.fallback_of[out.reason].inc()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _respond(
    runtime: Runtime,
    version: str,
    parsed: Parsed,
    out: Outcome,
    request_id: str,
    arrival: float,
    budget_s: float,
) -> Response:
    """The response of a served request (model list or fallback), its metrics and logs.
    version: of the bundle that served it (a swap meanwhile does not relabel it); an
    answer later than `budget_s` after arrival is counted late."""
    metrics = runtime.metrics
    total_s = time.perf_counter() - arrival
    _observe(metrics, out, total_s, parsed.m)
    if total_s > budget_s:
        metrics.late.inc()
    # milliseconds to the microsecond: finer digits are clock noise
    timings = {"queue_ms": _ms(out.queue_s), "cache_ms": _ms(out.cache_s),
               "encode_ms": _ms(out.encode_s), "decode_ms": _ms(out.decode_s),
               "total_ms": _ms(total_s)}  # fmt: skip
    # the model's and the upstream scores are float32: sent as float32 (exact round trip)
    scores = np.asarray(out.scores, np.float32)
    body = {
        "request_id": request_id,
        "model_version": version,
        "items": [{"item_id": i, "score": sc} for i, sc in zip(out.item_ids, scores, strict=True)],
        "degraded": out.degraded,
        "reason": out.reason,
        "passes": out.passes,
        "timings": timings,
    }
    if out.degraded:
        degraded_log.warning("request %s degraded: %s", request_id, out.reason)
    if access_log.isEnabledFor(logging.DEBUG):
        access_log.debug("%s", orjson.dumps({"request_id": request_id, "m": parsed.m,
                         "k": parsed.k, "reason": out.reason, "passes": out.passes,
                         **timings}).decode())  # fmt: skip
    headers = {"X-Request-ID": request_id, "Server-Timing": _server_timing(out, total_s)}
    return json_response(body, headers=headers)


def _custom_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus RerankIn (the body is parsed from bytes, not by FastAPI) with
    the served bundle's limits (rebuilt after a swap: they may have grown)."""
    reranker = app.state.runtime.reranker
    reader = reranker.reader if reranker is not None else None
    if app.openapi_schema is None or getattr(app.state, "openapi_reader", None) is not reader:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)  # fmt: skip
        body = request_schema(reader)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["RerankIn"] = body
        app.openapi_schema, app.state.openapi_reader = schema, reader
    return app.openapi_schema


RERANK_PATH = "/v1/rerank"
RERANK_DESCRIPTION = "Rerank the candidates: the top k, best first."


class RerankApp(FastAPI):
    """FastAPI whose own ASGI entry asks the door first: a rerank request shed there is
    answered before FastAPI's middleware, routing and body read (service/admission.py).
    Under uvicorn with DoorProtocol the door has decided before the ASGI cycle began;
    this gate is the door for pipelined requests and for other servers."""

    door: Door | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        door = self.door
        if (
            door is not None
            and scope["type"] == "http"
            and scope["path"] == RERANK_PATH
            and ASKED not in scope
            and not door.admission.admit()
        ):
            await _shed(door, scope, send)
            return
        await super().__call__(scope, receive, send)


async def _shed(door: Door, scope: Scope, send: Send) -> None:
    """The door's 503 through the ASGI cycle."""
    t0 = time.perf_counter()
    request_id = None
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            request_id = value
            break
    start: Message = {
        "type": "http.response.start",
        "status": door.status,
        "headers": [*door.headers, (b"x-request-id", door.request_id(request_id))],
    }
    await send(start)
    await send({"type": "http.response.body", "body": door.body})
    door.count(time.perf_counter() - t0)


def _echoed_id(value: bytes | None) -> bytes:
    """The X-Request-ID a shed answer carries: the client's when valid, else a new one."""
    if value is not None:
        request_id = value.decode("latin-1")
        if bad_request_id(request_id) is None:
            return value
    return new_request_id().encode("latin-1")


def _door(runtime: Runtime) -> Door:
    assert runtime.admission is not None
    shed, rejected = runtime.metrics.shed, runtime.metrics.duration_of["rejected"]

    def count(seconds: float) -> None:
        shed.inc()
        rejected.observe(seconds)

    return Door(runtime.admission, RERANK_PATH, _echoed_id, count)


def _admission(s: Settings, metrics: Metrics) -> Admission:
    config = AdmissionConfig(s.default_budget_ms / 1000, s.admission_share, s.admission_floor,
                             s.retry_after_s)  # fmt: skip
    admission = Admission(config)

    def publish(a: Admission) -> None:  # every measurement window: the gauges
        metrics.admission_limit.set(a.limit)
        metrics.loop_lag.set(a.lag)

    admission.on_tick = publish
    return admission


@asynccontextmanager
async def _serving(app: FastAPI) -> AsyncIterator[None]:
    """The lifespan (service/lifecycle.py) under the settings' GIL switch interval: the
    event loop and the engine thread take turns with the GIL, and at Python's 5 ms a
    loop that wakes while the engine runs Python (numpy between onnxruntime calls) may
    wait that long. The interval is the process's: set at start, restored at shutdown."""
    interval_ms = app.state.runtime.settings.switch_interval_ms
    before = sys.getswitchinterval()
    if interval_ms > 0:
        sys.setswitchinterval(interval_ms / 1000)
    try:
        async with lifespan(app):
            yield
    finally:
        sys.setswitchinterval(before)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, configured by `settings` (default: Settings() from the environment)."""
    settings = settings if settings is not None else Settings()
    runtime = Runtime(settings=settings, metrics=Metrics())
    if settings.admission:
        runtime.admission = _admission(settings, runtime.metrics)
    app = make_app(
        cls=RerankApp,
        otel=settings.otel,
        title="gref-serve",
        version="0.1.0",
        description="Generative reranking (GReF) of upstream candidate lists.",
        lifespan=_serving,
    )
    app.state.runtime = runtime
    app.door = _door(runtime) if runtime.admission is not None else None
    app.openapi = lambda: _custom_openapi(app)  # type: ignore[method-assign]
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    _add_rerank_route(app)
    _add_probe_routes(app)
    return app


async def _api_error(request: Request, exc: ApiError) -> Response:
    return json_response(exc.body(), exc.status, getattr(request.state, "headers", None))


def _request_id(request: Request) -> tuple[str, str | None]:
    """(the request's id, why its X-Request-ID header is refused or None): the client's
    header when valid, else a new id (a refused header is not echoed back)."""
    request_id = header(request, b"x-request-id")
    refused = None if request_id is None else bad_request_id(request_id)
    if request_id is None or refused is not None:
        request_id = new_request_id()
    return request_id, refused


def _rejected(metrics: Metrics, entry: float, request_id: str, e: ApiError) -> None:
    """A request refused before the engine: counted, and logged at debug level only (a
    client's mistake, not the service's problem)."""
    metrics.duration_of["rejected"].observe(time.perf_counter() - entry)
    line = {"request_id": request_id, "status": e.status, "field": e.field, "error": e.message}
    access_log.debug("%s", orjson.dumps(line).decode())


def _failed(request: Request, metrics: Metrics, entry: float, request_id: str) -> Response:
    """The service's own failure (a bug): counted, logged, a JSON 500."""
    metrics.duration_of["error"].observe(time.perf_counter() - entry)
    log.exception("request %s failed", request_id)
    error = ApiError(500, "internal_error", f"the service failed (request {request_id})")
    return json_response(error.body(), error.status, request.state.headers)


def _begin(request: Request, runtime: Runtime, admission: Admission) -> None:
    """The request starts its work (admission.begin); a body that came after its head's
    read is asked again first (module doc), and a 503 "overloaded" when it is shed."""
    if UPLOADING in request.scope and not admission.admit():
        runtime.metrics.shed.inc()
        request.state.headers["Retry-After"] = str(runtime.settings.retry_after_s)
        raise ApiError(503, "overloaded", "the service cannot start this request within its "
                       "budget; retry after Retry-After seconds, or use the upstream "
                       "order")  # fmt: skip
    admission.begin()


async def rerank(request: Request) -> Response:
    """POST /v1/rerank: the top k of the candidates, best first (RERANK_DESCRIPTION is
    its OpenAPI text). One function on purpose: the in-flight gauge and the admission's
    begin / end bracket the whole request, from the body read to the answer, and every
    stage in between is a call of its own."""
    entry = time.perf_counter()
    runtime: Runtime = request.app.state.runtime  # no Depends: the hot path skips DI
    metrics, s, admission = runtime.metrics, runtime.settings, runtime.admission
    request_id, refused = _request_id(request)
    request.state.headers = {"X-Request-ID": request_id}
    metrics.inflight.inc()
    working = modelled = False
    try:
        try:
            if refused is not None:
                raise invalid("X-Request-ID", refused)
            if not runtime.ready or runtime.reranker is None:
                raise ApiError(503, "not_ready", "model is loading or warming up")
            body = await read_body(request, s.max_body_bytes, s.body_timeout_s)
            arrival = time.perf_counter()  # the budget runs from here: not a slow upload
            if admission is not None:
                _begin(request, runtime, admission)
                working = True
            # once, and after the last await before reranker.rerank() counts the request
            # as active: a swap's retire of the old one then waits for it
            reranker = runtime.reranker
            parsed = reranker.reader.read_json(body)
        except ApiError as e:
            _rejected(metrics, entry, request_id, e)
            raise
        if parsed.request_id is not None:
            request_id = parsed.request_id
        budget_ms = parsed.budget_ms if parsed.budget_ms is not None else s.default_budget_ms
        budget_s = budget_ms / 1000
        out = await reranker.rerank(parsed, arrival + budget_s, request_id, request.receive)
        if out is None:  # the client went away before the engine ran it: nobody to answer
            return Response(status_code=499)
        modelled = not out.degraded  # what the door's measured rate counts
        return _respond(runtime, reranker.engine.version, parsed, out, request_id, arrival,
                        budget_s)  # fmt: skip
    except ApiError:
        raise
    except Exception:
        return _failed(request, metrics, entry, request_id)
    finally:
        metrics.inflight.dec()
        if working:
            admission.end(modelled)  # type: ignore[union-attr]


def _add_rerank_route(app: FastAPI) -> None:
    """POST /v1/rerank: `rerank` reads its own body (no DI, no FastAPI validation); the
    OpenAPI schema still shows RerankIn, RerankOut and every error answer."""
    app.router.add_api_route(
        RERANK_PATH,
        rerank,
        methods=["POST"],
        description=RERANK_DESCRIPTION,
        route_class_override=DirectRoute,
        response_model=RerankOut,
        responses={
            408: {"model": ErrorOut, "description": "the body did not arrive in time"},
            413: {"model": ErrorOut},
            422: {"model": ErrorOut},
            503: {
                "model": ErrorOut,
                "description": "not ready, or overloaded: shed before the body was read "
                "(with Retry-After); the caller keeps its upstream order",
            },
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": {"$ref": "#/components/schemas/RerankIn"}}},
            }
        },
    )


def _add_probe_routes(app: FastAPI) -> None:
    """/healthz, /readyz, /v1/model and /metrics."""

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"description": "loading or warming up"}})
    async def readyz(runtime: RuntimeDep) -> Response:
        """Ready once the bundle is loaded and every bucket warmed; reports the cache."""
        body = runtime.readiness()
        return json_response(body, 200 if body["ready"] else 503)

    @app.get("/v1/model")
    async def model(runtime: RuntimeDep) -> Response:
        """The served bundle's manifest."""
        if runtime.engine is None:
            raise ApiError(503, "not_ready", "model is loading")
        return json_response(runtime.engine.bundle.manifest)

    @app.get("/metrics")
    async def metrics(runtime: RuntimeDep) -> Response:
        """Prometheus exposition (every worker's, in multiprocess mode)."""
        data, content_type = runtime.exposition()
        return Response(data, media_type=content_type)


def factory() -> FastAPI:
    """uvicorn --factory entry point: settings from the environment."""
    return create_app(Settings())
