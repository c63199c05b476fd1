"""Admission at the door (design §6, §8): a rerank request the service cannot start
within its budget is answered at once, 503 with `Retry-After` and a JSON error body,
before its body is read or parsed, so that under overload the event loop spends itself
on the requests it admitted and those still get the model.

Why at the door: past saturation every request costs the event loop its body read, its
JSON parse, the framework's routing and a response before anything can decide to shed
it; when that work alone exceeds the core, requests wait on the loop until their budgets
are spent and the engine, fed only with expired requests, idles (congestion collapse).
The check runs on the request's headers only, in the HTTP protocol (below), or in the
app's own ASGI `__call__` where the protocol leaves it: a shed costs the HTTP parse of
the request and one pre-built response.

What "can start within its budget" means, measured rather than configured:

- `working`: requests whose body has arrived and which are not answered yet;
- `rate`: model answers per second the service completes when it is saturated (a window
  with sheds, or with `working` at the limit), smoothed; windows that were not saturated
  can only raise it (their rate is a lower bound of what the service can do). Degraded
  answers are not counted: an upstream order for a request that ran out of time is cheap
  and fast, and counting it would raise the limit exactly when the service falls behind
  (more admitted, more of them late: the collapse the door is there to prevent);
- `lag`: how late the event loop runs a timer (a request waits about that long before
  the loop even looks at it).

A new request is admitted while `working` (with those admitted in the loop's current
tick whose bodies have not been read yet) `< max(floor, rate x (share x budget - lag))`
(Little's law: at `rate` answers per second, that many requests in the service wait at
most `share x budget - lag` before they start, after the lag they waited to be seen).
`share` leaves the rest of the budget to the request's own cache lookup and decode. The
limit settles where admitted requests spend `share x budget` in the service: a limit too
low (few admitted, answered quickly) raises the measured rate and so itself; one too high
lowers it. `floor` keeps a batch's worth admitted whatever the estimate and the lag:
bursts at low load are never shed, and a loop that lags (a starved core) still feeds the
engine the requests it can batch, rather than shedding everything and serving nothing.

The budget judged is the service's default: the body (and its `budget_ms`) is not read.

Where the door stands: below the ASGI cycle. `DoorProtocol`, uvicorn's httptools HTTP
protocol with one more step, decides on a request's parsed headers, in the parser's own
callback, and writes the pre-encoded 503 to the socket: no request task, no ASGI
messages, no framework (a shed costs the event loop the HTTP parse and one write). The
body that follows a shed head is parsed and dropped on the connection, which stays open
(keep-alive) unless the client sent `Expect: 100-continue` (its body may never come:
closed). A pipelined request behind one still running is left to the ASGI gate in the
app (its answer must not overtake the earlier one's), as is any server without this
protocol.

An admitted request whose body did not come in the read that brought its head (a slow
upload, or a body that never finishes) gives its place back at once and holds none until
its body has arrived: otherwise a burst of slow uploads fills the floor at low load and
sheds what comes behind it, and a never-finishing body gets a 503 rather than its 408.
Once its body is there it is asked again (`Admission.admit`, as a new head would be):
beyond the limit it gets the same 503, answered after its body was read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

TICK_S = 0.01  # the loop-lag probe's period
WINDOW_TICKS = 5  # the service rate is measured over this many ticks
LAG_WEIGHT = 0.5  # EWMA weight of the newest lag sample
RATE_WEIGHT = 0.3  # EWMA weight of the newest saturated window's rate


@dataclass(frozen=True)
class AdmissionConfig:
    budget_s: float  # the default budget (the body, with its own, is not read yet)
    share: float  # of the budget, at most, a request may wait before it starts
    floor: int  # requests always admitted, whatever the estimate
    retry_after_s: int  # the 503's Retry-After


class Admission:
    """The door's state: counts, the measured rate and loop lag, and the check."""

    def __init__(self, config: AdmissionConfig, clock: Callable[[], float] = time.perf_counter):
        self.config, self.clock = config, clock
        self.wait_s = config.share * config.budget_s  # a request may wait this long
        self.working = 0  # admitted, body arrived, not yet answered
        self.arriving = 0  # admitted, body not arrived yet (forgotten at each tick)
        self.rate = 0.0  # answers per second when saturated (0: not measured yet)
        self.lag = 0.0  # the event loop's lag, s (smoothed)
        self.limit = float(config.floor)
        self.shed = 0  # requests shed, in total
        self._answered = 0  # answers, in total
        self._window_start = clock()
        self._window_answered = 0
        self._window_shed = 0
        self._at_limit = False  # working reached the limit in this window
        self._ticks = 0
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.on_tick: Callable[[Admission], None] | None = None  # metrics, per window

    # ---------------------------------------------------------------- the request path

    def admit(self) -> bool:
        """May one more request come in? (Called once per request, before its body.)
        An admitted request holds a place until its body arrives (`begin`) or the next
        tick: a loop that comes back from a stall reads hundreds of queued requests in
        one turn, before any of them has begun, and must not admit them all."""
        if self.working + self.arriving < self.limit:
            self.arriving += 1
            return True
        self.shed += 1
        return False

    def uploading(self) -> None:
        """An admitted request's body did not come with its head (a slow upload, or one
        that never finishes): it gives its place back while the body arrives, and holds
        none until its body is there; then it is asked again (`admit`, as a new head is, so
        that bodies which come apart from their heads, from a client that writes them
        separately or a loaded one whose writes split, never take more than the limit:
        past saturation that would admit without bound) before it `begin`s. Counting it
        while it uploads would shed the requests behind it, at any load: a burst of slow
        uploads fills the floor at once."""
        if self.arriving:
            self.arriving -= 1

    def begin(self) -> None:
        """A request's body has arrived: it is working from now on."""
        self.working += 1
        if self.arriving:
            self.arriving -= 1
        if self.working >= self.limit:
            self._at_limit = True

    def end(self, modelled: bool = True) -> None:
        """A working request is answered: `modelled` with the model's list, or not (a
        degraded answer, or refused after its body): only the first counts in the rate."""
        self.working -= 1
        if modelled:
            self._answered += 1

    # ---------------------------------------------------------------- measurement

    def start(self) -> None:
        """Start the loop-lag probe (a timer chain on the running loop, no task)."""
        loop = asyncio.get_running_loop()
        self._window_start = self.clock()
        self._due = loop.time() + TICK_S
        self._timer = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        late = max(0.0, loop.time() - self._due)
        self.lag += LAG_WEIGHT * (late - self.lag)
        self.arriving = 0  # a body still not here after a tick: no longer held for
        self._ticks += 1
        if self._ticks % WINDOW_TICKS == 0:
            self._window()
        else:
            self._update_limit()
        self._due = loop.time() + TICK_S
        self._timer = loop.call_at(self._due, self._tick)

    def _window(self) -> None:
        now = self.clock()
        seconds = now - self._window_start
        answered = self._answered - self._window_answered
        shed = self.shed - self._window_shed
        if seconds > 0:
            observed = answered / seconds
            if shed or self._at_limit:  # saturated: what it served is what it can serve
                if answered:
                    self.rate += RATE_WEIGHT * (observed - self.rate) if self.rate else observed
            else:  # below saturation: a lower bound of what it can serve
                self.rate = max(self.rate, observed)
        self._window_start, self._window_answered, self._window_shed = (
            now,
            self._answered,
            self.shed,
        )
        self._at_limit = self.working >= self.limit
        self._update_limit()
        if self.on_tick is not None:
            self.on_tick(self)

    def _update_limit(self) -> None:
        room = max(0.0, self.wait_s - self.lag)
        self.limit = max(float(self.config.floor), self.rate * room)

    def set_measured(self, rate: float, lag: float) -> None:
        """Set the measured state directly (tests, and a start from known figures)."""
        self.rate, self.lag = rate, lag
        self._update_limit()


