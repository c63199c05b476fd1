"""Admission at the door (design §6, §8): a rerank request the service cannot start
within its budget is answered at once, 503 with `Retry-After` and a JSON error body,
before its body is read or parsed, so that under overload the event loop spends itself
on the requests it admitted and those still get the model.

Why at the door: past saturation every request costs the event loop its body read, its
JSON parse, the framework's routing and a response before anything can decide to shed
it; when that work alone exceeds the core, requests wait on the loop until their budgets
are spent and the engine, fed only with expired requests, idles (congestion collapse).
The check here runs in the app's own ASGI `__call__`, before FastAPI's middleware and
routing, on the request's headers only: a shed costs the HTTP server's parse of the
request and one pre-built response.

What "can start within its budget" means, measured rather than configured:

- `working`: requests whose body has arrived and which are not answered yet;
- `rate`: answers per second the service completes when it is saturated (a window with
  sheds, or with `working` at the limit), smoothed; windows that were not saturated can
  only raise it (their rate is a lower bound of what the service can do);
- `lag`: how late the event loop runs a timer (a request waits about that long before
  the loop even looks at it).

A new request is admitted while `working < max(floor, rate x (share x budget - lag))`
(Little's law: at `rate` answers per second, that many requests in the service wait at
most `share x budget - lag` before they start, after the lag they waited to be seen).
`share` leaves the rest of the budget to the request's own cache lookup and decode. The
limit settles where admitted requests spend `share x budget` in the service: a limit too
low (few admitted, answered quickly) raises the measured rate and so itself; one too high
lowers it. `floor` keeps a batch's worth admitted whatever the estimate and the lag:
bursts at low load are never shed, and a loop that lags (a starved core) still feeds the
engine the requests it can batch, rather than shedding everything and serving nothing.

The budget judged is the service's default: the body (and its `budget_ms`) is not read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

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
        """May one more request come in? (Called once per request, before its body.)"""
        if self.working < self.limit:
            return True
        self.shed += 1
        return False

    def begin(self) -> None:
        """A request's body has arrived: it is working from now on."""
        self.working += 1
        if self.working >= self.limit:
            self._at_limit = True

    def end(self, served: bool = True) -> None:
        """A working request is answered: `served` with a list (the model's or degraded),
        or refused after its body (a 422 costs little: it says nothing of the rate)."""
        self.working -= 1
        if served:
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
