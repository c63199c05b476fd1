"""Load: micro-batching, load-adaptive decoding and overload, over HTTP (CPU).

    python tests/bench/bench_load.py [--bundle DIR] [--duration S] [--only SECTION]
                                     [--out PNG] [--json PATH]
    pytest -m bench -s tests/bench/test_bench_load.py      (a short run, checks it runs)

The machinery is the load generator of loadtest/ (driver, schedules, servers) with
tests/support/load.py, as tests/bench/bench_http.py uses it: every service is `python -m
service` in its own uvicorn process (one worker, no Redis: L1 + item tower; RERANK_*
settings per target), pinned to one core, the load from a spawned process pinned to
another, raw asyncio streams over keep-alive connections, /metrics scraped around each
measured window.

The requests are the simulated world's the bundle was trained on (design §3): a sample of
data/default/test.parquet with its world.npz when present, else fresh requests of
WorldConfig() seed 0. Each body carries the request's user (id and dense features) and its
m = 30 candidates in upstream order (item id, upstream score, the bundle's categorical and
dense item features), k = 10. Before a target is measured, a closed-loop pass gets every
body answered once with the model's list (their items into its L1 cache; bodies degraded
or failed are sent again), at most max(60 s, 50 ms per body): a setup line says when the
cap cut it short.

batching  RERANK_DECODE_POLICY=fixed (every head per pass) and a 1 s budget on both, so
          the only difference is RERANK_MAX_BATCH = 32 vs 1 and every answer counted is the
          model's (with the 50 ms default, one-per-call answers past the budget would
          degrade to the cheap upstream order and inflate its count). Closed loop, 32
          connections, the two alternating in rounds: maximum throughput of each. Then open
          loop at 70% of the batched maximum: p99 from the scheduled send time (client) and
          from rerank_request_duration_seconds over the window (server).
policy    the shipped settings with RERANK_DECODE_POLICY=adaptive (RERANK_BEAM=3) vs fixed.
          The fixed service's closed-loop maximum of model (non-degraded) answers first;
          then open loop at 20% .. 130% of it, the two policies alternating at each rate,
          each run 2 s unrecorded then --duration recorded. Every response's list is kept
          and scored with the world's TRUE expected utility (model.user_model.true_utility;
          degraded answers count with the list they returned), beside the upstream top k of
          the same requests; p99 per rate; the share of decoded requests at each level
          (rerank_decode_level_total deltas). Plot: mean true utility and p99 against
          offered load, one figure (--out).
overload  the shipped settings. Its closed-loop maximum of model (non-degraded) answers,
          then one open-loop schedule: 30% of it for --duration / 2, 3x it for 2.5 x
          --duration, 30% again for 2 x --duration (long enough to see the step's backlog
          drain). Every request is accounted for: answered, HTTP errors, no answer (a late
          answer still counts: the sender waits up to 60 s after the last send). The sender
          opens at most --connections connections; beyond, a request waits in the client for
          a free one (counted; its latency still runs from its scheduled time); a send on a
          connection the server closed while idle (uvicorn: 5 s) is retried on another, as
          HTTP clients do, and counted. The server's VmRSS is read every second and /healthz
          probed once a second on a fresh connection (5 s timeout), on the main port (the
          event loop's) and on the admin port (RERANK_ADMIN_PORT: threads off the loop, what
          an orchestrator's liveness probe should use).

Every window also reports the CPU other processes on the machine and the hypervisor
(steal) took meanwhile: on a shared machine, the figures of a window where they are not
near 0 are not comparable.

Figures are printed against the goals as ratios and met / MISSED, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from loadtest.driver import (  # noqa: E402
    LoadProcess,
    PhaseResult,
    batch_totals,
    client_loop_name,
    merge_results,
)
from loadtest.schedules import (  # noqa: E402
    REASONS,
    ScheduleResult,
    Segment,
    pct_ms,
    percentile,
    run_job_async,
    run_schedule,
)
from loadtest.scrapes import increase, window_quantile  # noqa: E402
from loadtest.servers import process_cpu_s, rss_mib  # noqa: E402
from tests.support.load import (  # noqa: E402
    Bench,
    Requests,
    bench_placement,
    jsonable,
    model_max,
    resolve_bundle,
    shipped,
    verdict,
    world_requests,
)
from tests.support.redis_server import free_port  # noqa: E402

# The world and the plotting are imported inside the functions that need them.

SECTIONS = ("batching", "policy", "overload")
DEFAULT_PNG = ROOT / "tests" / "bench" / "results" / "policy.png"


@dataclass(frozen=True)
class LoadConfig:
    """One run of this benchmark."""

    bundle: Path | None = None  # None: artifacts/ (or a tiny random bundle), as bench_http
    duration_s: float = 8.0  # per measured window (overload: 2.5x this at 3x load)
    warmup_s: float = 2.0  # unrecorded before each window
    only: tuple[str, ...] = SECTIONS
    n_requests: int = 2000  # distinct world requests, sent in turn
    concurrency: int = 32  # closed-loop connections
    connections: int = 512  # most connections of the open-loop sender
    max_batch: int = 32  # the batched target's RERANK_MAX_BATCH
    fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.3)  # policy: of the fixed max
    open_fraction: float = 0.7  # batching: the open-loop rate, of the batched max
    step: tuple[float, float] = (0.3, 3.0)  # overload: base and step rate, of the max
    out: Path | None = DEFAULT_PNG  # the policy plot
    pin: bool = True
    extra_env: tuple[tuple[str, str], ...] = ()  # RERANK_* settings on every service


# ---------------------------------------------------------------- figures


def server_quantile(q: float, before: str, after: str) -> float:
    """rerank_request_duration_seconds (served requests) between two scrapes, ms."""
    if not before or not after:
        return np.nan
    return window_quantile(q, before, after) * 1e3


def _shipped_text() -> str:
    return (f"max batch {shipped('max_batch')}, max queue {shipped('max_queue')}, "
            f"budget {shipped('default_budget_ms'):g} ms")  # fmt: skip


def reason_shares(reason: np.ndarray) -> dict[str, float]:
    """Share of the answers degraded for each reason (of the 200 answers in `reason`)."""
    answered = reason >= 0
    total = max(1, int(answered.sum()))
    return {name: float((reason == 1 + i).sum()) / total for i, name in enumerate(REASONS)}


def _shares_text(shares: dict[str, float]) -> str:
    text = " ".join(f"{name} {share:.1%}" for name, share in shares.items() if share > 0)
    return text or "-"


# ---------------------------------------------------------------- the run


@dataclass
class BatchingRun:
    """What the batching section measured: both targets closed loop, the batched one open
    loop at a fraction of its maximum."""

    targets: tuple[str, ...]
    closed: dict[str, PhaseResult]
    closed_others: str  # other processes on the machine during the closed loop
    rate: float  # the open loop's
    svc: dict[str, Any]  # the open loop's figures
    open_others: str
    client_share: float  # of its core, the sender's in the open loop
    res: ScheduleResult


def _run_batching(b: Bench[LoadConfig]) -> BatchingRun:
    cfg = b.cfg
    common = {"RERANK_DECODE_POLICY": "fixed", "RERANK_DEFAULT_BUDGET_MS": "1000"}
    targets = {"batched": {**common, "RERANK_MAX_BATCH": str(cfg.max_batch)},
               "one_per_call": {**common, "RERANK_MAX_BATCH": "1"}}  # fmt: skip
    b.start(targets)
    since = b.mark()
    parts: dict[str, list[PhaseResult]] = {name: [] for name in targets}
    for r in range(BATCHING_ROUNDS):
        for name in parts:
            warm = cfg.warmup_s if r == 0 else min(cfg.warmup_s, 0.5)
            block = cfg.duration_s / BATCHING_ROUNDS
            parts[name].append(b.load.run(b.phase(name, "closed", block, warm)))
    closed = {name: merge_results(p) for name, p in parts.items()}
    rate = cfg.open_fraction * closed["batched"].throughput
    closed_others = b.others_text(since)
    b.stop("one_per_call")  # the open loop's core to itself
    since = b.mark()
    job = b.schedule("batched", (Segment("warm-up", rate, 1.0),
                                 Segment("measured", rate, cfg.duration_s)))  # fmt: skip
    res = run_schedule(b.load, job)
    open_others = b.others_text(since)
    client_share = res.client_cpu_s / max(1e-9, time.monotonic() - since.wall)
    b.stop("batched")
    rec = res.segment == 1
    ok = rec & res.answered
    window = res.window(1)
    server_p50, server_p99 = (server_quantile(q, *window) for q in (0.50, 0.99))
    requests, calls = batch_totals(*window)
    bounds = job.boundaries()
    svc = {"rate": rate, "answered_rps": res.answers_per_s(bounds[1], bounds[2]),
           "p50_ms": pct_ms(res.latency[ok], 50), "p95_ms": pct_ms(res.latency[ok], 95),
           "p99_ms": pct_ms(res.latency[ok], 99), "server_p50_ms": server_p50,
           "server_p99_ms": server_p99, "degraded": int((res.reason[ok] > 0).sum()),
           "errors": int((rec & ~res.answered).sum()), "late": int(res.late[rec].sum()),
           "reconnects": res.reconnects,
           "mean_batch": requests / calls if calls else np.nan}  # fmt: skip
    return BatchingRun(tuple(targets), closed, closed_others, rate, svc, open_others,
                       client_share, res)  # fmt: skip


BATCHING_ROUNDS = 2  # alternating closed-loop rounds


def bench_batching(b: Bench[LoadConfig]) -> tuple[str, dict[str, Any]]:
    cfg, run = b.cfg, _run_batching(b)
    closed, svc = run.closed, run.svc
    ratio = closed["batched"].throughput / closed["one_per_call"].throughput
    p99, server_p99 = svc["p99_ms"], svc["server_p99_ms"]
    lines = [
        *_batching_closed_lines(b, run),
        *_batching_open_lines(cfg, run),
        "",
        "goals:",
        f"  max throughput, batched / one per engine call at concurrency {cfg.concurrency}: "
        f"{ratio:.2f}x (goal >= 2x): {verdict(ratio >= 2)}",
        f"  p99 at {cfg.open_fraction:.0%} of the batched maximum: {p99:.2f} ms client side, "
        f"{server_p99:.2f} ms server side (goal <= 10 ms): {verdict(p99 <= 10)} "
        f"(server side: {verdict(server_p99 <= 10)})",
    ]
    for r in closed.values():
        if r.error_sample:
            lines.append(f"  first error {r.phase.target}/{r.phase.mode}: {r.error_sample}")
    if run.res.error_sample:
        lines.append(f"  first error batched/open: {run.res.error_sample}")
    figures = {
        "closed": {
            name: {"max_rps": r.answered, "model_lists_rps": r.throughput,
                   "p50_ms": r.pct_ms(50), "p99_ms": r.pct_ms(99), "degraded": r.degraded,
                   "errors": r.errors, "mean_batch": r.mean_batch,
                   "server_cpu_us_per_req": r.server_cpu_s / max(1, len(r.latencies)) * 1e6}
            for name, r in closed.items()
        },
        "open": svc,
        "warm": b.warm_figures(*run.targets),
        "throughput_ratio": ratio,
        "met": {"throughput_2x": ratio >= 2, "p99_10ms": p99 <= 10},
    }  # fmt: skip
    return "\n".join(lines), figures


def _batching_closed_lines(b: Bench[LoadConfig], run: BatchingRun) -> list[str]:
    cfg = b.cfg
    lines = [
        "== micro-batching: RERANK_MAX_BATCH = "
        f"{cfg.max_batch} vs 1, both RERANK_DECODE_POLICY=fixed (every head per pass), "
        "budget 1 s",
        "",
        f"closed loop, {cfg.concurrency} connections, {cfg.warmup_s:g} s warm-up, "
        f"{cfg.duration_s:g} s per target in {BATCHING_ROUNDS} alternating rounds; ms, "
        "client side",
        f"  ({b.warm_text(*run.targets)})",
        "",
        "| target       | max req/s | model's lists/s |    p50 |    p99 | degraded | errors "
        "| server CPU | us/req | batch |",
        "|:-------------|----------:|----------------:|-------:|-------:|---------:|-------:"
        "|-----------:|-------:|------:|",
    ]
    for name, r in run.closed.items():
        us = r.server_cpu_s / max(1, len(r.latencies)) * 1e6
        lines.append(
            f"| {name:<12} | {r.answered:9.0f} | {r.throughput:15.0f} "
            f"| {r.pct_ms(50):6.2f} | {r.pct_ms(99):6.2f} | {r.degraded:8d} | {r.errors:6d} "
            f"| {r.server_cpu_s / r.window_s:10.0%} | {us:6.0f} | {r.mean_batch:5.2f} |"
        )
    return [*lines, f"  ({run.closed_others})"]


def _batching_open_lines(cfg: LoadConfig, run: BatchingRun) -> list[str]:
    svc = run.svc
    server = f"{svc['server_p50_ms']:.2f} / {svc['server_p99_ms']:.2f}"
    return [
        "",
        f"open loop, batched, at {run.rate:.0f} req/s ({cfg.open_fraction:.0%} of its "
        f"maximum), {cfg.duration_s:g} s after 1 s unrecorded; answered/s: 200 answers "
        "completed in the window, per second (by answer time); latency (requests scheduled "
        "in the window) from the scheduled send, ms; server: rerank_request_duration_seconds "
        "over the window",
        "",
        "| answered/s (by answer time) |    p50 |    p95 |    p99 | server p50 / p99 "
        "| degraded | errors | late sends | batch |",
        "|----------------------------:|-------:|-------:|-------:|-----------------:"
        "|---------:|-------:|-----------:|------:|",
        f"| {svc['answered_rps']:27.0f} | {svc['p50_ms']:6.2f} | {svc['p95_ms']:6.2f} "
        f"| {svc['p99_ms']:6.2f} | {server:>16} | {svc['degraded']:8d} "
        f"| {svc['errors']:6d} | {svc['late']:10d} | {svc['mean_batch']:5.2f} |",
        f"  ({run.open_others}; the sender used {run.client_share:.0%} of its core; "
        f"{run.res.reconnects} sends retried on a connection the server had closed while idle)",
    ]


@dataclass
class PolicyRun:
    policy: str
    fraction: float
    rate: float
    achieved: float  # 200 answers completed in the recorded window, per second
    p50_ms: float
    p99_ms: float
    handler_p99_ms: float  # the answers' timings.total_ms (handler entry to response body)
    utility: float  # mean true utility of the answered lists
    upstream: float  # mean true utility of the upstream top k of the same requests
    degraded: dict[str, float]
    levels: dict[str, float]  # share of the decoded requests at each level (server)
    errors: int  # no 200 answer (HTTP error, transport error, none within the grace)
    late: int  # sends > 1 ms behind schedule (the sender fell behind)
    foreign: int  # returned item ids not among the request's candidates
    others: float = 0.0  # cores used by other processes on the machine during the run
    steal: float = 0.0  # cores taken by the hypervisor (steal) during the run
    error_sample: str = ""


def _policy_run(world: Any, reqs: Requests, res: ScheduleResult, upstream_u: np.ndarray,
                policy: str, fraction: float) -> PolicyRun:  # fmt: skip
    """The recorded segment (the last) of one run: latency, true utility, levels."""
    from model.user_model import true_utility

    seg = len(res.schedule.segments) - 1
    rec = res.segment == seg
    ok = rec & res.answered
    idx = np.flatnonzero(ok)
    body = res.body[idx]
    lists = np.full((len(idx), reqs.k), -1, np.int64)
    for row, i in enumerate(idx):
        ids = [it["item_id"] for it in orjson.loads(res.bodies[i])["items"]][: reqs.k]
        lists[row, : len(ids)] = ids
    cands = reqs.items[body]  # (n, m)
    foreign = int(((lists[:, :, None] != cands[:, None, :]).all(2) & (lists >= 0)).sum())
    utility = true_utility(world, reqs.users[body], np.where(lists >= 0, lists, -1))
    bounds = res.schedule.boundaries()
    served = res.answers_per_s(bounds[seg], bounds[seg + 1])  # by answer time
    levels = increase(*res.window(seg), "rerank_decode_level_total", "level")
    decoded = sum(levels.values())
    return PolicyRun(
        policy=policy, fraction=fraction, rate=res.schedule.segments[seg].rate,
        achieved=served, p50_ms=pct_ms(res.latency[ok], 50),
        p99_ms=pct_ms(res.latency[ok], 99), handler_p99_ms=percentile(res.handler_ms[ok], 99),
        utility=float(utility.mean()) if len(idx) else np.nan,
        upstream=float(upstream_u[body].mean()) if len(idx) else np.nan,
        degraded=reason_shares(res.reason[rec]),
        levels={k: v / decoded for k, v in sorted(levels.items()) if v > 0} if decoded else {},
        errors=int((rec & ~res.answered).sum()), late=int(res.late[rec].sum()), foreign=foreign,
        error_sample=res.error_sample,
    )  # fmt: skip


def bench_policy(b: Bench[LoadConfig], world: Any) -> tuple[str, dict[str, Any]]:
    from model.user_model import true_utility

    cfg, reqs = b.cfg, b.requests
    targets = {"adaptive": {"RERANK_DECODE_POLICY": "adaptive", "RERANK_BEAM": "3"},
               "fixed": {"RERANK_DECODE_POLICY": "fixed"}}  # fmt: skip
    b.start(targets)
    top = b.closed_max("fixed")
    fixed_max, fixed_text = model_max(top)  # degraded answers are no throughput
    upstream_u = true_utility(world, reqs.users, reqs.items[:, : reqs.k])
    runs: list[PolicyRun] = []
    for n, fraction in enumerate(cfg.fractions):
        rate = max(1.0, fraction * fixed_max)
        segments = (
            Segment("warm-up", rate, cfg.warmup_s),
            Segment("measured", rate, cfg.duration_s),
        )
        order = list(targets) if n % 2 == 0 else list(targets)[::-1]  # drift hits both
        for policy in order:
            job = b.schedule(policy, segments, keep_bodies=True, grace_s=10.0)
            since = b.mark()
            res = run_schedule(b.load, job)
            run = _policy_run(world, reqs, res, upstream_u, policy, fraction)
            run.others, run.steal = b.others(since)
            runs.append(run)
    b.stop(*targets)
    budget_ms = shipped("default_budget_ms")

    lines = [
        "== load-adaptive decoding: RERANK_DECODE_POLICY=adaptive (RERANK_BEAM=3) vs fixed "
        f"(every head per pass); shipped settings otherwise ({_shipped_text()})",
        "",
        f"fixed policy, closed loop, {cfg.concurrency} connections: {fixed_text} = 100% below",
        f"  ({b.warm_text('adaptive', 'fixed')})",
        f"open loop per rate: {cfg.warmup_s:g} s unrecorded, then {cfg.duration_s:g} s; the "
        "two policies alternate; answered/s: 200 answers completed in the recorded window, "
        "per second (by answer time); latency (requests scheduled in the window) from the "
        "scheduled send, ms; utility: mean TRUE "
        "expected utility of the returned lists (degraded ones included); late: sends > 1 ms "
        "behind schedule; others / steal: cores used by other processes on the machine and "
        "taken by the hypervisor during the run; handler p99: of the handler time "
        "(timings.total_ms: from the rerank handler's entry to the response body, not socket "
        "or uvicorn queueing)",
        "",
        "| load | offered req/s | policy   | answered/s (by answer time) |    p50 |    p99 "
        "| handler p99 | true utility "
        "| / upstream | degraded (reason)            | decode levels (server)         | errors "
        "| late | others / steal |",
        "|-----:|--------------:|:---------|----------------------------:|-------:|-------:"
        "|------------:|-------------:"
        "|-----------:|:-----------------------------|:-------------------------------|-------:"
        "|-----:|---------------:|",
    ]
    for r in runs:
        levels = " ".join(f"{k} {v:.0%}" for k, v in r.levels.items()) or "-"
        lines.append(
            f"| {r.fraction:4.0%} | {r.rate:13.0f} | {r.policy:<8} | {r.achieved:27.0f} "
            f"| {r.p50_ms:6.2f} | {r.p99_ms:6.2f} | {r.handler_p99_ms:11.2f} "
            f"| {r.utility:12.4f} "
            f"| {r.utility / r.upstream:9.3f}x | {_shares_text(r.degraded):<28} "
            f"| {levels:<30} | {r.errors:6d} | {r.late:4d} "
            f"| {f'{r.others:.2f} / {r.steal:.2f}':>14} |"
        )
    by = {(r.policy, r.fraction): r for r in runs}
    lines += ["", "adaptive vs fixed at each load (ratios), and p99 against the 50 ms budget:"]
    for fraction in cfg.fractions:
        a, f = by[("adaptive", fraction)], by[("fixed", fraction)]
        lines.append(
            f"  {fraction:4.0%}: utility {a.utility / f.utility:.3f}x, p99 "
            f"{a.p99_ms / f.p99_ms:.2f}x; p99 <= budget: adaptive "
            f"{verdict(a.p99_ms <= budget_ms)}, fixed {verdict(f.p99_ms <= budget_ms)}"
        )
    for r in runs:
        if r.error_sample:
            lines.append(f"  first error {r.policy} at {r.fraction:.0%}: {r.error_sample}")
    foreign = sum(r.foreign for r in runs)
    lines.append(f"  returned items not among the request's candidates: {foreign} "
                 f"(must be 0): {verdict(foreign == 0)}")  # fmt: skip
    if cfg.out is not None:
        where = "CPU, service on 1 core" if b.server_cpus else "CPU, unpinned"
        lines.append(f"  plot: {plot_policy(runs, budget_ms, fixed_max, cfg.out, where)}")
    figures = {"fixed_max_rps": fixed_max, "fixed_all_answers_rps": top.answered,
               "fixed_max_degraded_share": top.degraded / max(1, len(top.latencies)),
               "warm": b.warm_figures("adaptive", "fixed"), "budget_ms": budget_ms,
               "runs": [vars(r) for r in runs]}  # fmt: skip
    return "\n".join(lines), figures


def plot_policy(runs: list[PolicyRun], budget_ms: float, fixed_max: float, out: Path,
                where: str) -> str:  # fmt: skip
    """Mean true utility and p99 against offered load, both policies, one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn (no matplotlib: pip install -e '.[loadtest]')"
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7.5, 6.5))
    styles = {"adaptive": ("tab:blue", "o"), "fixed": ("tab:orange", "s")}
    for policy, (color, marker) in styles.items():
        rs = sorted((r for r in runs if r.policy == policy), key=lambda r: r.rate)
        x = [r.rate for r in rs]
        label = "adaptive (beam 3 -> n=1 -> 2 -> 4)" if policy == "adaptive" else "fixed (n=4)"
        top.plot(x, [r.utility for r in rs], marker=marker, color=color, label=label)
        bottom.plot(x, [r.p99_ms for r in rs], marker=marker, color=color, label=label)
    rs = sorted(runs, key=lambda r: r.rate)
    top.plot([r.rate for r in rs], [r.upstream for r in rs], ls="--", color="gray",
             label="upstream top k (same requests)")  # fmt: skip
    top.set_ylabel("mean true utility")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.axhline(budget_ms, ls=":", color="red", label=f"budget {budget_ms:g} ms")
    bottom.set_ylabel("p99 latency, ms (log)")
    bottom.set_yscale("log")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3, which="both")
    bottom.set_xlabel(f"offered load, req/s (open loop)\n100% = the fixed policy's closed-loop "
                      f"maximum of model answers, {fixed_max:.0f}/s")  # fmt: skip
    rates = sorted({(round(r.rate), r.fraction) for r in runs})
    bottom.set_xticks([x for x, _ in rates], [f"{x}\n{f:.0%}" for x, f in rates])
    fig.suptitle(f"Load-adaptive decoding: quality and tail latency vs load ({where})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return str(out)


class HealthProbe:
    """GET /healthz once a second on a fresh connection, in a thread of this process (as
    an orchestrator's liveness probe would): (seconds since start, latency s or None)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.samples: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health-probe", daemon=True)
        self.t0 = time.monotonic()

    def __enter__(self) -> HealthProbe:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 2)

    def _loop(self) -> None:
        import httpx

        while not self._stop.is_set():
            t = time.monotonic()
            try:
                with httpx.Client(timeout=self.timeout_s) as client:  # a new connection each
                    ok = client.get(f"{self.url}/healthz").status_code == 200
                took = time.monotonic() - t if ok else None
            except httpx.HTTPError:
                took = None
            self.samples.append((t - self.t0, took))
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - t)))


def _verdict_or_unknown(value: float, ok: bool) -> str:
    return "unknown (no figure)" if not np.isfinite(value) else verdict(ok)


def _overload_phase(res: ScheduleResult, j: int, seg: Segment, k: int) -> dict[str, Any]:
    """The figures of one segment of the overload schedule (requests scheduled in it)."""
    mine = res.segment == j
    ok = mine & res.answered
    lat = res.latency[ok]
    return {
        "name": seg.name, "rate": seg.rate, "seconds": seg.seconds, "sent": int(mine.sum()),
        "answered": int(ok.sum()), "shed": int((mine & (res.status == 503)).sum()),
        "http_errors": int((mine & (res.status > 0) & (res.status != 503)
                            & ~res.answered).sum()),
        "transport_errors": int((mine & (res.status == 0)).sum()),
        "no_answer": int((mine & (res.status == -1)).sum()),
        "degraded": reason_shares(res.reason[mine]),
        "unmarked": int((ok & (res.reason > 0) & ~res.marked).sum()
                        + (ok & (res.reason == 0) & res.marked).sum()),
        "short_lists": int((ok & (res.n_items < k)).sum()),
        "p50_ms": pct_ms(lat, 50), "p99_ms": pct_ms(lat, 99),
        "handler_p99_ms": percentile(res.handler_ms[ok], 99),
        "server_fallbacks": increase(*res.window(j), "rerank_fallback_total", "reason"),
        "late": int(res.late[mine].sum()), "waited": int(res.waited[mine].sum()),
    }  # fmt: skip


def _overload_row(phase: dict[str, Any]) -> str:
    errors = phase["http_errors"] + phase["transport_errors"] + phase["no_answer"]
    return (
        f"| {phase['name']:<10} | {phase['rate']:6.0f} | {phase['seconds']:4.0f} "
        f"| {phase['sent']:6d} | {phase['answered'] / max(1, phase['sent']):8.4f} "
        f"| {errors:6d} | {_shares_text(phase['degraded']):<28} | {phase['p50_ms']:8.1f} "
        f"| {phase['p99_ms']:8.1f} | {phase['handler_p99_ms']:11.1f} "
        f"| {phase['late']:5d} | {phase['waited']:6d} |"
    )


def _overload_timeline(res: ScheduleResult, rss: list[tuple[float, float]], seconds: float
                       ) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """2 s bins of the schedule: (their figures, their lines of the printed timeline)."""
    overload = 1 + REASONS.index("overload")
    bins = np.floor(res.offset).astype(int)
    timeline, lines = [], []
    for sec in range(0, int(np.ceil(seconds)), 2):
        inbin = (bins >= sec) & (bins < sec + 2)
        served = res.answers_per_s(sec, sec + 2)  # 200s only: the rest are errors
        near = [m for t, m in rss if sec <= t < sec + 2]
        row = {
            "t": sec, "scheduled": int(inbin.sum()), "served_rps": float(served),
            "p99_ms": pct_ms(res.latency[inbin & res.answered], 99),
            "handler_p99_ms": percentile(res.handler_ms[inbin & res.answered], 99),
            "overload": float((res.reason[inbin] == overload).mean()) if inbin.any() else 0.0,
            "rss_mib": max(near) if near else np.nan,
        }  # fmt: skip
        timeline.append(row)
        lines.append(
            f"  {sec:3d}-{sec + 2:<3d} s | {row['scheduled']:6d} | {served:6.0f}/s "
            f"| {row['p99_ms']:8.1f} | {row['handler_p99_ms']:7.1f} | {row['overload']:6.1%} "
            f"| {row['rss_mib']:5.0f}"
        )
    return timeline, lines


@dataclass
class OverloadRun:
    """What one overload schedule measured, before any figure is derived from it."""

    res: ScheduleResult
    segments: tuple[Segment, ...]
    seconds: float  # the schedule's length
    connections: int  # the sender's bound
    peak: float  # the closed-loop maximum of model answers, the rates' base
    peak_text: str
    top: PhaseResult  # that closed-loop window
    rss: list[tuple[float, float]]  # (seconds since the schedule was sent, MiB)
    rss_before: float
    rss_after: float  # nan when the process is gone
    up: bool  # the process alive after the schedule
    healthy: bool  # its /healthz answered 200 after
    probe: list[tuple[float, float | None]]  # /healthz once a second, main port
    admin_probe: list[tuple[float, float | None]]  # and the admin port
    server_cpu_s: float
    elapsed_s: float
    others: str  # other processes on the machine during the run
    client_share: float  # of its core, the sender's


def _run_overload(b: Bench[LoadConfig]) -> OverloadRun:
    """The closed-loop maximum, then base -> step -> base, open loop, with RSS sampled and
    /healthz probed on both ports throughout."""
    cfg = b.cfg
    admin_port = free_port()
    b.start({"overload": {"RERANK_ADMIN_PORT": str(admin_port)}})
    server = b.servers["overload"]
    top = b.closed_max("overload")
    peak, peak_text = model_max(top)  # degraded answers are no throughput
    base, step = cfg.step
    segments = (
        Segment(f"{base:.0%}", max(1.0, base * peak), max(1.0, cfg.duration_s / 2)),
        Segment(f"{step:g}x", max(1.0, step * peak), 2.5 * cfg.duration_s),
        Segment(f"{base:.0%} again", max(1.0, base * peak), 2 * cfg.duration_s),
    )
    rss: list[tuple[float, float]] = []
    rss_before = rss_mib(server.proc.pid)

    def sample() -> None:
        if server.proc.poll() is None:
            rss.append((time.monotonic() - since.wall, rss_mib(server.proc.pid)))

    job = b.schedule("overload", segments, grace_s=60.0)
    since = b.mark()
    server_cpu0 = process_cpu_s(server.proc.pid)
    with HealthProbe(server.url) as probe, \
            HealthProbe(f"http://127.0.0.1:{admin_port}") as admin_probe:  # fmt: skip
        res = run_schedule(b.load, job, sample)
    server_cpu = process_cpu_s(server.proc.pid) - server_cpu0
    elapsed = time.monotonic() - since.wall
    others = b.others_text(since)
    time.sleep(1.0)
    up = server.proc.poll() is None
    rss_after = rss_mib(server.proc.pid) if up else np.nan
    healthy = False
    if up:
        import httpx

        with suppress(httpx.HTTPError), httpx.Client(base_url=server.url, timeout=5) as client:
            healthy = client.get("/healthz").status_code == 200
    b.stop("overload")
    return OverloadRun(res, segments, job.seconds, job.connections, peak, peak_text, top, rss,
                       rss_before, rss_after, up, healthy, probe.samples, admin_probe.samples,
                       server_cpu, elapsed, others, res.client_cpu_s / elapsed)  # fmt: skip


def _recovery(run: OverloadRun, first: dict[str, Any]) -> dict[str, Any]:
    """After the drop, against the phase before the step (`first`): end to end (client, by
    scheduled send: it includes the backlog the step left in the sender) and in the handler
    (timings); the first second from which every 1 s bin stays within the bound."""
    res, segments = run.res, run.segments
    drop = segments[0].seconds + segments[1].seconds
    half = (res.segment == len(segments) - 1) & res.answered
    half &= res.offset >= drop + segments[2].seconds / 2
    bound, bound_srv = (max(2 * x, x + 5.0) for x in (first["p99_ms"], first["handler_p99_ms"]))
    last_half_p99 = pct_ms(res.latency[half], 99)
    last_half_srv = percentile(res.handler_ms[half], 99)
    before_drop = (res.offset < drop) & res.answered
    drained = float(np.nanmax(res.done[before_drop]) - drop) if before_drop.any() else np.nan
    bins = np.floor(res.offset).astype(int)
    p99_by_s = {}
    for sec in range(int(np.ceil(run.seconds))):
        ok = (bins == sec) & res.answered
        p99_by_s[sec] = pct_ms(res.latency[ok], 99) if ok.any() else np.nan
    after = [sec for sec in p99_by_s if sec >= drop]
    within = {sec for sec in after if p99_by_s[sec] <= bound}  # nan (none answered): out
    settled = [sec for n, sec in enumerate(after) if set(after[n:]) <= within]
    return {
        "bound": bound, "bound_srv": bound_srv, "last_half_p99": last_half_p99,
        "last_half_srv": last_half_srv, "recovered": bool(last_half_p99 <= bound),
        "recovered_srv": bool(last_half_srv <= bound_srv), "drained": drained,
        "p99_by_s": p99_by_s, "recovered_at": settled[0] - drop if settled else None,
    }  # fmt: skip


def _memory(run: OverloadRun) -> dict[str, Any]:
    """RSS over the schedule: its maximum, and its growth from the step's first half to
    its second (a leak grows; a bounded queue does not)."""
    rss, segments = run.rss, run.segments
    mem = np.array([m for _, m in rss]) if rss else np.array([run.rss_before])
    step_t = (segments[0].seconds, segments[0].seconds + segments[1].seconds)
    half_t = step_t[0] + segments[1].seconds / 2
    growth = (np.mean([m for t, m in rss if half_t <= t <= step_t[1]] or [np.nan])
              - np.mean([m for t, m in rss if step_t[0] <= t < half_t] or [np.nan]))  # fmt: skip
    rss_max = float(mem.max())
    return {"max": rss_max, "growth": growth, "bounded": rss_max <= 1.5 * run.rss_before,
            "step_t": step_t}  # fmt: skip


def _probe_text(samples: list[tuple[float, float | None]], step_t: tuple[float, float]) -> str:
    """The probes during the step: how many, failed, answered ones' latency."""
    probes = [took for t, took in samples if step_t[0] <= t <= step_t[1]]
    ms = np.array([took for took in probes if took is not None]) * 1e3
    failed = sum(took is None for took in probes)
    return (f"{len(probes)} probes, {failed} failed or over 5 s, answered ones p50 "
            f"{percentile(ms, 50):.0f} ms, max {percentile(ms, 100):.0f} ms")  # fmt: skip


def bench_overload(b: Bench[LoadConfig]) -> tuple[str, dict[str, Any]]:
    run = _run_overload(b)
    res = run.res
    per_phase = [_overload_phase(res, j, seg, b.requests.k) for j, seg in enumerate(run.segments)]
    rec, mem = _recovery(run, per_phase[0]), _memory(run)
    # a 503 shed at the door (admission) is an answer: the client keeps its upstream order
    sent, answered = len(res.status), int((res.answered | (res.status == 503)).sum())
    errors = len(res.status) - answered
    unmarked = sum(p["unmarked"] for p in per_phase)
    short = sum(p["short_lists"] for p in per_phase)
    timeline, timeline_lines = _overload_timeline(res, run.rss, run.seconds)
    head = _overload_head(b, run, per_phase)
    goals = [
        f"  stays up: process alive {run.up}, /healthz 200 after {run.healthy}: "
        f"{verdict(run.up and run.healthy)}; /healthz once a second during the step: main "
        f"port {_probe_text(run.probe, mem['step_t'])}; admin port "
        f"{_probe_text(run.admin_probe, mem['step_t'])}",
        f"  answers every request: {answered}/{sent} = {answered / max(1, sent):.4f}, errors + "
        f"unanswered {errors} (goal 0): {verdict(errors == 0)}",
        f"  degraded answers marked (degraded flag iff reason; k items each): "
        f"{unmarked} unmarked, {short} short lists: {verdict(unmarked == 0 and short == 0)}",
        *_recovery_goal_lines(run, per_phase[0], rec, mem),
    ]
    lines = [*head, *timeline_lines, "", "goals:", *goals]
    if res.error_sample:
        lines.append(f"  first error: {res.error_sample}")
    figures = {
        "max_rps": run.peak, "all_answers_rps": run.top.answered,
        "max_degraded_share": run.top.degraded / max(1, len(run.top.latencies)),
        "warm": b.warm_figures("overload"), "phases": per_phase, "sent": sent, "answered": answered,
        "errors": errors, "unmarked": unmarked, "short_lists": short,
        "peak_connections": res.peak_connections, "reconnects": res.reconnects,
        "rss_mib": {"before": run.rss_before, "max": mem["max"], "after": run.rss_after,
                    "step_growth": mem["growth"], "samples": run.rss},
        "health_probes": run.probe, "admin_health_probes": run.admin_probe,
        "p99_by_second_ms": rec["p99_by_s"], "recovered_after_drop_s": rec["recovered_at"],
        "backlog_drained_after_drop_s": rec["drained"], "timeline": timeline,
        "last_half_p99_ms": rec["last_half_p99"], "last_half_handler_p99_ms": rec["last_half_srv"],
        "met": {"up": run.up and run.healthy, "all_answered": errors == 0,
                "marked": unmarked == 0 and short == 0, "memory_bounded": mem["bounded"],
                "recovered": rec["recovered"], "recovered_in_handler": rec["recovered_srv"]},
    }  # fmt: skip
    return "\n".join(lines), figures


def _overload_head(b: Bench[LoadConfig], run: OverloadRun,
                   per_phase: list[dict[str, Any]]) -> list[str]:  # fmt: skip
    """The section's title, setup, per-phase table and the timeline's legend."""
    res, cfg = run.res, b.cfg
    return [
        f"== overload: shipped settings ({_shipped_text()}, policy "
        f"{shipped('decode_policy')}); one open-loop schedule",
        "",
        f"closed-loop maximum ({cfg.concurrency} connections): {run.peak_text} = the rates' "
        f"base; the sender opened at most {res.peak_connections} of {run.connections} "
        f"connections ({res.reconnects} sends retried on a connection the server had closed "
        "while idle); latency from the scheduled send, ms (it includes waiting in the sender "
        "for a connection); handler: handler time (timings.total_ms: from the rerank "
        "handler's entry to the response body, not socket or uvicorn queueing)",
        f"  ({b.warm_text('overload')})",
        f"  ({run.others}; the sender used {run.client_share:.0%} of its core; the server "
        f"{run.server_cpu_s / run.elapsed_s:.0%} of its core, "
        f"{run.server_cpu_s / max(1, int(res.answered.sum())) * 1e6:.0f} us per answer)",
        "",
        "| phase      | req/s  |    s |   sent | answered |"
        " errors | degraded (reason)            |      p50 |      p99 | handler p99 | late "
        "| waited |",
        "|:-----------|-------:|-----:|-------:|---------:|"
        "-------:|:-----------------------------|---------:|---------:|------------:|-----:"
        "|-------:|",
        *[_overload_row(phase) for phase in per_phase],
        "",
        "timeline, 2 s bins: requests scheduled in the bin | 200 answers completed in the bin "
        "per second (by answer time) | of the requests scheduled in the bin: p99 ms (client), "
        "handler p99 ms, share degraded 'overload' | server RSS MiB (max in the bin)",
    ]


def _recovery_goal_lines(run: OverloadRun, first: dict[str, Any], rec: dict[str, Any],
                         mem: dict[str, Any]) -> list[str]:  # fmt: skip
    at = rec["recovered_at"]
    rec_text = f"{at:.0f} s after the drop" if at is not None else "never"
    before, rss_max = run.rss_before, mem["max"]
    return [
        f"  memory bounded: RSS {before:.0f} MiB before, max {rss_max:.0f} "
        f"({rss_max / before:.2f}x), {run.rss_after:.0f} after; 2nd half vs 1st half of the "
        f"step {mem['growth']:+.1f} MiB (goal max <= 1.5x before): {verdict(mem['bounded'])}",
        f"  recovers, end to end: p99 of the last phase's 2nd half {rec['last_half_p99']:.1f} ms "
        f"vs {first['p99_ms']:.1f} ms before the step (bound max(2x, +5 ms) = "
        f"{rec['bound']:.1f} ms): {_verdict_or_unknown(rec['last_half_p99'], rec['recovered'])}"
        f"; 1 s bins within the bound from {rec_text}; the step's backlog answered "
        f"{rec['drained']:.1f} s after the drop",
        f"  recovers, in the handler: handler p99 {rec['last_half_srv']:.1f} ms vs "
        f"{first['handler_p99_ms']:.1f} ms (bound {rec['bound_srv']:.1f} ms): "
        f"{_verdict_or_unknown(rec['last_half_srv'], rec['recovered_srv'])}",
    ]


def run(cfg: LoadConfig) -> tuple[str, dict[str, Any]]:
    """The sections of cfg.only; (the printed text, the figures)."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gref-load-")))
        path, how = resolve_bundle(cfg.bundle, workdir)
        manifest = json.loads((path / "manifest.json").read_text())
        world, reqs = world_requests(manifest["model_config"]["schema"], cfg.n_requests)
        place = bench_placement(cfg.pin)
        server_cpus, client_cpus, placement = place.service, place.load, place.text
        load = LoadProcess(reqs.bodies, client_cpus, runner=run_job_async)
        stack.callback(load.stop)
        bench = Bench(cfg, workdir, path, reqs, load, server_cpus)

        @stack.callback
        def _stop_servers() -> None:  # every server started, whatever happens
            for s in bench.servers.values():
                s.stop()

        size = np.mean([len(body) for body in reqs.bodies]) / 1024
        m = int((reqs.items >= 0).sum(1).max())
        head = [
            f"Load benchmark: bundle {manifest['version']} ({how}: {path})",
            f"  requests: {reqs.source}; m = {m}, k = {reqs.k}, bodies ~{size:.1f} KiB",
            f"  client: raw asyncio streams on {client_loop_name()}; nproc {os.cpu_count()}; "
            f"{placement}; load average {os.getloadavg()[0]:.2f} at the start",
        ]
        texts, figures = ["\n".join(head)], {"setup": {"bundle": manifest["version"],
                                                        "requests": reqs.source,
                                                        "placement": placement,
                                                        "loadavg": os.getloadavg()}}  # fmt: skip
        sections: dict[str, Callable[[], tuple[str, dict[str, Any]]]] = {
            "batching": lambda: bench_batching(bench),
            "policy": lambda: bench_policy(bench, world),
            "overload": lambda: bench_overload(bench),
        }
        for name in SECTIONS:
            if name in cfg.only:
                t0 = time.monotonic()
                text, figs = sections[name]()
                figs["wall_s"] = time.monotonic() - t0
                texts.append(text)
                figures[name] = figs
        return "\n\n".join(texts), figures
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path,
                   help="bundle or artifacts dir (default: artifacts/ if artifacts/latest "
                   "exists, else a tiny random bundle)")  # fmt: skip
    p.add_argument("--duration", type=float, default=8.0,
                   help="seconds per measured window (the 3x step: 2.5x this)")  # fmt: skip
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds first")
    p.add_argument("--only", choices=SECTIONS, action="append",
                   help="run only this section (repeatable; default: all)")  # fmt: skip
    p.add_argument("--requests", type=int, default=2000, help="distinct world requests")
    p.add_argument("--connections", type=int, default=512, help="open-loop sender's bound")
    p.add_argument("--out", type=Path, default=DEFAULT_PNG, help="the policy plot (PNG)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers and client")
    p.add_argument("--set", action="append", default=[], metavar="RERANK_X=V",
                   help="a setting of every service started (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    cfg = LoadConfig(bundle=args.bundle, duration_s=args.duration, warmup_s=args.warmup,
                     only=tuple(args.only or SECTIONS), n_requests=args.requests,
                     connections=args.connections, out=args.out, pin=not args.no_pin,
                     extra_env=tuple(tuple(kv.split("=", 1)) for kv in args.set))  # fmt: skip
    text, figures = run(cfg)
    print(text)
    if args.json is not None:
        figures["config"] = {f.name: str(getattr(cfg, f.name)) for f in fields(cfg)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(jsonable(figures), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
