"""HTTP throughput and latency: the service against two floors, in one run.

    python tests/bench/bench_http.py [--bundle DIR] [--duration S] [--concurrency N]
                                     [--string-ids]
    pytest -m bench -s tests/bench/test_bench_http.py      (a short run, checks correctness)

Targets, each its own uvicorn process on loopback, ONE worker, started and stopped here:
  service  python -m service (L1 cache + item tower, no Redis), the bundle of --bundle
           (default: artifacts/ if artifacts/latest exists, else a tiny random bundle built
           into a temporary directory the way the e2e tests build theirs)
  plain    tests/bench/plain_app.py: the least a Python HTTP service does per request, the
           reference of the goals: stock FastAPI, json.loads, the first k candidates back
           (no model, no validation, no metrics)
  echo     tests/bench/echo_app.py: the service's own parse of the raw body (the same
           RequestReader.read_json, same bundle schema and limits) and a response of the
           same shape, nothing else (uvicorn + FastAPI as the service sets it up + the
           parse + orjson)

Load comes from a second process (spawned, loopback only), an asyncio client over HTTP/1.1
keep-alive connections: by default raw asyncio streams on uvloop with pre-built request
bytes (httpx costs the client several times more CPU per request, enough to cap the echo;
`--client httpx` uses it, and the client-check row measures it against the echo). The
requests: m = 30 candidates, k = 10, user and item features named by the bundle's
FeatureSchema, 64 distinct bodies sent in turn (their items are in L1 after the warm-up);
with --string-ids every id in them is a string ("sku-<n>", "u-<n>").

Phase 1, closed loop: C connections each send the next request when the last one is
answered, warm-up discarded; targets alternate in rounds so drifting machine load hits all.
Phase 2, open loop: a constant rate of 50% of the service's phase-1 maximum, each request
sent at its scheduled time on a free connection (opened as needed); latency is from the
scheduled time (no coordinated omission). The floors get the same rate as the reference.
The service's /metrics is scraped by the load process at the start and end of its phase-2
window: the server-side p50/p99 of rerank_request_duration_seconds over exactly that window
are estimated from the histogram's buckets (as Prometheus' histogram_quantile does).
Phase 3, latency-bound throughput (MLPerf's server scenario): Poisson arrivals; the
highest rate whose p99 time to a model answer stays <= 10 ms, found by bisection, for the
service and the plain floor.

On a machine with >= 2 cores the servers are pinned to one core and the load generator to
another (taskset / sched_setaffinity), so each target gets one core: "one process per core".
CPU used by the server and the client in each measured window is read from /proc.

Goals: service throughput >= 50% of the plain floor's; service latency-bound throughput
>= 40% of the plain floor's; service p99 <= 5 ms at half its maximum throughput. Printed
as ratios, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from loadtest.scrapes import window_quantile  # noqa: E402
from loadtest.traffic import FeatureSpec, Traffic, TrafficConfig  # noqa: E402
from tests.support.redis_server import free_port  # noqa: E402

# Keep this module's imports light: the spawned load process imports it too (no torch,
# no service app there).

HOST = "127.0.0.1"
PATH = "/v1/rerank"
N_BODIES = 64
GRACE_S = 5.0  # after a phase's end, requests still unanswered this long are errors
# every time stamp: uvloop's loop.time() only moves in whole milliseconds
now = time.perf_counter


# ---------------------------------------------------------------- requests


def build_bodies(manifest: dict[str, Any], m: int, k: int, n: int = N_BODIES, seed: int = 0
                 ) -> list[bytes]:  # fmt: skip
    """n distinct rerank bodies for the served bundle (its manifest's feature schema), made
    by the load test's traffic generator with one m and one k, every body valid and on the
    server's default budget; item ids drawn uniformly from a catalogue of 64 m ids, so the
    warm-up leaves them all in the cache."""
    config = TrafficConfig(
        catalogue=64 * m, zipf=0.0, new_item_share=0.0, invalid_share=0.0,
        m_mix=((m, 1.0),), k_mix=((k, 1.0),), budget_mix=((None, 1.0),), seed=seed,
    )  # fmt: skip
    traffic = Traffic(FeatureSpec.from_manifest(manifest), config)
    return [traffic.next().body for _ in range(n)]


def string_bodies(bodies: list[bytes]) -> list[bytes]:
    """The same bodies with every id a string: item n -> "sku-<n>", user n -> "u-<n>"."""
    out = []
    for raw in bodies:
        body = json.loads(raw)
        body["user"]["id"] = f"u-{body['user']['id']}"
        for c in body["candidates"]:
            c["item_id"] = f"sku-{c['item_id']}"
        out.append(json.dumps(body, separators=(",", ":")).encode())
    return out


def http_request(port: int, body: bytes) -> bytes:
    """The whole HTTP/1.1 request (keep-alive is HTTP/1.1's default)."""
    head = (f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


# ---------------------------------------------------------------- the load process


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


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def _event_loop() -> asyncio.AbstractEventLoop:
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
    loop = _event_loop()
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


# ---------------------------------------------------------------- the servers


class ServerProcess:
    """A uvicorn target in its own process (stdout/stderr to a log file)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path,
                 cpus: set[int] | None) -> None:  # fmt: skip
        self.name, self.port = name, free_port()
        self.log_path = logdir / f"{name}.log"
        argv = [*argv, "--host", HOST, "--port", str(self.port)]
        if cpus:  # before the interpreter starts: every thread it makes inherits the mask
            argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> None:
        """/readyz 200 (the service: bundle loaded and every bucket warmed)."""
        import httpx

        from tests.support.server import wait_ready

        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:  # first the port, then the e2e tests' readiness poll
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                       f"{self.log_tail()}")  # fmt: skip
                try:
                    client.get("/readyz")
                    break
                except httpx.TransportError as e:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name} did not listen:\n{self.log_tail()}") from e
                    time.sleep(0.1)
            wait_ready(client, max(1.0, deadline - time.monotonic()))

    def log_tail(self, n: int = 20) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _server_env() -> dict[str, str]:
    """The environment minus RERANK_* (no Redis, default settings) plus quiet logs and no
    admin listener (services run side by side)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RERANK_") and k != "PROMETHEUS_MULTIPROC_DIR"}  # fmt: skip
    env["RERANK_LOG_LEVEL"] = "warning"
    env["RERANK_ADMIN_PORT"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_service(bundle: Path, logdir: Path, cpus: set[int] | None,
                  env: dict[str, str] | None = None, name: str = "service",
                  ) -> ServerProcess:  # fmt: skip
    """`env`: RERANK_* settings over the defaults; `name`: of the log file, for several."""
    argv = [sys.executable, "-m", "service", "--bundle", str(bundle), "--workers", "1"]
    return ServerProcess(name, argv, {**_server_env(), **(env or {})}, logdir, cpus)


def start_echo(logdir: Path, cpus: set[int] | None, bundle: Path) -> ServerProcess:
    """The echo parses with the service's own reader, so it needs the bundle's schema."""
    argv = [sys.executable, "-m", "uvicorn", "tests.bench.echo_app:app", "--workers", "1",
            "--no-access-log", "--log-level", "warning"]  # fmt: skip
    env = {**_server_env(), "GREF_ECHO_BUNDLE": str(bundle)}
    return ServerProcess("echo", argv, env, logdir, cpus)


def start_plain(logdir: Path, cpus: set[int] | None) -> ServerProcess:
    """The plain floor: stock FastAPI, json.loads, the first k candidates back."""
    argv = [sys.executable, "-m", "uvicorn", "tests.bench.plain_app:app", "--workers", "1",
            "--no-access-log", "--log-level", "warning"]  # fmt: skip
    return ServerProcess("plain", argv, _server_env(), logdir, cpus)


# ---------------------------------------------------------------- bundle, metrics


def resolve_bundle(bundle: Path | None, workdir: Path) -> tuple[Path, str]:
    """(bundle dir, how it was found): --bundle, artifacts/ with a `latest`, or a tiny
    random bundle built as tests/unit/test_export.py's tiny_bundle fixture builds it."""
    from service.settings import resolve_bundle_dir

    if bundle is not None:
        return resolve_bundle_dir(bundle), "--bundle"
    if (ROOT / "artifacts" / "latest").is_file():
        return resolve_bundle_dir(ROOT / "artifacts"), "artifacts/latest"
    import torch

    from export.build import build_bundle
    from export.config import ExportConfig
    from tests.support.bundle import make_checkpoint, make_items

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_checkpoint(workdir / "ckpt")
        make_items(workdir / "items.parquet")
        ec = ExportConfig(fp16=True, label="bench", items_path=str(workdir / "items.parquet"))
        path = build_bundle(workdir / "ckpt", workdir / "artifacts", ec)
    finally:
        torch.set_num_threads(threads)
    return path, "tiny random test bundle (no artifacts/latest)"


_BATCH = re.compile(r"^rerank_batch_size_(sum|count) (\S+)$", re.M)


def batch_totals(before: str, after: str) -> tuple[float, float]:
    """(requests, engine calls) between two scrapes, from rerank_batch_size's sum and count."""

    def totals(text: str) -> dict[str, float]:
        return {name: float(value) for name, value in _BATCH.findall(text)}

    b, a = totals(before), totals(after)
    return a.get("sum", 0.0) - b.get("sum", 0.0), a.get("count", 0.0) - b.get("count", 0.0)


# ---------------------------------------------------------------- the run

TARGETS = ("plain", "echo", "service")
BOUND_TARGETS = ("plain", "service")  # the latency-bound search (phase 3)


@dataclass
class Bound:
    """Phase 3 for one target: every trial (rate, served p99 in ms, passed), and the
    highest rate that passed (0 when none did)."""

    target: str
    trials: list[tuple[float, float, bool]] = field(default_factory=list)
    best: PhaseResult | None = None

    @property
    def rate(self) -> float:
        return self.best.phase.rate if self.best is not None else 0.0


@dataclass
class Report:
    bundle: str
    closed: dict[str, PhaseResult] = field(default_factory=dict)
    client_check: PhaseResult | None = None
    open: dict[str, PhaseResult] = field(default_factory=dict)
    bound: dict[str, Bound] = field(default_factory=dict)
    bound_p99_ms: float = 10.0
    server_p99_s: float = np.nan
    server_p50_s: float = np.nan
    setup: str = ""

    def results(self) -> list[PhaseResult]:
        rows = [*self.closed.values(), *self.open.values()]
        return rows + ([self.client_check] if self.client_check else [])


def _merge(parts: list[PhaseResult]) -> PhaseResult:
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


def _placement(pin: bool) -> tuple[set[int] | None, set[int] | None, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or shutil.which("taskset") is None:
        return None, None, f"not pinned: servers and load generator share cpus {cpus}"
    server, client = {cpus[0]}, {cpus[1]}
    return server, client, (f"servers pinned to cpu {cpus[0]}, load generator to cpu "
                            f"{cpus[1]} (one core each)")  # fmt: skip


def latency_bound(trial: Callable[[float, int], PhaseResult], ceiling: float, trials: int,
                  p99_ms: float, target: str) -> Bound:  # fmt: skip
    """The highest Poisson arrival rate whose served p99 stays <= p99_ms (MLPerf's server
    scenario), by bisection over (0, ceiling]: `trial(rate, seed)` runs one open-loop
    window; each trial halves the interval, so the answer is within ceiling / 2^trials
    below the true bound (on this run's noise)."""
    bound, lo, hi = Bound(target), 0.0, ceiling
    for i in range(trials):
        rate = (lo + hi) / 2
        r = trial(rate, i)
        p99 = r.served_pct_ms(99)
        passed = bool(p99 <= p99_ms)
        bound.trials.append((rate, p99, passed))
        if passed:
            lo, bound.best = rate, r
        else:
            hi = rate
    return bound


def run(
    bundle: Path | None = None,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    concurrency: int = 32,
    rounds: int = 2,
    load_fraction: float = 0.5,
    client: str = "raw",
    client_check: bool = True,
    pin: bool = True,
    m: int = 30,
    k: int = 10,
    service_env: dict[str, str] | None = None,
    bound_trials: int = 6,
    bound_duration_s: float = 3.0,
    bound_p99_ms: float = 10.0,
    string_ids: bool = False,
) -> tuple[str, Report]:
    """The three phases against the targets; (the printed table, the numbers).
    service_env: RERANK_* settings of the service (default: its defaults); string_ids:
    every id of the bodies a string (string_bodies)."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gref-bench-")))
        path, how = resolve_bundle(bundle, workdir)
        manifest = json.loads((path / "manifest.json").read_text())
        bodies = build_bodies(manifest, m, k)
        bodies = string_bodies(bodies) if string_ids else bodies
        server_cpus, client_cpus, placement = _placement(pin)
        report = Report(bundle=f"{manifest['version']} ({how}: {path})",
                        bound_p99_ms=bound_p99_ms)  # fmt: skip
        size = np.mean([len(b) for b in bodies]) / 1024
        report.setup = (f"m = {m}, k = {k}, {len(bodies)} distinct bodies of ~{size:.1f} KiB "
                        f"({'string' if string_ids else 'integer'} ids); "
                        f"client: {client} on {client_loop_name()}; nproc {os.cpu_count()}; "
                        f"{placement}; service settings: {service_env or 'defaults'}")  # fmt: skip

        servers: dict[str, ServerProcess] = {}

        @stack.callback
        def _stop_servers() -> None:  # every server started, whatever happens
            for s in servers.values():
                s.stop()

        servers["plain"] = start_plain(workdir, server_cpus)
        servers["echo"] = start_echo(workdir, server_cpus, path)
        servers["service"] = start_service(path, workdir, server_cpus, service_env)
        for s in servers.values():
            s.wait_ready()
        load = LoadProcess(bodies, client_cpus)
        stack.callback(load.stop)

        def phase(target: str, mode: str, seconds: float, warm: float, **kw: Any) -> Phase:
            for other in servers.values():
                if other.proc.poll() is not None:
                    raise RuntimeError(f"{other.name} exited ({other.proc.returncode}):\n"
                                       f"{other.log_tail()}")  # fmt: skip
            s = servers[target]
            kw.setdefault("scrape", target == "service")  # its histograms over the window
            return Phase(target, s.port, s.proc.pid, mode, seconds, warm, concurrency, **kw)

        # phase 1: closed loop, targets alternating in rounds
        parts: dict[str, list[PhaseResult]] = {t: [] for t in TARGETS}
        block = duration_s / rounds
        for r in range(rounds):
            for target in parts:
                warm = warmup_s if r == 0 else min(warmup_s, 0.5)
                parts[target].append(load.run(phase(target, "closed", block, warm, client=client)))
        report.closed = {t: _merge(p) for t, p in parts.items()}
        if client_check:
            other = "httpx" if client == "raw" else "raw"
            report.client_check = load.run(phase("echo", "closed", block, min(warmup_s, 1.0),
                                                 client=other))  # fmt: skip

        # phase 2: open loop at a fraction of the service's maximum, every target
        rate = max(1.0, load_fraction * report.closed["service"].throughput)
        for target in TARGETS:
            r = load.run(phase(target, "open", duration_s, 1.0, rate=rate, client=client))
            report.open[target] = r
            if target == "service":
                report.server_p99_s = window_quantile(0.99, *r.metrics)
                report.server_p50_s = window_quantile(0.50, *r.metrics)

        # phase 3: the latency-bound throughput, Poisson arrivals, bisection per target
        for target in BOUND_TARGETS:

            def trial(rate: float, seed: int, target: str = target) -> PhaseResult:
                ph = phase(target, "open", bound_duration_s, 0.5, rate=rate, client=client,
                           poisson=True, seed=seed, scrape=False)  # fmt: skip
                return load.run(ph)

            ceiling = 1.1 * report.closed[target].throughput
            report.bound[target] = latency_bound(trial, ceiling, bound_trials, bound_p99_ms,
                                                 target)  # fmt: skip
        phase("echo", "closed", 0, 0)  # every server still up at the end
        return table(report, duration_s, warmup_s, concurrency, rounds, load_fraction,
                     bound_duration_s), report  # fmt: skip
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


def _us(cpu_s: float, r: PhaseResult) -> float:
    return cpu_s / max(1, len(r.latencies)) * 1e6


def _server(r: PhaseResult) -> str:
    """server CPU | server us/req | batch: its share of its core and its cost per request."""
    batch = f"{r.mean_batch:5.2f}" if r.batches[1] else "-"
    return f"{r.server_cpu_s / r.window_s:4.0%} | {_us(r.server_cpu_s, r):6.0f} | {batch:>5}"


def _ratio(a: float, b: float) -> float:
    return a / b if b else np.nan


def table(rep: Report, duration_s: float, warmup_s: float, concurrency: int, rounds: int,
          load_fraction: float, bound_duration_s: float = 3.0) -> str:  # fmt: skip
    svc, echo, plain = rep.closed["service"], rep.closed["echo"], rep.closed["plain"]
    lines = [
        f"HTTP benchmark: bundle {rep.bundle}",
        f"  {rep.setup}",
        "",
        f"phase 1: closed loop, {concurrency} keep-alive connections, {warmup_s:g} s warm-up, "
        f"{duration_s:g} s per target in {rounds} alternating rounds; times in ms (client side)",
        "",
        "| target  | client | max answers/s |    p50 |    p99 | degraded | errors "
        "| server CPU | us/req | batch | client CPU | us/req |",
        "|:--------|:-------|--------------:|-------:|-------:|---------:|-------:"
        "|-----:|-------:|------:|-----:|-------:|",
    ]
    closed = [plain, echo, svc] + ([rep.client_check] if rep.client_check else [])
    for r in closed:
        label = r.phase.target + (" *" if r is rep.client_check else "")
        lines.append(
            f"| {label:<7} | {r.phase.client:<6} | {r.throughput:13.0f} | {r.pct_ms(50):6.2f} "
            f"| {r.pct_ms(99):6.2f} | {r.degraded:8d} | {r.errors:6d} | {_server(r)} "
            f"| {r.client_cpu_s / r.window_s:4.0%} | {_us(r.client_cpu_s, r):6.0f} |"
        )
    rate = rep.open["service"].phase.rate
    lines += [
        "",
        f"phase 2: open loop at {rate:.0f} req/s ({load_fraction:.0%} of the service's maximum) "
        f"for {duration_s:g} s after 1 s unrecorded; latency from the scheduled send time, ms",
        "",
        "| target  | answers/s |    p50 |    p95 |    p99 | server p50 / p99 (histogram est.) "
        "| degraded | errors | late sends | server CPU | us/req | batch |",
        "|:--------|----------:|-------:|-------:|-------:|----------------------------------:"
        "|---------:|-------:|-----------:|-----:|-------:|------:|",
    ]
    for name in TARGETS:
        r = rep.open[name]
        server = (f"{rep.server_p50_s * 1e3:.2f} / {rep.server_p99_s * 1e3:.2f}"
                  if name == "service" else "-")  # fmt: skip
        lines.append(
            f"| {name:<7} | {r.throughput:9.0f} | {r.pct_ms(50):6.2f} | {r.pct_ms(95):6.2f} "
            f"| {r.pct_ms(99):6.2f} | {server:>33} | {r.degraded:8d} | {r.errors:6d} "
            f"| {r.late_starts:10d} | {_server(r)} |"
        )
    lines += [
        "",
        f"phase 3: latency-bound throughput: Poisson arrivals, {bound_duration_s:g} s per trial "
        f"after 0.5 s unrecorded, the rate bisected over (0, 1.1x the closed-loop maximum]; "
        f"a trial passes when the p99 of the time to a model answer (degraded, error or none: "
        f"never) is <= {rep.bound_p99_ms:g} ms",
        "",
        "| target  | latency-bound req/s | trials: rate req/s -> served p99 ms |",
        "|:--------|--------------------:|:------------------------------------|",
    ]
    for name, b in rep.bound.items():
        trials = ", ".join(f"{r:.0f} -> {p:.2f}{'' if ok else ' x'}" for r, p, ok in b.trials)
        lines.append(f"| {name:<7} | {b.rate:19.0f} | {trials} |")
    ratio = _ratio(svc.throughput, plain.throughput)
    p99 = rep.open["service"].pct_ms(99)
    bound = _ratio(rep.bound["service"].rate, rep.bound["plain"].rate) if rep.bound else np.nan
    lines += [
        "",
        "answers/s: model answers (200, not degraded) per second; degraded: answers in "
        "upstream order (budget spent or shed), not counted as throughput; p50/p99 over every "
        "200 answer; open loop: the requests scheduled in the window, however late answered",
        "server p50 / p99: estimated from rerank_request_duration_seconds' buckets (x1.5 "
        "apart, linear inside one: within about a quarter of the true value), handler time "
        "(not uvicorn or socket queueing)",
        "server CPU: its share of its one core in the window; us/req: CPU per answer "
        "(server, then client); batch: requests per engine call (the service's micro-batches)",
        "plain: stock FastAPI + json.loads, the first k back (no model, no checks); echo: the "
        "service's framework setup and request reader, the first k back (no model)",
        "",
        "goals:",
        f"  service / plain throughput: {ratio:.2f} (goal >= 0.50): "
        f"{'met' if ratio >= 0.5 else 'MISSED'}; server CPU per answer: service "
        f"{_us(svc.server_cpu_s, svc):.0f} us, plain {_us(plain.server_cpu_s, plain):.0f} us, "
        f"echo {_us(echo.server_cpu_s, echo):.0f} us; service / echo throughput "
        f"{_ratio(svc.throughput, echo.throughput):.2f}",
        f"  latency-bound throughput (p99 <= {rep.bound_p99_ms:g} ms), service / plain: "
        f"{bound:.2f} (goal >= 0.40): {'met' if bound >= 0.4 else 'MISSED'}",
        f"  service p99 at {load_fraction:.0%} of its maximum: {p99:.2f} ms, "
        f"{p99 / rep.open['echo'].pct_ms(99):.1f}x the echo's, "
        f"{p99 / rep.open['plain'].pct_ms(99):.1f}x the plain floor's at the same rate "
        f"(goal <= 5 ms): {'met' if p99 <= 5 else 'MISSED'}",
    ]
    plain_us = _us(plain.client_cpu_s, plain)
    if plain_us > 0:
        ceiling = 1e6 / plain_us
        bound_by = ""
        if ceiling < 1.5 * plain.throughput:
            bound_by = " -- the CLIENT may be the bottleneck"
        lines.append(
            f"  client ceiling ({plain.phase.client}): ~{ceiling:.0f} req/s on one core "
            f"(its CPU per request against the plain floor) = "
            f"{ceiling / plain.throughput:.1f}x the plain floor's throughput{bound_by}"
        )
    if rep.client_check is not None:
        cc = rep.client_check
        lines.append(
            f"  * client check: the echo with {cc.phase.client}: {cc.throughput:.0f} req/s vs "
            f"{echo.throughput:.0f} with {echo.phase.client} "
            f"({cc.throughput / echo.throughput:.2f}x)"
        )
    samples = {f"{r.phase.target}/{r.phase.mode}": r.error_sample for r in rep.results()
               if r.error_sample}  # fmt: skip
    for where, sample in samples.items():
        lines.append(f"  first error {where}: {sample}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path,
                   help="bundle or artifacts dir (default: artifacts/ if artifacts/latest "
                   "exists, else a tiny random bundle)")  # fmt: skip
    p.add_argument("--duration", type=float, default=10.0, help="seconds per target and phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds discarded first")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop connections")
    p.add_argument("--rounds", type=int, default=2, help="alternating closed-loop rounds")
    p.add_argument("--load", type=float, default=0.5, help="open-loop rate / service max")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw")
    p.add_argument("--no-client-check", action="store_true",
                   help="skip the echo run with the other client")  # fmt: skip
    p.add_argument("--no-pin", action="store_true", help="do not pin servers and client")
    p.add_argument("--set", action="append", default=[], metavar="RERANK_X=V",
                   help="a service setting (repeatable): RERANK_DECODE_POLICY=fixed")  # fmt: skip
    p.add_argument("--bound-trials", type=int, default=6,
                   help="latency-bound search: bisection trials per target")  # fmt: skip
    p.add_argument("--bound-duration", type=float, default=3.0,
                   help="latency-bound search: seconds per trial")  # fmt: skip
    p.add_argument("--bound-p99", type=float, default=10.0,
                   help="latency-bound search: the p99 bound, ms")  # fmt: skip
    p.add_argument("--string-ids", action="store_true",
                   help='every id a string: item n "sku-<n>", user n "u-<n>"')  # fmt: skip
    args = p.parse_args(argv)
    text, _ = run(args.bundle, args.duration, args.warmup, args.concurrency, args.rounds,
                  args.load, args.client, not args.no_client_check, not args.no_pin,
                  service_env=dict(kv.split("=", 1) for kv in args.set),
                  bound_trials=args.bound_trials, bound_duration_s=args.bound_duration,
                  bound_p99_ms=args.bound_p99, string_ids=args.string_ids)  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    # run by its package name: what the spawned load process pickles back must name
    # tests.bench.bench_http, not a __main__ the parent cannot import
    from tests.bench.bench_http import main as _main

    sys.exit(_main())
