"""The request's way in, end to end on a real uvicorn and raw sockets: admission at the
door answers 503 before the body is read; the budget runs from the body's arrival; a body
that does not arrive in time is a 408."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from model.network import GenReranker
from service.app import RerankApp
from service.settings import Settings
from tests.support.bodies import make_request
from tests.support.server import ServerThread, metric_samples, wait_ready

pytestmark = pytest.mark.integration

BUDGET_MS = 1500.0  # generous: a busy test machine must not degrade the served requests
BODY_TIMEOUT_S = 3.0
SLOW_BUDGET_MS = 1000.0  # the slow upload's: it takes longer than this, less than the timeout
FLOOR = 2
# working requests held by a test to put the door at its limit: beyond any limit the
# measured rate can give (rate x share x budget, a few hundred at most here)
HELD = 100_000


@pytest.fixture(scope="module")
def server(tiny_bundle: tuple[Path, GenReranker]) -> Iterator[ServerThread]:
    settings = Settings(
        bundle=tiny_bundle[0],
        default_budget_ms=BUDGET_MS,
        body_timeout_s=BODY_TIMEOUT_S,
        admission_floor=FLOOR,
        retry_after_s=2,
        decode_policy="fixed",
    )
    srv = ServerThread(settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        wait_ready(c)
        yield c


def _head(body_len: int, request_id: str | None = None) -> bytes:
    extra = f"X-Request-ID: {request_id}\r\n" if request_id else ""
    return (f"POST /v1/rerank HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_len}\r\n{extra}\r\n").encode()  # fmt: skip


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(rest) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    return status, headers, rest


def _read_buffered(answers: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a socket's buffered reader."""
    status = int(answers.readline().split()[1])
    headers = {}
    while (line := answers.readline()) not in (b"\r\n", b""):
        name, value = line.decode("latin-1").split(":", 1)
        headers[name.lower()] = value.strip()
    return status, headers, answers.read(int(headers["content-length"]))


def _connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_a_request_over_the_limit_is_shed_with_503_before_its_body_is_read(
    server: ServerThread, client: httpx.Client
) -> None:
    """Working requests at the limit: the next one gets 503 + Retry-After + a JSON error on
    its headers alone (its body is never sent before the answer comes), counted as shed
    and rejected; the connection then serves the next request."""
    admission = server.app.state.runtime.admission
    body = orjson.dumps(make_request(np.random.default_rng(0), 20, 5))
    before = metric_samples(client)
    admission.working += HELD  # requests being worked on (held here, as a slow engine would)
    try:
        with _connect(server) as sock:
            sock.sendall(_head(len(body), "shed-me-1"))  # headers only
            t0 = time.perf_counter()
            status, headers, answer = _read_response(sock)
            took = time.perf_counter() - t0
            assert status == 503, answer
            assert headers["retry-after"] == "2"
            assert headers["x-request-id"] == "shed-me-1"
            assert headers["content-type"] == "application/json"
            assert orjson.loads(answer)["error"]["type"] == "overloaded"
            assert took < 10.0  # not waiting for the body (the read would block forever)
            # the shed request's body arrives now and is discarded; the connection lives
            sock.sendall(body)
    finally:
        admission.working -= HELD  # released, not answered (no answers to count)
    with _connect(server) as sock:  # and once the load is gone, requests are served
        sock.sendall(_head(len(body)) + body)
        status, _, answer = _read_response(sock)
        assert status == 200 and not orjson.loads(answer)["degraded"], answer
        sock.sendall(_head(len(body)) + body)  # keep-alive: a second one on it
        assert _read_response(sock)[0] == 200
    after = metric_samples(client)
    assert (
        after["rerank_shed_requests_total", ()]
        - before.get(("rerank_shed_requests_total", ()), 0.0)
        == 1
    )
    rejected = ("rerank_request_duration_seconds_count", (("outcome", "rejected"),))
    assert after[rejected] - before.get(rejected, 0.0) == 1


def test_the_shed_answer_keeps_the_connection_for_the_next_request(
    server: ServerThread, client: httpx.Client
) -> None:
    """Shed with its whole body sent: the same connection answers the next one."""
    admission = server.app.state.runtime.admission
    body = orjson.dumps(make_request(np.random.default_rng(1), 20, 5))
    with _connect(server) as sock:
        admission.working += HELD
        try:
            sock.sendall(_head(len(body)) + body)
            status, headers, _ = _read_response(sock)
            assert status == 503 and "x-request-id" in headers  # a generated id
        finally:
            admission.working -= HELD
        sock.sendall(_head(len(body)) + body)
        status, _, answer = _read_response(sock)
        assert status == 200, answer


def test_the_budget_starts_when_the_body_has_arrived(
    server: ServerThread, client: httpx.Client
) -> None:
    """A slow upload (its body arrives after longer than its budget): the model's list,
    not the upstream order, and not counted late."""
    body = orjson.dumps(make_request(np.random.default_rng(2), 20, 5, budget_ms=SLOW_BUDGET_MS))
    before = metric_samples(client)
    with _connect(server) as sock:
        sock.sendall(_head(len(body)) + body[:100])
        time.sleep(SLOW_BUDGET_MS / 1000 * 1.5)
        sock.sendall(body[100:])
        status, _, answer = _read_response(sock)
    out = orjson.loads(answer)
    assert status == 200, answer
    assert not out["degraded"], out
    after = metric_samples(client)
    late = ("rerank_late_responses_total", ())
    assert after[late] - before.get(late, 0.0) == 0


