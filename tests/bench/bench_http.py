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
another (their affinity set before exec: loadtest/servers.py), so each target gets one
core: "one process per core". CPU used by the server and the client in each measured
window is read from /proc.

Goals: service throughput >= 50% of the plain floor's; service latency-bound throughput
>= 40% of the plain floor's; service p99 <= 5 ms at half its maximum throughput. Printed
as ratios, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from loadtest.driver import (  # noqa: E402
    LoadProcess,
    Phase,
    PhaseResult,
    client_loop_name,
    merge_results,
)
from loadtest.scrapes import window_quantile  # noqa: E402
from loadtest.servers import Server  # noqa: E402
from tests.support.load import (  # noqa: E402
    bench_placement,
    build_bodies,
    resolve_bundle,
    server_env,
    start_service,
    string_bodies,
)

# ---------------------------------------------------------------- the servers


def start_echo(logdir: Path, cpus: set[int] | None, bundle: Path) -> Server:
    """The echo parses with the service's own reader, so it needs the bundle's schema."""
    argv = [sys.executable, "-m", "uvicorn", "tests.bench.echo_app:app", "--workers", "1",
            "--no-access-log", "--log-level", "warning"]  # fmt: skip
    env = {**server_env(), "GREF_ECHO_BUNDLE": str(bundle)}
    return Server("echo", argv, env, logdir, cpus)


def start_plain(logdir: Path, cpus: set[int] | None) -> Server:
    """The plain floor: stock FastAPI, json.loads, the first k candidates back."""
    argv = [sys.executable, "-m", "uvicorn", "tests.bench.plain_app:app", "--workers", "1",
            "--no-access-log", "--log-level", "warning"]  # fmt: skip
    return Server("plain", argv, server_env(), logdir, cpus)


# ---------------------------------------------------------------- the run

TARGETS = ("plain", "echo", "service")
BOUND_TARGETS = ("plain", "service")  # the latency-bound search (phase 3)


@dataclass(frozen=True)
class HttpPlan:
    """What one run measures: the command line's options."""

    duration_s: float = 10.0  # seconds per target in phases 1 and 2
    warmup_s: float = 2.0  # discarded first
    concurrency: int = 32  # closed-loop connections
    rounds: int = 2  # alternating closed-loop rounds
    load_fraction: float = 0.5  # phase 2's rate / the service's phase-1 maximum
    client: str = "raw"  # "raw" or "httpx"
    client_check: bool = True  # the echo once more with the other client
    bound_trials: int = 6  # phase 3: bisection trials per target
    bound_duration_s: float = 3.0  # phase 3: seconds per trial
    bound_p99_ms: float = 10.0  # phase 3: the p99 bound


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
    plan: HttpPlan = field(default_factory=HttpPlan)
    closed: dict[str, PhaseResult] = field(default_factory=dict)
    client_check: PhaseResult | None = None
    open: dict[str, PhaseResult] = field(default_factory=dict)
    bound: dict[str, Bound] = field(default_factory=dict)
    server_p99_s: float = np.nan
    server_p50_s: float = np.nan
    setup: str = ""

    def results(self) -> list[PhaseResult]:
        rows = [*self.closed.values(), *self.open.values()]
        return rows + ([self.client_check] if self.client_check else [])


class Targets:
    """The run's servers and its load process: one measured phase against a target at a
    time, every server checked alive before each."""

    def __init__(self, servers: dict[str, Server], load: LoadProcess, plan: HttpPlan):
        self.servers, self.load, self.plan = servers, load, plan

    def check_alive(self) -> None:
        for s in self.servers.values():
            s.check_alive()

    def measure(self, target: str, mode: str, seconds: float, warm: float,
                **kw: Any) -> PhaseResult:  # fmt: skip
        """One window against `target`; the service's histograms are scraped over it unless
        told otherwise."""
        self.check_alive()
        s = self.servers[target]
        kw.setdefault("scrape", target == "service")
        kw.setdefault("client", self.plan.client)
        phase = Phase(target, s.port, s.proc.pid, mode, seconds, warm, self.plan.concurrency,
                      **kw)  # fmt: skip
        return self.load.run(phase)


def start_targets(stack: ExitStack, bundle: Path, workdir: Path, cpus: set[int] | None,
                  service_env: dict[str, str] | None) -> dict[str, Server]:  # fmt: skip
    """plain, echo and service, ready; each stopped when `stack` closes, whatever happens."""
    servers: dict[str, Server] = {}

    @stack.callback
    def _stop_servers() -> None:
        for s in servers.values():
            s.stop()

    servers["plain"] = start_plain(workdir, cpus)
    servers["echo"] = start_echo(workdir, cpus, bundle)
    servers["service"] = start_service(bundle, workdir, cpus, service_env)
    for s in servers.values():
        s.wait_ready()
    return servers


