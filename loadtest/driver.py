"""The HTTP load generator of the benchmarks (tests/bench): closed- and open-loop phases
against one server over keep-alive connections, in a process of its own.

A `LoadProcess` is a spawned interpreter (pinned to the load's cores; no torch, no server
code in it) that runs the jobs its parent sends: a `Phase` here (closed loop: C connections
each sending the next request when the last is answered; open loop: each request at its
scheduled time, constant or Poisson gaps, latency from that time so there is no coordinated
omission), the open-loop schedules and warm passes of loadtest/schedules.py with their
runner. The request bytes are built once (`http_request`) and sent on raw asyncio streams
(`RawPool`; httpx as a check of the client's own cost). CPU of the client and the server
is read over exactly the measured window, and /metrics at its ends when asked.

Keep this module's imports light: the spawned load process imports it.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.scrapes import delta, parse_metrics, total
from loadtest.servers import HOST, process_cpu_s

PATH = "/v1/rerank"
GRACE_S = 5.0  # after a phase's end, requests still unanswered this long are errors
# every time stamp: uvloop's loop.time() only moves in whole milliseconds
now = time.perf_counter


def http_request(port: int, body: bytes) -> bytes:
    """The whole HTTP/1.1 request (keep-alive is HTTP/1.1's default)."""
    head = (f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


@dataclass(frozen=True)
class Phase:
    """One measured run against one target."""

    target: str
    port: int
    server_pid: int
    mode: str  # "closed" | "open"
    duration_s: float
    warmup_s: float
    concurrency: int  # closed: connections; open: most connections opened
    rate: float = 0.0  # open loop: requests per second
    client: str = "raw"  # "raw" | "httpx"
    max_requests: int = 2_000_000
    scrape: bool = False  # GET /metrics at the window's start and end
    poisson: bool = False  # open loop: exponential gaps (a Poisson process) of mean 1 / rate
    seed: int = 0  # of the Poisson gaps


@dataclass
class PhaseResult:
    phase: Phase
    latencies: np.ndarray  # (n,) seconds, the requests answered in the measured window
    window_s: float
    model_latencies: np.ndarray = field(default_factory=lambda: np.zeros(0))  # model answers
    ok: int = 0
    degraded: int = 0
    errors: int = 0
    error_sample: str = ""
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    late_starts: int = 0  # open loop: sent > 1 ms after their scheduled time
    metrics: tuple[str, str] = ("", "")  # /metrics at the window's start and end (scrape)
    batches: tuple[float, float] = (0.0, 0.0)  # service: (requests, engine calls) in window

    @property
    def mean_batch(self) -> float:
        """Requests per engine call (the service's micro-batches) in the window."""
        return self.batches[0] / self.batches[1] if self.batches[1] else np.nan

    @property
    def throughput(self) -> float:
        """Model answers (200, not degraded) per second: a degraded answer (upstream order
        after the budget ran out, or shed) costs the service almost nothing and is not
        throughput. The echo never degrades: all its answers count."""
        return self.ok / self.window_s

    @property
    def answered(self) -> float:
        """Every 200 answer per second, degraded ones included."""
        return len(self.latencies) / self.window_s

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if len(self.latencies) else np.nan

    def served_pct_ms(self, q: float) -> float:
        """The q-th percentile of the time to a MODEL answer over every request of the
        window: a degraded answer, an error or no answer counts as never served (inf)."""
        failed = len(self.latencies) - len(self.model_latencies) + self.errors
        every = np.concatenate([self.model_latencies, np.full(failed, np.inf)])
        if not len(every):
            return np.nan
        return float(np.percentile(every, q, method="higher")) * 1e3


class RawPool:
    """HTTP/1.1 keep-alive connections over asyncio streams, one request at a time each."""

    def __init__(self, port: int, most: int) -> None:
        self.port, self.most, self.opened = port, most, 0
        self.idle: asyncio.LifoQueue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.LifoQueue()
        )

    async def send(self, payload: bytes) -> tuple[int, bytes]:
        """One request. A reused connection the server closed while it sat idle (uvicorn's
        5 s keep-alive timeout) fails before any byte of an answer: that request is sent
        again on a NEW connection (the next idle one may be as stale), as HTTP clients do,
        rather than counted as an error."""
        reused = not self.idle.empty()
        try:
            return await self._send(payload)
        except asyncio.IncompleteReadError as e:
            if not reused or e.partial:
                raise
            return await self._send(payload, fresh=True)

    async def _send(self, payload: bytes, fresh: bool = False) -> tuple[int, bytes]:
        if fresh or (self.idle.empty() and self.opened < self.most):
            self.opened += 1
            try:
                conn = await asyncio.open_connection(HOST, self.port)
            except OSError:
                self.opened -= 1
                raise
        else:
            conn = await self.idle.get()
        reader, writer = conn
        try:
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            at = head.lower().find(b"\r\ncontent-length:")
            if at < 0:
                raise ConnectionError("response without Content-Length")
            end = head.index(b"\r\n", at + 2)
            body = await reader.readexactly(int(head[at + 17 : end]))
        except BaseException:
            self.opened -= 1  # a connection in an unknown state is dropped
            writer.close()
            raise
        self.idle.put_nowait(conn)
        return status, body

    async def close(self) -> None:
        while not self.idle.empty():
            _, writer = self.idle.get_nowait()
            writer.close()


class HttpxPool:
    """The same over httpx.AsyncClient (its own keep-alive pool)."""

    def __init__(self, port: int, most: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
        self.client = httpx.AsyncClient(base_url=f"http://{HOST}:{port}", limits=limits,
                                        timeout=None)  # fmt: skip
        self.headers = {"content-type": "application/json"}

    async def send(self, body: bytes) -> tuple[int, bytes]:
        r = await self.client.post(PATH, content=body, headers=self.headers)
        return r.status_code, r.content

    async def close(self) -> None:
        await self.client.aclose()


class Recorder:
    """Outcomes of the requests of the measured window: closed loop, those answered in it
    (throughput = answers in the window / its length); open loop (`by_schedule`), those
    scheduled in it, however late answered (no survivorship: the slowest at the window's
    end are kept, the warm-up's late answers are not)."""

    def __init__(self, start: float, end: float, by_schedule: bool = False) -> None:
        self.start, self.end, self.by_schedule = start, end, by_schedule
        self.latencies: list[float] = []
        self.model_latencies: list[float] = []
        self.ok = self.degraded = self.errors = 0
        self.error_sample = ""

    def answered(self, sent: float, done: float, status: int, body: bytes) -> None:
        if not self.start <= (sent if self.by_schedule else done) < self.end:
            return
        if status != 200:
            self.error(f"HTTP {status}: {body[:200]!r}")
            return
        self.latencies.append(done - sent)
        if b'"degraded":true' in body:
            self.degraded += 1
        else:
            self.ok += 1
            self.model_latencies.append(done - sent)

    def error(self, what: str, count: int = 1) -> None:
        self.errors += count
        self.error_sample = self.error_sample or what


async def scrape_metrics(port: int) -> str:
    """GET /metrics on a connection of its own."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close"
                     "\r\n\r\n".encode())  # fmt: skip
        response = await reader.read()  # to EOF
    finally:
        writer.close()
    return response.split(b"\r\n\r\n", 1)[-1].decode()


async def _window(rec: Recorder, ph: Phase, out: dict[str, Any]) -> None:
    """CPU of the client (this process) and of the server over exactly the window, and the
    server's /metrics at both ends when asked."""
    await asyncio.sleep(max(0.0, rec.start - now()))
    # CPU first: the scrape waits behind the requests in flight (its own CPU, a few ms of
    # the server's in 10 s, is counted; a window started late would not be)
    c0, s0 = time.process_time(), process_cpu_s(ph.server_pid)
    first = await scrape_metrics(ph.port) if ph.scrape else ""
    await asyncio.sleep(max(0.0, rec.end - now()))
    out["client"], out["server"] = time.process_time() - c0, process_cpu_s(ph.server_pid) - s0
    out["metrics"] = (first, await scrape_metrics(ph.port) if ph.scrape else "")


async def _closed(ph: Phase, send: Callable[[int], Awaitable[tuple[int, bytes]]],
                  rec: Recorder, n_bodies: int) -> None:  # fmt: skip
    counter = iter(range(ph.max_requests))

    async def worker(offset: int) -> None:
        for i in counter:
            sent = now()
            if sent >= rec.end:
                return
            try:
                status, body = await send((offset + i) % n_bodies)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                rec.error(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.01)  # no hot loop against a dead server
                continue
            rec.answered(sent, now(), status, body)

    await _bounded([worker(j) for j in range(ph.concurrency)], rec)


async def _open(ph: Phase, send: Callable[[int], Awaitable[tuple[int, bytes]]],
                rec: Recorder, n_bodies: int) -> int:  # fmt: skip
    """Requests at their scheduled times t0 + i / rate; returns how many started late."""
    t0 = now()
    n = min(ph.max_requests, int(ph.rate * (ph.warmup_s + ph.duration_s)))
    if ph.poisson:  # exponential gaps: the arrivals of a Poisson process (MLPerf's server)
        gaps = np.random.default_rng(ph.seed).exponential(1 / ph.rate, n)
        times = (t0 + np.concatenate([[0.0], np.cumsum(gaps[:-1])])).tolist()
    else:
        times = [t0 + i / ph.rate for i in range(n)]
    late = 0

    async def one(i: int, scheduled: float) -> None:
        try:
            status, body = await send(i % n_bodies)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            if rec.start <= scheduled < rec.end:
                rec.error(f"{type(e).__name__}: {e}")
            return
        rec.answered(scheduled, now(), status, body)

    tasks = []
    for i, scheduled in enumerate(times):
        await wait_until(scheduled)
        if now() - scheduled > 1e-3:  # after the wait: an overslept send counts too
            late += 1
        tasks.append(asyncio.ensure_future(one(i, scheduled)))
    await _bounded(tasks, rec)
    return late


SPIN_S = 0.0015  # the last stretch before a scheduled send is spun, not slept


async def wait_until(t: float) -> None:
    """Return at time t (perf_counter), within a few microseconds. uvloop's timers work in
    whole milliseconds: a sleep under 0.5 ms returns at once (the send would go early) and
    longer ones wake ~0.4-0.9 ms late (charged to the server, as latency runs from the
    scheduled time). So: sleep to SPIN_S before t, then yield to the loop until t (the load
    generator has a core of its own; the other requests' I/O still runs meanwhile)."""
    gap = t - now()
    if gap > SPIN_S:
        await asyncio.sleep(gap - SPIN_S)
    while now() < t:
        await asyncio.sleep(0)


async def _bounded(aws: list[Any], rec: Recorder) -> None:
    """Wait for every request, at most GRACE_S past the window; the rest are errors."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, rec.end + GRACE_S - now()))
    for t in pending:
        t.cancel()
    if pending:  # open loop: each a request (counted); closed loop: a connection's loop
        rec.error(f"{len(pending)} request loops still waiting {GRACE_S} s after the end",
                  len(pending) if rec.by_schedule else 1)  # fmt: skip
        await asyncio.wait(pending)


async def run_phase_async(ph: Phase, bodies: list[bytes]) -> PhaseResult:
    start = now() + ph.warmup_s
    rec = Recorder(start, start + ph.duration_s, by_schedule=ph.mode == "open")
    most = ph.concurrency if ph.mode == "closed" else max(ph.concurrency, 64)
    if ph.client == "httpx":
        pool: RawPool | HttpxPool = HttpxPool(ph.port, most)
        payloads = bodies
    else:
        pool = RawPool(ph.port, most)
        payloads = [http_request(ph.port, b) for b in bodies]

    def send(i: int) -> Awaitable[tuple[int, bytes]]:
        return pool.send(payloads[i])

    cpu: dict[str, Any] = {}
    window = asyncio.ensure_future(_window(rec, ph, cpu))
    late = 0
    try:
        if ph.mode == "closed":
            await _closed(ph, send, rec, len(payloads))
        else:
            late = await _open(ph, send, rec, len(payloads))
        await window
    finally:
        window.cancel()
        await pool.close()
    return PhaseResult(
        phase=ph, latencies=np.array(rec.latencies), window_s=ph.duration_s, ok=rec.ok,
        model_latencies=np.array(rec.model_latencies),
        degraded=rec.degraded, errors=rec.errors, error_sample=rec.error_sample,
        client_cpu_s=cpu.get("client", np.nan), server_cpu_s=cpu.get("server", np.nan),
        late_starts=late, metrics=cpu.get("metrics", ("", "")),
        batches=batch_totals(*cpu["metrics"]) if ph.scrape else (0.0, 0.0),
    )  # fmt: skip


def event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def client_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _load_main(conn: Any, bodies: list[bytes], cpus: set[int] | None,
               runner: Callable[[Any, list[bytes]], Awaitable[Any]] = run_phase_async,
               ) -> None:  # fmt: skip
    """The load process: run each job sent on `conn` with `runner` (a module-level
    coroutine function: a Phase -> PhaseResult here), answer its result; None ends."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it terminates us
    loop = event_loop()
    asyncio.set_event_loop(loop)
    try:
        while (job := conn.recv()) is not None:
            conn.send(loop.run_until_complete(runner(job, bodies)))
    finally:
        loop.close()


class LoadProcess:
    """The spawned load generator (a fresh interpreter: no torch, no server code in it)."""

    def __init__(self, bodies: list[bytes], cpus: set[int] | None,
                 runner: Callable[[Any, list[bytes]], Awaitable[Any]] = run_phase_async,
                 ) -> None:  # fmt: skip
        """`runner`: how the process runs a job (another module's, for other kinds)."""
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_load_main, args=(child, bodies, cpus, runner),
                                daemon=True, name="bench-load")  # fmt: skip
        self.proc.start()
        child.close()
        self.busy = False

    def run(self, ph: Phase) -> PhaseResult:
        result: PhaseResult = self.request(ph, ph.warmup_s + ph.duration_s + GRACE_S + 60)
        return result

    def request(self, job: Any, limit_s: float, tick: Callable[[], None] | None = None) -> Any:
        """Send any job its runner takes and wait for the result, at most `limit_s`,
        calling `tick` (if given) once a second meanwhile."""
        self.busy = True
        self.conn.send(job)
        deadline = time.monotonic() + limit_s
        while not self.conn.poll(1.0):
            if tick is not None:
                tick()
            if time.monotonic() > deadline:
                raise RuntimeError(f"load process gave no result in {limit_s:.0f} s")
        result = self.conn.recv()
        self.busy = False
        return result

    def stop(self) -> None:
        """Ends the process: at once when interrupted mid-phase, else after its loop."""
        if self.proc.is_alive() and not self.busy:
            with suppress(OSError):
                self.conn.send(None)
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def batch_totals(before: str, after: str) -> tuple[float, float]:
    """(requests, engine calls) between two scrapes, from rerank_batch_size's sum and count."""
    window = delta(parse_metrics(before), parse_metrics(after))
    return total(window, "rerank_batch_size_sum"), total(window, "rerank_batch_size_count")


def merge_results(parts: list[PhaseResult]) -> PhaseResult:
    """Rounds of one target -> one result."""
    first = parts[0]
    return PhaseResult(
        phase=first.phase,
        latencies=np.concatenate([p.latencies for p in parts]),
        window_s=sum(p.window_s for p in parts),
        model_latencies=np.concatenate([p.model_latencies for p in parts]),
        ok=sum(p.ok for p in parts),
        degraded=sum(p.degraded for p in parts),
        errors=sum(p.errors for p in parts),
        error_sample=next((p.error_sample for p in parts if p.error_sample), ""),
        client_cpu_s=sum(p.client_cpu_s for p in parts),
        server_cpu_s=sum(p.server_cpu_s for p in parts),
        late_starts=sum(p.late_starts for p in parts),
        batches=(sum(p.batches[0] for p in parts), sum(p.batches[1] for p in parts)),
    )
