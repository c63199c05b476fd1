"""service/admission.py: the door's limit from the measured answer rate and loop lag."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from service.admission import Admission, AdmissionConfig, Door, find_door, shed_response

CONFIG = AdmissionConfig(budget_s=0.05, share=0.5, floor=4, retry_after_s=1)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _answer(a: Admission, n: int) -> None:
    for _ in range(n):
        a.begin()
        a.end()


def test_the_floor_is_admitted_and_the_next_one_shed() -> None:
    a = Admission(CONFIG, Clock())
    for _ in range(CONFIG.floor):
        assert a.admit()
        a.begin()
    assert not a.admit()
    assert a.shed == 1
    a.end()
    assert a.admit()


def test_uploads_hold_no_place_and_are_asked_again_once_their_bodies_arrived() -> None:
    """Heads whose bodies come later give their places back (more of them than the limit
    are admitted); once a body arrives, beyond the limit it is refused, not let in."""
    a = Admission(CONFIG, Clock())
    for _ in range(3 * CONFIG.floor):
        assert a.admit()
        a.uploading()
    assert a.arriving == 0 and a.shed == 0
    for _ in range(CONFIG.floor):
        assert a.admit()
        a.begin()
    assert a.working == CONFIG.floor and not a.admit() and a.shed == 1
    a.end()
    assert a.admit()


def test_a_saturated_window_sets_the_rate_to_what_was_served() -> None:
    """Sheds in a window: the answers of that window are what the service can do."""
    clock = Clock()
    a = Admission(CONFIG, clock)
    clock.t = 0.05
    _answer(a, 50)  # 1000 answers/s
    for _ in range(3):
        a.working = 10**6  # at the limit: the next one is shed
        assert not a.admit()
        a.working = 0
    a._window()
    assert a.rate == pytest.approx(1000.0)
    # limit = rate x (share x budget - lag) = 1000 x 0.025
    assert a.limit == pytest.approx(25.0)
    # a slower saturated window pulls it down (smoothed), never below the floor
    clock.t = 0.10
    _answer(a, 10)
    a.working = 10**6
    a.admit()
    a.working = 0
    a._window()
    assert 200.0 < a.rate < 1000.0
    assert a.limit >= CONFIG.floor


def test_a_window_below_saturation_only_raises_the_rate() -> None:
    clock = Clock()
    a = Admission(CONFIG, clock)
    a.set_measured(rate=2000.0, lag=0.0)
    clock.t = 0.05
    _answer(a, 5)  # 100/s, nothing shed: a lower bound of what it can do
    a._window()
    assert a.rate == 2000.0
    clock.t = 0.10
    _answer(a, 200)  # 4000/s, nothing shed: it can do at least that
    a._window()
    assert a.rate == pytest.approx(4000.0)


def test_loop_lag_shrinks_the_limit_down_to_the_floor() -> None:
    a = Admission(CONFIG, Clock())
    a.set_measured(rate=2000.0, lag=0.0)
    assert a.limit == pytest.approx(50.0)
    a.set_measured(rate=2000.0, lag=0.015)
    assert a.limit == pytest.approx(20.0)
    a.set_measured(rate=2000.0, lag=1.0)  # a starved loop still feeds the engine a batch
    assert a.limit == CONFIG.floor


def test_the_lag_probe_measures_a_blocked_loop() -> None:
    async def main() -> float:
        a = Admission(CONFIG)
        a.start()
        await asyncio.sleep(0.05)
        quiet = a.lag
        import time

        time.sleep(0.1)  # the loop is blocked: the probe's timer fires 100 ms late
        for _ in range(3):  # a few loop turns: the overdue timer runs
            await asyncio.sleep(0)
        a.stop()
        assert quiet < 0.05
        return a.lag

    assert asyncio.run(main()) > 0.03


def test_the_shed_answer_is_a_503_with_retry_after_and_a_json_error() -> None:
    start, body = shed_response(3)
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"3"
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert orjson.loads(body)["error"]["type"] == "overloaded"


def test_refusals_and_degraded_answers_say_nothing_of_the_rate() -> None:
    """A flood of fast 422s, or of upstream orders for requests that ran out of time,
    must not raise the measured rate (and so the limit)."""
    clock = Clock()
    a = Admission(CONFIG, clock)
    clock.t = 0.05
    for _ in range(1000):
        a.begin()
        a.end(modelled=False)
    a._window()
    assert a.rate == 0.0 and a.working == 0
    assert a.limit == CONFIG.floor


def test_the_door_encodes_the_whole_503_and_is_found_under_middleware() -> None:
    """The bytes the HTTP protocol writes: status line, the 503's headers, the server's
    own header lines, the request's id, `connection: close` only without keep-alive."""
    counted: list[float] = []
    door = Door(Admission(CONFIG, Clock()), "/v1/rerank", lambda v: v or b"new", counted.append)
    wire = door.encoded(b"r-1", keep_alive=True, default=b"server: t\r\n")
    head, body = wire.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"retry-after"] == b"1" and headers[b"x-request-id"] == b"r-1"
    assert headers[b"server"] == b"t" and b"connection" not in headers
    assert int(headers[b"content-length"]) == len(body) and body == door.body
    closing = door.encoded(b"r-2", keep_alive=False)
    assert b"\r\nconnection: close\r\n" in closing.split(b"\r\n\r\n", 1)[0] + b"\r\n"

    class App:
        pass

    class Middleware:
        def __init__(self, app: object) -> None:
            self.app = app

    app = App()
    assert find_door(Middleware(Middleware(app))) is None
    app.door = door  # type: ignore[attr-defined]
    assert find_door(Middleware(Middleware(app))) is door


def test_a_burst_of_headers_is_admitted_only_up_to_the_limit() -> None:
    """A loop back from a stall reads many queued requests' headers in one turn, before
    any body is read: admitted ones hold their places until their bodies arrive (or the
    next tick), so the burst cannot overrun the limit."""
    a = Admission(CONFIG, Clock())
    assert [a.admit() for _ in range(CONFIG.floor + 3)] == [True] * CONFIG.floor + [False] * 3
    a.begin()  # one body arrived: its place moves from arriving to working
    assert (a.working, a.arriving) == (1, CONFIG.floor - 1)
    assert not a.admit()
    a.end()
    assert a.admit()  # the place it freed

    async def main() -> bool:
        a.start()
        await asyncio.sleep(0.05)  # a few ticks: bodies that never came hold no place
        a.stop()
        return a.admit()

    assert asyncio.run(main()) and a.arriving == 1