def closed_phase(t: Targets, rep: Report) -> None:
    """Phase 1: closed loop, the targets alternating in rounds (and the client check)."""
    plan = t.plan
    parts: dict[str, list[PhaseResult]] = {name: [] for name in TARGETS}
    block = plan.duration_s / plan.rounds
    for r in range(plan.rounds):
        for name in parts:
            warm = plan.warmup_s if r == 0 else min(plan.warmup_s, 0.5)
            parts[name].append(t.measure(name, "closed", block, warm))
    rep.closed = {name: merge_results(p) for name, p in parts.items()}
    if plan.client_check:
        other = "httpx" if plan.client == "raw" else "raw"
        rep.client_check = t.measure("echo", "closed", block, min(plan.warmup_s, 1.0),
                                     client=other)  # fmt: skip


def open_phase(t: Targets, rep: Report) -> None:
    """Phase 2: open loop at a fraction of the service's maximum, every target; the
    service's server-side quantiles over its window."""
    rate = max(1.0, t.plan.load_fraction * rep.closed["service"].throughput)
    for name in TARGETS:
        r = t.measure(name, "open", t.plan.duration_s, 1.0, rate=rate)
        rep.open[name] = r
        if name == "service":
            rep.server_p99_s = window_quantile(0.99, *r.metrics)
            rep.server_p50_s = window_quantile(0.50, *r.metrics)


def bound_phase(t: Targets, rep: Report) -> None:
    """Phase 3: the latency-bound throughput, Poisson arrivals, bisection per target."""
    plan = t.plan
    for name in BOUND_TARGETS:

        def trial(rate: float, seed: int, name: str = name) -> PhaseResult:
            return t.measure(name, "open", plan.bound_duration_s, 0.5, rate=rate,
                             poisson=True, seed=seed, scrape=False)  # fmt: skip

        ceiling = 1.1 * rep.closed[name].throughput
        rep.bound[name] = latency_bound(trial, ceiling, plan.bound_trials, plan.bound_p99_ms,
                                        name)  # fmt: skip


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


def run(bundle: Path | None = None, plan: HttpPlan | None = None, pin: bool = True,
        m: int = 30, k: int = 10, service_env: dict[str, str] | None = None,
        string_ids: bool = False) -> tuple[str, Report]:  # fmt: skip
    """The three phases against the targets; (the printed table, the numbers).
    service_env: RERANK_* settings of the service (default: its defaults); string_ids:
    every id of the bodies a string (string_bodies)."""
    plan = plan or HttpPlan()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gref-bench-")))
        path, how = resolve_bundle(bundle, workdir)
        manifest = json.loads((path / "manifest.json").read_text())
        bodies = build_bodies(manifest, m, k)
        bodies = string_bodies(bodies) if string_ids else bodies
        place = bench_placement(pin)
        report = Report(bundle=f"{manifest['version']} ({how}: {path})", plan=plan)
        size = np.mean([len(b) for b in bodies]) / 1024
        report.setup = (f"m = {m}, k = {k}, {len(bodies)} distinct bodies of ~{size:.1f} KiB "
                        f"({'string' if string_ids else 'integer'} ids); "
                        f"client: {plan.client} on {client_loop_name()}; nproc {os.cpu_count()}; "
                        f"{place.text}; service settings: {service_env or 'defaults'}")  # fmt: skip
        servers = start_targets(stack, path, workdir, place.service, service_env)
        load = LoadProcess(bodies, place.load)
        stack.callback(load.stop)
        targets = Targets(servers, load, plan)
        closed_phase(targets, report)
        open_phase(targets, report)
        bound_phase(targets, report)
        targets.check_alive()  # every server still up at the end
        return table(report), report
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


# ---------------------------------------------------------------- the table


def _us(cpu_s: float, r: PhaseResult) -> float:
    return cpu_s / max(1, len(r.latencies)) * 1e6


def _server(r: PhaseResult) -> str:
    """server CPU | server us/req | batch: its share of its core and its cost per request."""
    batch = f"{r.mean_batch:5.2f}" if r.batches[1] else "-"
    return f"{r.server_cpu_s / r.window_s:4.0%} | {_us(r.server_cpu_s, r):6.0f} | {batch:>5}"


def _ratio(a: float, b: float) -> float:
    return a / b if b else np.nan