def shed_response(retry_after_s: int) -> tuple[Message, bytes]:
    """The 503's start message (without X-Request-ID) and body, built once."""
    body = orjson.dumps(
        {
            "error": {
                "type": "overloaded",
                "message": "the service cannot start this request within its budget; "
                "retry after Retry-After seconds, or use the upstream order",
                "field": None,
            }
        }
    )
    start = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after_s).encode()),
        ],
    }
    return start, body


class Door:
    """The door's decision and answer, shared by the HTTP protocol and the ASGI gate: the
    503 pre-encoded once (status line, headers and body), the request's X-Request-ID
    added per shed; `count(seconds)` updates the metrics of one shed that took that long."""

    def __init__(
        self,
        admission: Admission,
        path: str,
        request_id: Callable[[bytes | None], bytes],
        count: Callable[[float], None],
    ) -> None:
        self.admission, self.path, self.request_id, self.count = admission, path, request_id, count
        self.raw_path = path.encode("ascii")
        start, self.body = shed_response(admission.config.retry_after_s)
        self.status, self.headers = start["status"], list(start["headers"])
        self._head = b"HTTP/1.1 503 Service Unavailable\r\n" + b"".join(
            name + b": " + value + b"\r\n" for name, value in self.headers
        )

    def encoded(self, request_id: bytes, keep_alive: bool, default: bytes = b"") -> bytes:
        """The whole 503 as bytes on the wire (`default`: the server's own header lines)."""
        return b"".join((self._head, default, b"x-request-id: ", request_id, b"\r\n",
                         b"" if keep_alive else b"connection: close\r\n", b"\r\n",
                         self.body))  # fmt: skip


