"""Prometheus metrics of design §9 (base units; names are the contract with the dashboards).

One `Metrics` per app, on its own registry, so apps built in one process (tests) do not
collide. With PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported (as
`python -m service --workers N` does), values live in that directory's mmap files and
/metrics aggregates every worker with MultiProcessCollector; gauges say how they combine.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Literal, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# 0.1 ms .. ~3.3 s, x1.5 steps: 14 buckets below 10 ms (TEI-style geometric), plus an edge
# at the default budget (50 ms): a p99 against the budget line is not interpolated across it
DEFAULT_BUDGET_EDGE = 0.05
DURATION_BUCKETS = tuple(
    sorted({round(1e-4 * 1.5**i, 7) for i in range(26)} | {DEFAULT_BUDGET_EDGE})
)
POW2_BUCKETS = tuple(float(1 << i) for i in range(11))  # 1 .. 1024
CANDIDATE_BUCKETS = (8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
PASS_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)

# rejected: a client's mistake (422, 413, 408), not ready (503) or shed at the door
# (503 overloaded, also rerank_shed_requests_total); error: the service's own
# failure, a 500 (none is expected: every failure after validation degrades instead)
OUTCOMES = ("ok", "degraded", "rejected", "error")
STAGES = ("queue", "cache", "encode", "decode", "total_model")
REASONS = ("budget", "overload", "cache", "model")
TIERS = ("l1", "l2", "l3")
RESULTS = ("hit", "miss", "error")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# how a gauge's values from several workers combine (prometheus_client's multiprocess modes)
_Mode = Literal["all", "liveall", "livesum", "livemax", "livemin"]


class _Spec(NamedTuple):
    """One collector of `Metrics`: its attribute, kind, name, help and labels; `buckets`
    of a histogram, `mode` of a gauge in multiprocess mode (how workers combine)."""

    attr: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    mode: _Mode = "all"


# the table of design §9: every collector, in the order of the exposition
SPECS: tuple[_Spec, ...] = (
    _Spec("request_duration", Histogram, "rerank_request_duration_seconds",
          "Arrival to response of POST /v1/rerank.", ("outcome",), DURATION_BUCKETS),
    _Spec("stage_duration", Histogram, "rerank_stage_duration_seconds",
          "Time per stage of a rerank request.", ("stage",), DURATION_BUCKETS),
    _Spec("fallback", Counter, "rerank_fallback_total", "Degraded responses, by reason.",
          ("reason",)),
    _Spec("lookups", Counter, "rerank_embedding_lookups_total",
          "Embedding lookups per item, by cache tier and result.", ("tier", "result")),
    _Spec("writebacks", Counter, "rerank_embedding_writebacks_total",
          "Computed embeddings written back to Redis (ok), failed (error) or dropped "
          "because the write-back queue was full (dropped).", ("result",)),
    _Spec("decode_passes", Histogram, "rerank_decode_passes", "Decoder passes per request.",
          buckets=PASS_BUCKETS),
    _Spec("batch_size", Histogram, "rerank_batch_size", "Requests per engine call.",
          buckets=POW2_BUCKETS),
    _Spec("candidates", Histogram, "rerank_candidates", "Candidates per request.",
          buckets=CANDIDATE_BUCKETS),
    _Spec("dropped", Counter, "rerank_dropped_requests_total",
          "Requests dropped from the engine queue because their client went away."),
    _Spec("decode_level", Counter, "rerank_decode_level_total",
          "Requests decoded at each level of the decode policy (beamW, or nP: P items per "
          "pass).", ("level",)),
    _Spec("reloads", Counter, "rerank_bundle_reloads_total",
          "Bundle reloads (a new `latest` version), by result: ok (swapped in) or error "
          "(the old bundle kept serving).", ("result",)),
    _Spec("late", Counter, "rerank_late_responses_total",
          "Rerank answers (200, model or degraded) sent after the request's own deadline "
          "(its budget_ms, or the default): over 1% of answers means the p99 of latency "
          "relative to each request's budget is over 1."),
    _Spec("shed", Counter, "rerank_shed_requests_total",
          "Rerank requests answered 503 at the door, before their body was read: the "
          "service could not have started them within the default budget (also counted "
          'in rerank_request_duration_seconds{outcome="rejected"}).'),
    _Spec("admission_limit", Gauge, "rerank_admission_limit",
          "Requests the service admits at once (working ones beyond it are shed at the "
          "door): the measured answer rate x the time a request may wait.", mode="livesum"),
    _Spec("loop_lag", Gauge, "rerank_event_loop_lag_seconds",
          "How late the event loop runs a timer (smoothed); the worst worker's.",
          mode="livemax"),
    _Spec("ready", Gauge, "rerank_ready",
          "1 once this worker's bundle is verified and every shape bucket warmed (it "
          "answers /v1/rerank), else 0; the minimum over live workers.", mode="livemin"),
    _Spec("inflight", Gauge, "rerank_inflight_requests", "Rerank requests being served.",
          mode="livesum"),
    _Spec("breaker_open", Gauge, "rerank_redis_breaker_open",
          "1 while the Redis circuit breaker is open or half-open.", mode="livemax"),
    _Spec("model_info", Gauge, "rerank_model_info", "The served model bundle (value 1).",
          ("version", "label", "created"), mode="liveall"),
)  # fmt: skip


def _collector(spec: _Spec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if spec.kind is Histogram:
        return Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets,
                         registry=registry)  # fmt: skip
    if spec.kind is Gauge:
        return Gauge(spec.name, spec.help, spec.labels, registry=registry,
                     multiprocess_mode=spec.mode)  # fmt: skip
    return Counter(spec.name, spec.help, spec.labels, registry=registry)


class Metrics:
    """Every collector of the service (SPECS), registered on `registry`."""

    request_duration: Histogram
    stage_duration: Histogram
    fallback: Counter
    lookups: Counter
    writebacks: Counter
    decode_passes: Histogram
    batch_size: Histogram
    candidates: Histogram
    dropped: Counter
    decode_level: Counter
    reloads: Counter
    late: Counter
    shed: Counter
    admission_limit: Gauge
    loop_lag: Gauge
    ready: Gauge
    inflight: Gauge
    breaker_open: Gauge
    model_info: Gauge

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        for spec in SPECS:
            setattr(self, spec.attr, _collector(spec, registry))
        # every label value exists from the start: dashboards see zeros, not gaps; the
        # children are kept, so the request path skips labels() (a lock and a dict each)
        self.duration_of = {o: self.request_duration.labels(o) for o in OUTCOMES}
        self.stage_of = {st: self.stage_duration.labels(st) for st in STAGES}
        self.fallback_of = {r: self.fallback.labels(r) for r in REASONS}
        for tier in TIERS:
            for result in RESULTS:
                self.lookups.labels(tier, result)
        for result in ("ok", "error", "dropped"):
            self.writebacks.labels(result)
        for result in ("ok", "error"):
            self.reloads.labels(result)

    def render(self) -> tuple[bytes, str]:
        """The exposition text: this registry, or every worker's in multiprocess mode."""
        if (path := multiprocess_dir()) is not None:
            forget_dead_workers(path)
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def forget_dead_workers(path: str) -> None:
    """Drop the live-gauge files of worker processes that no longer exist (a worker that
    crashed and was replaced): otherwise its last in-flight count, breaker state, readiness
    and model version stay in every scrape. Counters and histograms keep their files: a
    dead worker's counts still happened."""
    pids = set()
    with contextlib.suppress(OSError):
        for file in Path(path).iterdir():
            if (match := _LIVE_FILE.match(file.name)) is not None:
                pids.add(int(match.group(1)))
    for pid in pids:
        try:
            os.kill(pid, 0)  # signal 0: does the process exist?
        except ProcessLookupError:
            mark_process_dead(pid, path)
        except PermissionError:  # exists, under another user
            pass
