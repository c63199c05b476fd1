"""Open-loop schedules and warm passes for the load generator of loadtest/driver.py.

A `Schedule` is segments of constant rate back to back; request i is sent at its scheduled
time with body i mod n on a free connection (at most `connections`; beyond, it waits in the
sender), and EVERY request is accounted for: answered (with its status, degraded reason,
list length and the handler's own total_ms), failed, or unanswered within the grace.
/metrics is read at the segment boundaries (and on a grid), so each segment has its own
server-side window. A `Warm` pass gets every body answered once with the model's list
before a target is measured (their items then in its L1 cache).

`run_job_async` is the runner a LoadProcess needs for these jobs (and for Phases).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.driver import (
    LoadProcess,
    Phase,
    RawPool,
    http_request,
    now,
    run_phase_async,
    scrape_metrics,
    wait_until,
)

REASONS = ("budget", "overload", "cache", "model")  # RerankOut.reason
_REASON = re.compile(rb'"reason":"(\w+)"')
_TOTAL_MS = re.compile(rb'"total_ms":([-+.eE0-9]+)')  # the response's own timings


@dataclass(frozen=True)
class Segment:
    name: str
    rate: float  # requests per second
    seconds: float


@dataclass(frozen=True)
class Schedule:
    """An open-loop load: segments back to back, request i sent at its scheduled time with
    body i mod n_bodies, on a free connection (at most `connections`; beyond, it waits for
    one). Every request is accounted for; none is dropped by the sender."""

    port: int
    segments: tuple[Segment, ...]
    connections: int = 512
    keep_bodies: bool = False  # return every response body (request number -> body)
    scrape: bool = True  # GET /metrics at every segment boundary ...
    scrape_every_s: float = 0.0  # ... and every this many seconds (0: only there)
    grace_s: float = 30.0  # after the last send, wait this long for the last answers

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.segments)

    def boundaries(self) -> np.ndarray:
        """(segments + 1,) start of every segment and the end, s from the start."""
        return np.concatenate([[0.0], np.cumsum([s.seconds for s in self.segments])])

    def scrape_times(self) -> np.ndarray:
        """When /metrics is read, s from the start (sorted): boundaries and the grid."""
        grid = np.arange(0.0, self.seconds, self.scrape_every_s) if self.scrape_every_s else []
        return np.unique(np.round(np.concatenate([self.boundaries(), grid]), 6))

    def times(self) -> tuple[np.ndarray, np.ndarray]:
        """(n,) scheduled send times from the start and (n,) segment of every request."""
        offsets, segments, t = [], [], 0.0
        for j, s in enumerate(self.segments):
            count = round(s.rate * s.seconds)
            offsets.append(t + np.arange(count) / s.rate)
            segments.append(np.full(count, j))
            t += s.seconds
        return np.concatenate(offsets), np.concatenate(segments)


@dataclass
class ScheduleResult:
    """Per request (n,) arrays, by request number."""

    schedule: Schedule
    offset: np.ndarray  # scheduled send time from the start, s
    segment: np.ndarray  # its segment
    latency: np.ndarray  # scheduled send -> answer, s; nan: none
    status: np.ndarray  # HTTP status; 0: transport error; -1: no answer within the grace
    reason: np.ndarray  # 0: the model's list, 1 + REASONS index, -1: no 200 answer
    marked: np.ndarray  # bool: "degraded":true in the body
    n_items: np.ndarray  # items in the answer
    # the answer's timings.total_ms: from the rerank handler's entry to the response body
    # (not the time in the socket / uvicorn queue before it, nor the response's write)
    handler_ms: np.ndarray
    late: np.ndarray  # bool: sent > 1 ms after its time (the sender fell behind)
    waited: np.ndarray  # bool: every connection was busy, it queued in the sender
    n_bodies: int
    bodies: dict[int, bytes] = field(default_factory=dict)  # keep_bodies
    # (when it was answered, s from the start; /metrics), one per scrape time, by time
    metrics: list[tuple[float, str]] = field(default_factory=list)
    peak_connections: int = 0
    reconnects: int = 0  # sends retried because the server had closed an idle connection
    client_cpu_s: float = 0.0
    error_sample: str = ""

    @property
    def body(self) -> np.ndarray:
        """(n,) the body (world request) of every request."""
        return np.arange(len(self.offset)) % self.n_bodies

    @property
    def answered(self) -> np.ndarray:
        return self.status == 200

    @property
    def done(self) -> np.ndarray:
        """(n,) when each request was answered (any status), s from the start; nan: none."""
        return self.offset + self.latency

    def answers_per_s(self, start: float, end: float) -> float:
        """200 answers COMPLETED in [start, end) s from the start, per second, whenever
        their requests were scheduled: the throughput served in that window (counting the
        requests scheduled in it instead gives offered rate x answered share)."""
        with np.errstate(invalid="ignore"):
            served = self.answered & (self.done >= start) & (self.done < end)
        return float(served.sum()) / (end - start)

    def scraped(self, at: float) -> str:
        """/metrics as read nearest to `at` s from the start (by when it was answered: a
        saturated server answers late)."""
        read = [(abs(t - at), text) for t, text in self.metrics if text]
        return min(read, key=lambda x: x[0])[1] if read else ""

    def window(self, segment: int) -> tuple[str, str]:
        """/metrics at the start and the end of a segment."""
        b = self.schedule.boundaries()
        return self.scraped(b[segment]), self.scraped(b[segment + 1])


async def run_schedule_async(job: Schedule, bodies: list[bytes]) -> ScheduleResult:
    """In the load process: the whole schedule, then every answer (or the grace) awaited."""
    offsets, segment = job.times()
    n = len(offsets)
    payloads = [http_request(job.port, b) for b in bodies]
    pool = RawPool(job.port, job.connections)

    async def send(payload: bytes) -> tuple[int, bytes]:
        """pool.send, again on another connection when the one it took had been closed by
        the server while idle (uvicorn closes keep-alive connections idle for 5 s; an HTTP
        client reconnects then). Not retried: refused connections, partial answers."""
        for _ in range(pool.most):  # each failure drops a connection: bounded
            try:
                return await pool.send(payload)
            except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
                if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                    raise
                res.reconnects += 1
        return await pool.send(payload)

    res = ScheduleResult(
        schedule=job, offset=offsets, segment=segment, latency=np.full(n, np.nan),
        status=np.full(n, -1, np.int32), reason=np.full(n, -1, np.int8),
        marked=np.zeros(n, bool), n_items=np.zeros(n, np.int16),
        handler_ms=np.full(n, np.nan, np.float32), late=np.zeros(n, bool),
        waited=np.zeros(n, bool), n_bodies=len(bodies),
    )  # fmt: skip
    code = {name.encode(): 1 + i for i, name in enumerate(REASONS)}
    t0 = now() + 0.05
    end = t0 + job.seconds

    async def one(i: int) -> None:
        res.waited[i] = pool.idle.empty() and pool.opened >= pool.most
        try:
            status, body = await send(payloads[i % len(payloads)])
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            res.status[i] = 0
            res.error_sample = res.error_sample or f"{type(e).__name__}: {e}"
            return
        finally:
            res.peak_connections = max(res.peak_connections, pool.opened)
        res.latency[i] = now() - (t0 + offsets[i])
        res.status[i] = status
        if status != 200:
            res.error_sample = res.error_sample or f"HTTP {status}: {body[:200]!r}"
        else:
            found = _REASON.search(body)
            res.reason[i] = code.get(found.group(1), len(REASONS) + 1) if found else 0
            res.marked[i] = b'"degraded":true' in body
            res.n_items[i] = body.count(b'"item_id":')
            if total := _TOTAL_MS.search(body):
                res.handler_ms[i] = float(total.group(1))
        if job.keep_bodies:
            res.bodies[i] = body

    async def scrape(at: float) -> None:  # each on its own: a late one delays no other
        await asyncio.sleep(max(0.0, at - now()))
        try:  # bounded: a server that stopped answering must not hang the sender
            text = await asyncio.wait_for(scrape_metrics(job.port), 10.0)
        except (OSError, asyncio.TimeoutError) as e:
            text = ""
            res.error_sample = res.error_sample or f"/metrics: {type(e).__name__}: {e}"
        res.metrics.append((now() - t0, text))

    cpu0 = time.process_time()
    times = job.scrape_times() if job.scrape else []
    scrapes = [asyncio.ensure_future(scrape(t0 + at)) for at in times]
    pending: set[asyncio.Future[None]] = set()
    for i in range(n):
        # to the microsecond (uvloop's timers work in whole ms: slop charged to the server)
        await wait_until(t0 + offsets[i])
        res.late[i] = now() - (t0 + offsets[i]) > 1e-3  # after the wait: oversleeping too
        task = asyncio.ensure_future(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)  # the finished ones are not kept
    if pending:
        _, left = await asyncio.wait(set(pending), timeout=max(0.0, end + job.grace_s - now()))
        for t in left:
            t.cancel()
        if left:
            await asyncio.wait(left)
    if scrapes:
        await asyncio.wait(scrapes)
        res.metrics.sort()
    res.client_cpu_s = time.process_time() - cpu0
    await pool.close()
    return res


@dataclass(frozen=True)
class Warm:
    """The pass before a target is measured: closed loop, `concurrency` connections, until
    EVERY body was answered once with the model's list (its items then are in the L1: an
    answer degraded before the engine ran may not have computed them, so that body is sent
    again), or `cap_s` passed."""

    port: int
    concurrency: int
    cap_s: float


@dataclass
class WarmResult:
    bodies: int  # distinct bodies
    warmed: int  # of them answered with the model's list
    sends: int  # requests sent (the others: degraded or failed answers, sent again)
    seconds: float

    @property
    def cut(self) -> bool:
        """The cap ended the pass before every body was warmed."""
        return self.warmed < self.bodies


async def run_warm_async(job: Warm, bodies: list[bytes]) -> WarmResult:
    """In the load process: the warm pass (Warm)."""
    payloads = [http_request(job.port, b) for b in bodies]
    pool = RawPool(job.port, job.concurrency)
    todo = deque(range(len(bodies)))
    res = WarmResult(len(bodies), 0, 0, 0.0)
    start = now()
    end = start + job.cap_s

    async def worker() -> None:
        while todo and now() < end:
            i = todo.popleft()
            res.sends += 1
            try:
                status, body = await pool.send(payloads[i])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                todo.append(i)
                await asyncio.sleep(0.01)  # no hot loop against a dead server
                continue
            if status == 200 and not _REASON.search(body):  # the model's list
                res.warmed += 1
            else:
                todo.append(i)

    workers = [asyncio.ensure_future(worker()) for _ in range(job.concurrency)]
    _, left = await asyncio.wait(workers, timeout=job.cap_s + 10.0)  # a hung request too
    for t in left:
        t.cancel()
    if left:
        await asyncio.wait(left)
    res.seconds = now() - start
    await pool.close()
    return res


async def run_job_async(job: Phase | Schedule | Warm, bodies: list[bytes]) -> Any:
    """The load process's runner (bench_http's, serving Schedules and Warms as well as
    Phases)."""
    if isinstance(job, Schedule):
        return await run_schedule_async(job, bodies)
    if isinstance(job, Warm):
        return await run_warm_async(job, bodies)
    return await run_phase_async(job, bodies)


def run_warm(load: LoadProcess, job: Warm) -> WarmResult:
    """Send `job` to the load process and wait for its result."""
    result: WarmResult = load.request(job, job.cap_s + 60)
    return result


def run_schedule(load: LoadProcess, job: Schedule, tick: Callable[[], None] | None = None,
                 ) -> ScheduleResult:  # fmt: skip
    """Send `job` to the load process and wait for its result, calling `tick` every second."""
    result: ScheduleResult = load.request(job, job.seconds + job.grace_s + 60, tick)
    return result


def pct_ms(latency: np.ndarray, q: float) -> float:
    """Percentile of latencies in seconds, ms."""
    return percentile(latency, q) * 1e3


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else np.nan