def find_door(app: Any) -> Door | None:
    """The Door of the app under uvicorn's middleware (each wraps the next as `.app`)."""
    for _ in range(16):
        if app is None:
            return None
        door = getattr(app, "door", None)
        if isinstance(door, Door):
            return door
        app = getattr(app, "app", None)
    return None


class _Answered:
    """The cycle of a request shed by the protocol: complete, so that its body's bytes
    are dropped as they are parsed (uvicorn's callbacks look at these attributes)."""

    response_complete = True
    disconnected = False
    keep_alive = True

    class message_event:  # noqa: N801 - the attribute uvicorn's callbacks set()
        @staticmethod
        def set() -> None:
            pass


_ANSWERED: Any = _Answered()
ASKED = "gref.door_asked"  # a scope key: the protocol's door has admitted this request
UPLOADING = "gref.door_uploading"  # a scope key: its body came after its head's read


class DoorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose headers-complete step asks the door first: a
    rerank request shed there is answered from the parser's callback (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.door = find_door(self.app)
        self.holding: Any = None  # the scope of a request admitted in this data_received

    def data_received(self, data: bytes) -> None:
        """The parse of `data`; then a request admitted in it whose body did not all come
        with it gives its arriving place back (Admission.uploading): a slow or unfinished
        upload must not shed the requests behind it while its body trickles in. Small
        bodies come with their heads, so the requests of one stalled turn still hold
        their places until their bodies are read."""
        super().data_received(data)
        held: Any = self.holding  # uvicorn's TypedDict scope has no key of ours
        self.holding = None
        if held is not None:
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete \
                    and id(cycle.scope) == id(held):  # fmt: skip
                held[UPLOADING] = True
                assert self.door is not None
                self.door.admission.uploading()

    def on_headers_complete(self) -> None:
        t0 = time.perf_counter()
        door = self.door
        if (
            door is None
            or self.url != door.raw_path
            or (self.cycle is not None and not self.cycle.response_complete)  # pipelined
        ):
            super().on_headers_complete()
            return
        if door.admission.admit():
            scope: Any = self.scope  # uvicorn's TypedDict has no key of ours
            scope[ASKED] = True  # the ASGI gate does not ask again
            self.holding = scope
            super().on_headers_complete()
            return
        request_id = None
        for name, value in self.headers:
            if name == b"x-request-id":
                request_id = value
                break
        parser = self.parser
        keep_alive = (
            not self.expect_100_continue  # its body may never come: no framing left
            and parser.get_http_version() != "1.0"
            and parser.should_keep_alive()
        )
        default = b"".join(name + b": " + value + b"\r\n"
                           for name, value in self.server_state.default_headers)  # fmt: skip
        self.transport.write(door.encoded(door.request_id(request_id), keep_alive, default))
        self.cycle = _ANSWERED
        door.count(time.perf_counter() - t0)
        if keep_alive:
            self.on_response_complete()  # the keep-alive timer, as after any answer
        else:
            self.server_state.total_requests += 1
            self.transport.close()