def _closed_lines(rep: Report) -> list[str]:
    plan = rep.plan
    lines = [
        f"phase 1: closed loop, {plan.concurrency} keep-alive connections, "
        f"{plan.warmup_s:g} s warm-up, {plan.duration_s:g} s per target in {plan.rounds} "
        "alternating rounds; times in ms (client side)",
        "",
        "| target  | client | max answers/s |    p50 |    p99 | degraded | errors "
        "| server CPU | us/req | batch | client CPU | us/req |",
        "|:--------|:-------|--------------:|-------:|-------:|---------:|-------:"
        "|-----:|-------:|------:|-----:|-------:|",
    ]
    closed = [rep.closed[name] for name in ("plain", "echo", "service")]
    for r in closed + ([rep.client_check] if rep.client_check else []):
        label = r.phase.target + (" *" if r is rep.client_check else "")
        lines.append(
            f"| {label:<7} | {r.phase.client:<6} | {r.throughput:13.0f} | {r.pct_ms(50):6.2f} "
            f"| {r.pct_ms(99):6.2f} | {r.degraded:8d} | {r.errors:6d} | {_server(r)} "
            f"| {r.client_cpu_s / r.window_s:4.0%} | {_us(r.client_cpu_s, r):6.0f} |"
        )
    return lines


def _open_lines(rep: Report) -> list[str]:
    rate = rep.open["service"].phase.rate
    lines = [
        f"phase 2: open loop at {rate:.0f} req/s ({rep.plan.load_fraction:.0%} of the service's "
        f"maximum) for {rep.plan.duration_s:g} s after 1 s unrecorded; latency from the "
        "scheduled send time, ms",
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
    return lines


def _bound_lines(rep: Report) -> list[str]:
    lines = [
        f"phase 3: latency-bound throughput: Poisson arrivals, {rep.plan.bound_duration_s:g} s "
        "per trial after 0.5 s unrecorded, the rate bisected over (0, 1.1x the closed-loop "
        "maximum]; a trial passes when the p99 of the time to a model answer (degraded, error "
        f"or none: never) is <= {rep.plan.bound_p99_ms:g} ms",
        "",
        "| target  | latency-bound req/s | trials: rate req/s -> served p99 ms |",
        "|:--------|--------------------:|:------------------------------------|",
    ]
    for name, b in rep.bound.items():
        trials = ", ".join(f"{r:.0f} -> {p:.2f}{'' if ok else ' x'}" for r, p, ok in b.trials)
        lines.append(f"| {name:<7} | {b.rate:19.0f} | {trials} |")
    return lines


LEGEND = [
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
]


def _goal_lines(rep: Report) -> list[str]:
    svc, echo, plain = rep.closed["service"], rep.closed["echo"], rep.closed["plain"]
    ratio = _ratio(svc.throughput, plain.throughput)
    p99 = rep.open["service"].pct_ms(99)
    bound = _ratio(rep.bound["service"].rate, rep.bound["plain"].rate) if rep.bound else np.nan
    fraction, bound_p99 = rep.plan.load_fraction, rep.plan.bound_p99_ms
    return [
        "goals:",
        f"  service / plain throughput: {ratio:.2f} (goal >= 0.50): "
        f"{'met' if ratio >= 0.5 else 'MISSED'}; server CPU per answer: service "
        f"{_us(svc.server_cpu_s, svc):.0f} us, plain {_us(plain.server_cpu_s, plain):.0f} us, "
        f"echo {_us(echo.server_cpu_s, echo):.0f} us; service / echo throughput "
        f"{_ratio(svc.throughput, echo.throughput):.2f}",
        f"  latency-bound throughput (p99 <= {bound_p99:g} ms), service / plain: "
        f"{bound:.2f} (goal >= 0.40): {'met' if bound >= 0.4 else 'MISSED'}",
        f"  service p99 at {fraction:.0%} of its maximum: {p99:.2f} ms, "
        f"{p99 / rep.open['echo'].pct_ms(99):.1f}x the echo's, "
        f"{p99 / rep.open['plain'].pct_ms(99):.1f}x the plain floor's at the same rate "
        f"(goal <= 5 ms): {'met' if p99 <= 5 else 'MISSED'}",
    ]


def _check_lines(rep: Report) -> list[str]:
    """Whether the client could be the bottleneck, the client check, first errors."""
    lines = []
    plain, echo = rep.closed["plain"], rep.closed["echo"]
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
    lines += [f"  first error {where}: {sample}" for where, sample in samples.items()]
    return lines


def table(rep: Report) -> str:
    """The printed report: setup, the three phases' tables, a legend, the goals."""
    head = [f"HTTP benchmark: bundle {rep.bundle}", f"  {rep.setup}", ""]
    parts = [_closed_lines(rep), _open_lines(rep), _bound_lines(rep), LEGEND]
    body = [line for part in parts for line in [*part, ""]]
    return "\n".join(head + body + _goal_lines(rep) + _check_lines(rep))


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
    plan = HttpPlan(args.duration, args.warmup, args.concurrency, args.rounds, args.load,
                    args.client, not args.no_client_check, args.bound_trials,
                    args.bound_duration, args.bound_p99)  # fmt: skip
    text, _ = run(args.bundle, plan, not args.no_pin,
                  service_env=dict(kv.split("=", 1) for kv in args.set),
                  string_ids=args.string_ids)  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