def test_slow_uploads_hold_no_place_at_the_door(server: ServerThread, client: httpx.Client) -> None:
    """More slow uploads than the door's floor, their heads all in one tick (the door's
    limit is the floor at low load): none is shed; the finished ones get the model's
    list, the one whose body never finishes a 408, not a 503."""
    body = orjson.dumps(make_request(np.random.default_rng(4), 20, 5))
    n = 3 * FLOOR + 2
    socks = [_connect(server) for _ in range(n + 1)]
    try:
        for sock in socks:  # every head (and a first piece of its body) at once
            sock.sendall(_head(len(body)) + body[:50])
        time.sleep(0.3)
        for sock in socks[:n]:
            sock.sendall(body[50:])
        statuses = [_read_response(sock)[0] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [200] * n + [408], statuses


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_the_connection_closes(
    server: ServerThread,
) -> None:
    body = orjson.dumps(make_request(np.random.default_rng(3), 20, 5))
    with _connect(server) as sock:
        sock.sendall(_head(len(body)) + body[:50])  # and never the rest
        t0 = time.perf_counter()
        status, headers, answer = _read_response(sock)
        took = time.perf_counter() - t0
        assert status == 408, answer
        error = orjson.loads(answer)["error"]
        assert error["type"] == "body_timeout" and error["field"] == "body"
        assert headers.get("connection") == "close"
        assert BODY_TIMEOUT_S * 0.9 <= took < 10.0
        assert sock.recv(1) == b""  # closed by the server


def test_a_shed_is_answered_by_the_http_protocol_without_the_asgi_app(
    server: ServerThread, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The door in uvicorn's protocol: the shed request never reaches the app (no ASGI
    task, no framework); it is counted all the same, and the connection serves the next."""
    calls: list[str] = []
    call = RerankApp.__call__

    async def counted(self: RerankApp, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("path") == "/v1/rerank":
            calls.append(scope["path"])
        await call(self, scope, receive, send)

    monkeypatch.setattr(RerankApp, "__call__", counted)
    admission = server.app.state.runtime.admission
    body = orjson.dumps(make_request(np.random.default_rng(4), 20, 5))
    before = metric_samples(client)
    with _connect(server) as sock:
        admission.working += HELD
        try:
            sock.sendall(_head(len(body), "below-asgi") + body)
            status, headers, _ = _read_response(sock)
        finally:
            admission.working -= HELD
        assert status == 503 and headers["x-request-id"] == "below-asgi"
        assert "date" in headers and "connection" not in headers  # the server's, keep-alive
        assert calls == []
        sock.sendall(_head(len(body)) + body)
        assert _read_response(sock)[0] == 200
    assert calls == ["/v1/rerank"]
    after = metric_samples(client)
    shed = ("rerank_shed_requests_total", ())
    assert after[shed] - before.get(shed, 0.0) == 1


def test_a_pipelined_request_is_answered_in_order(server: ServerThread) -> None:
    """A rerank request pipelined behind one not answered yet is left to the ASGI gate:
    its 503 comes after the earlier answer, never before it."""
    admission = server.app.state.runtime.admission
    body = orjson.dumps(make_request(np.random.default_rng(5), 20, 5))
    with _connect(server) as sock:
        admission.working += HELD
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + _head(len(body)) + body)
            answers = sock.makefile("rb")  # buffered: both answers may come in one read
            first, second = _read_buffered(answers), _read_buffered(answers)
        finally:
            admission.working -= HELD
    assert first[0] == 200 and orjson.loads(first[2]) == {"status": "alive"}
    assert second[0] == 503 and orjson.loads(second[2])["error"]["type"] == "overloaded"


@pytest.mark.parametrize(
    ("version", "extra"),
    [
        ("HTTP/1.1", "Expect: 100-continue\r\n"),
        ("HTTP/1.0", ""),
        ("HTTP/1.1", "Connection: close\r\n"),
    ],
)
def test_a_shed_without_keep_alive_closes_the_connection(
    server: ServerThread, version: str, extra: str
) -> None:
    """Expect: 100-continue (the body may never come: nothing left to frame the next
    request by), HTTP/1.0 or Connection: close: the 503 says so and the connection closes."""
    admission = server.app.state.runtime.admission
    with _connect(server) as sock:
        admission.working += HELD
        try:
            sock.sendall(f"POST /v1/rerank {version}\r\nHost: t\r\nContent-Length: 500\r\n"
                         f"{extra}\r\n".encode())  # fmt: skip
            status, headers, answer = _read_response(sock)
        finally:
            admission.working -= HELD
        assert status == 503 and headers["retry-after"] == "2", answer
        assert headers["connection"] == "close"
        assert sock.recv(1) == b""  # closed by the server


def test_only_model_answers_count_in_the_measured_rate(
    server: ServerThread, client: httpx.Client
) -> None:
    """A request out of time (budget_ms 0) gets the upstream order, degraded: it is no
    measure of what the service can serve, so the door's rate does not count it."""
    admission = server.app.state.runtime.admission
    rng = np.random.default_rng(6)
    counted = admission._answered
    late = client.post("/v1/rerank", content=orjson.dumps(make_request(rng, 20, 5, budget_ms=0)))
    assert late.status_code == 200 and late.json()["degraded"], late.text
    assert admission._answered == counted and admission.working == 0
    served = client.post("/v1/rerank", content=orjson.dumps(make_request(rng, 20, 5)))
    assert served.status_code == 200 and not served.json()["degraded"], served.text
    assert admission._answered == counted + 1
