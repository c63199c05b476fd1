"""The fault suite's scenarios. Each runs open-loop load (Plan.rate, 200 req/s by
default; m = 30, k = 10, budget 50 ms) against a Stack while it does one kind of harm, and
checks that scenario's acceptance into its Record. `Plan` scales the durations: the full
suite (`make chaos`) and the short one in the default test run share the code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tests.support.bundle import point_latest
from tests.support.chaos.harness import (
    HOST,
    Bodies,
    Load,
    Record,
    Stack,
    closed_loop,
    failures,
    p99_ms,
)


@dataclass(frozen=True)
class Plan:
    rate: float = 200.0  # req/s of the steady load
    budget_ms: float = 50.0
    phase_s: float = 10.0  # length of one phase (before, during, after a fault)
    overload_s: float = 60.0  # at 3x saturation
    swaps: int = 10  # swaps in a row
    sigterm_rate: float = 1000.0
    slow_clients: int = 50
    churn_s: float = 30.0
    alerts: bool = True  # wait for the alerts each scenario should fire, and resolve
    timing: bool = True  # latency checks (off in the default test run: no wall-clock
    # assertions on a shared CI machine; the short suite checks answers, alerts, memory)


Scenario = Callable[[Stack, Record, Plan, Bodies], Awaitable[None]]


def _no_failures(rec: Record, t0: float = 0.0, t1: float = float("inf")) -> None:
    kinds = rec.kinds(t0, t1)
    bad = {k: n for k, n in kinds.items() if k in ("conn_error", "timeout", "not_ready")
           or k.startswith("http_")}  # fmt: skip
    rec.check("every request answered 200 (no 5xx, no connection error)", not bad,
              f"{sum(kinds.values())} sent, {bad or 'no failures'}")  # fmt: skip


async def _in_background(load: Load, plan: Plan, seconds: float, bodies: Bodies) -> asyncio.Task:
    return asyncio.create_task(load.run(plan.rate, seconds, bodies.mixed_body))


def _until(load: Load, plan: Plan, bodies: Bodies, stop: asyncio.Event) -> asyncio.Task:
    """The steady load, in one-second schedules, until `stop` is set."""

    async def steady() -> None:
        while not stop.is_set():
            await load.run(plan.rate, 1.0, bodies.mixed_body)

    return asyncio.create_task(steady())


async def _wait_alert(stack: Stack, rec: Record, name: str, firing: bool, timeout: float) -> bool:
    prom = stack.prometheus
    if prom is None:
        return False
    deadline = time.monotonic() + timeout
    want = "firing" if firing else None
    while time.monotonic() < deadline:
        if prom.alerts().get(name) == want:
            rec.event(f"{name} {'firing' if firing else 'resolved'}")
            return True
        await asyncio.sleep(0.5)
    return False


# ------------------------------------------------------------------ scenarios


async def redis_killed(stack: Stack, rec: Record, plan: Plan, bodies: Bodies) -> None:
    """Redis killed (SIGKILL) under load, restarted empty, the bundle republished."""
    load, stop = Load(stack.port, rec), asyncio.Event()
    task = _until(load, plan, bodies, stop)
    await asyncio.sleep(plan.phase_s)
    assert stack.redis.proc is not None
    stack.redis.proc.kill()
    stack.redis.proc.wait()
    stack.redis.proc = None
    rec.event("redis killed")
    fired = await _wait_alert(stack, rec, "GrefRedisBreakerOpen", True, 20) \
        if plan.alerts else None  # fmt: skip
    await asyncio.sleep(max(0.0, 2 * plan.phase_s - rec.now()))
    await asyncio.to_thread(stack.redis.start)
    rec.event("redis restarted (empty)")
    await asyncio.to_thread(stack.publish)
    rec.event("bundle republished")
    resolved = await _wait_alert(stack, rec, "GrefRedisBreakerOpen", False, 30) \
        if plan.alerts else None  # fmt: skip
    await asyncio.sleep(plan.phase_s)
    stop.set()
    await task
    load.close()
    _no_failures(rec)
    if plan.alerts:
        rec.check("GrefRedisBreakerOpen fires, then resolves (Prometheus /api/v1/alerts)",
                  bool(fired and resolved), f"fired {fired}, resolved {resolved}")  # fmt: skip
    rec.check("the breaker is closed again", stack.readiness()["redis"] == "closed",
              str(stack.readiness()["redis"]))  # fmt: skip


async def redis_slow(stack: Stack, rec: Record, plan: Plan, bodies: Bodies) -> None:
    """Redis slowed: DEBUG SLEEP (the server blocks) and CLIENT PAUSE (it holds clients)."""
    import redis

    client = redis.Redis.from_url(stack.redis.url)
    load = Load(stack.port, rec)
    task = await _in_background(load, plan, 3 * plan.phase_s, bodies)
    await asyncio.sleep(plan.phase_s)
    for _ in range(3):
        rec.event("DEBUG SLEEP 0.5")
        await asyncio.to_thread(client.execute_command, "DEBUG", "SLEEP", "0.5")
        await asyncio.sleep(0.5)
    rec.event("CLIENT PAUSE 3000")
    await asyncio.to_thread(client.execute_command, "CLIENT", "PAUSE", "3000", "ALL")
    await task
    load.close()
    client.close()
    _no_failures(rec)
    late = rec.latencies()
    over = int((late > plan.budget_ms / 1000 + 0.05).sum())
    if plan.timing:
        rec.check("no answer later than budget + 50 ms", over == 0,
                  f"{over} of {late.size}; p99 {p99_ms(late):.1f} ms")  # fmt: skip


async def overload(stack: Stack, rec: Record, plan: Plan, bodies: Bodies) -> None:
    """A step from the steady rate to 3x the measured saturation and back."""
    saturation = await closed_loop(stack.port, min(plan.phase_s, 10), bodies.catalogue_body)
    rec.notes.append(f"saturation (closed loop, 16 connections): {saturation:.0f} model "
                     "answers/s")  # fmt: skip
    rss_before = stack.rss_mb
    load = Load(stack.port, rec, max_conns=1024)
    rec.event(f"steady {plan.rate:.0f} req/s")
    await load.run(plan.rate, plan.phase_s, bodies.catalogue_body)
    t_step = rec.now()
    rec.event(f"step to {3 * saturation:.0f} req/s (3x saturation)")
    await load.run(3 * saturation, plan.overload_s, bodies.catalogue_body)
    t_back = rec.now()
    rec.event(f"back to {plan.rate:.0f} req/s")
    await load.run(plan.rate, plan.phase_s, bodies.catalogue_body)
    load.close()
    during = rec.kinds(t_step, t_back)
    model_rate = during.get("model", 0) / (t_back - t_step)  # until the last answer came
    rec.check(
        "model answers/s at 3x saturation >= 80% of saturation",
        model_rate >= 0.8 * saturation,
        f"{model_rate:.0f}/s vs saturation {saturation:.0f}/s; answers {during}",
    )
    lost = failures(during) + during.get("timeout", 0)
    rec.check("every request answered (model, degraded or a fast 503)", lost == 0,
              f"{lost} unanswered")  # fmt: skip
    lat = rec.latencies(t_step, t_back, ("model", "budget", "overload", "cache"))
    over = int((lat > plan.budget_ms / 1000 + 0.05).sum())
    rec.check("no answer after budget + 50 ms", over == 0, f"{over} of {lat.size}")
    shed = rec.latencies(t_step, t_back, ("shed",))
    rec.check("p99 of the shed answers <= 5 ms", shed.size > 0 and p99_ms(shed) <= 5,
              f"{shed.size} shed, p99 {p99_ms(shed):.1f} ms")  # fmt: skip
    rss_after = stack.rss_mb
    rec.check("RSS within 10% of its pre-load value after", rss_after <= 1.1 * rss_before,
              f"{rss_before:.0f} -> {rss_after:.0f} MB")  # fmt: skip
    normal = p99_ms(rec.latencies(0, t_step))
    after = p99_ms(rec.latencies(t_back + 2, float("inf")))
    rec.check("p99 back to normal within 2 s of the load dropping",
              after <= max(1.5 * normal, normal + 5), f"{normal:.1f} ms before, "
              f"{after:.1f} ms from 2 s after")  # fmt: skip


async def bundle_swaps(stack: Stack, rec: Record, plan: Plan, bodies: Bodies) -> None:
    """Rollouts under load: a version with a corrupt file, a `latest` naming a missing
    directory, the same version rebuilt, a new version, then `swaps` new versions in a
    row. None may fail a request; the memory of a retired engine must come back."""
    errors0 = stack.counter("rerank_bundle_reloads_total", result="error")
    ok0 = stack.counter("rerank_bundle_reloads_total", result="ok")
    load, stop = Load(stack.port, rec), asyncio.Event()
    task = _until(load, plan, bodies, stop)
    await asyncio.sleep(2)

    async def settle(ok: float, errors: float) -> None:
        deadline = time.monotonic() + 120
        while (stack.counter("rerank_bundle_reloads_total", result="ok") < ok0 + ok
               or stack.counter("rerank_bundle_reloads_total", result="error")
               < errors0 + errors):  # fmt: skip
            assert time.monotonic() < deadline, "the reload did not happen"
            await asyncio.sleep(0.2)

    broken = stack.new_version("swap-corrupt")
    (broken / "decoder.onnx").write_bytes(b"not a graph")
    point_latest(stack.artifacts, "swap-corrupt")
    rec.event("latest -> a version with a corrupt decoder.onnx")
    await settle(0, 1)
    point_latest(stack.artifacts, "swap-missing")
    rec.event("latest -> a directory that does not exist")
    await settle(0, 2)
    fired = await _wait_alert(stack, rec, "GrefBundleReloadFailed", True, 30) \
        if plan.alerts else None  # fmt: skip
    stack.new_version("swap-same", version=stack.version)
    point_latest(stack.artifacts, "swap-same")
    rec.event("latest -> the same version, rebuilt")
    await settle(1, 2)
    info_same = _model_info(stack)
    rss: list[float] = []
    for i in range(plan.swaps + 1):
        stack.new_version(f"swap-{i}")
        point_latest(stack.artifacts, f"swap-{i}")
        await settle(2 + i, 2)
        await asyncio.sleep(1)  # the old engine retired
        rss.append(stack.rss_mb)
        rec.event(f"swapped to swap-{i}: RSS {rss[-1]:.0f} MB")
    stop.set()
    await task
    load.close()
    _no_failures(rec)
    rec.check(
        "a corrupt version and a missing directory: 2 failed reloads counted",
        stack.counter("rerank_bundle_reloads_total", result="error") - errors0 == 2,
        f"{stack.counter('rerank_bundle_reloads_total', result='error') - errors0:.0f}",
    )
    if plan.alerts:
        rec.check("GrefBundleReloadFailed fires", bool(fired), str(fired))
    rec.check("rerank_model_info names the same version after its rebuild",
              info_same == {stack.version: 1.0}, str(info_same))  # fmt: skip
    rec.check(
        f"RSS after {plan.swaps} more swaps within 10% of RSS after the first",
        rss[-1] <= 1.1 * rss[0],
        " -> ".join(f"{r:.0f}" for r in rss) + " MB",
    )


def _model_info(stack: Stack) -> dict[str, float]:
    return {dict(labels)["version"]: v for (name, labels), v in stack.metrics().items()
            if name == "rerank_model_info"}  # fmt: skip


async def slow_uploads(stack: Stack, rec: Record, plan: Plan, bodies: Bodies) -> None:
    """Clients that upload their body slowly (a tenth every 0.1 s) and clients whose body
    never finishing: first alone (so rerank_late_responses_total counts only them), then
    beside the steady load; each time their starts spread over a second. (Each upload
    takes a second, twenty budgets: counted from the head, every one would be late. Fifty
    bodies completing in the same millisecond would instead be a burst past what can start
    within the budget, late or answered 503 by the door: the 3x step tests bursts, this
    tests uploads.)"""

    async def upload(body: bytes, finish: bool, start_s: float = 0.0) -> str:
        await asyncio.sleep(start_s)
        reader, writer = await asyncio.open_connection(HOST, stack.port)
        raw = (f"POST /v1/rerank HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json"
               f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        writer.write(raw)
        part = len(body) // 10
        for i in range(10 if finish else 5):
            writer.write(body[i * part : (i + 1) * part if i < 9 else len(body)])
            await asyncio.sleep(0.1)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2 * plan.phase_s)
            status = head.split()[1].decode()
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
            status = "none"
        writer.close()
        return status

    async def uploaders(spread_s: float) -> tuple[list[str], list[str]]:
        body, n = bodies.catalogue_body(), plan.slow_clients
        starts = [spread_s * i / n for i in range(n)]
        out = await asyncio.gather(*(upload(body, True, s) for s in starts),
                                   *(upload(body, False, s) for s in starts))  # fmt: skip
        return list(out[:n]), list(out[n:])

    late0 = stack.counter("rerank_late_responses_total")
    rec.event(f"alone: {plan.slow_clients} slow uploaders, {plan.slow_clients} never finishing")
    slow, never = await uploaders(1.0)
    late = stack.counter("rerank_late_responses_total") - late0
    load = Load(stack.port, rec)
    task = await _in_background(load, plan, 2 * plan.phase_s, bodies)
    await asyncio.sleep(1)
    rec.event("the same beside the steady load")
    slow2, never2 = await uploaders(1.0)
    await task
    load.close()
    _no_failures(rec)
    rec.check("slow uploaders answered 200", set(slow + slow2) == {"200"},
              str(sorted(set(slow + slow2))))  # fmt: skip
    rec.check(
        "slow uploads are not counted late (the budget starts once the body arrived)",
        late == 0,
        f"{late:.0f} late answers of {plan.slow_clients} slow uploads",
    )
    rec.check("a body that never finishes is answered 408", set(never + never2) == {"408"},
              str(sorted(set(never + never2))))  # fmt: skip
    steady = rec.latencies(kinds=("model",))
    if plan.timing:
        rec.check("the steady load's p99 stays within its budget",
                  p99_ms(steady) <= plan.budget_ms, f"p99 {p99_ms(steady):.1f} ms")  # fmt: skip


async def id_churn(stack: Stack, rec: Record, plan: Plan, bodies: Bodies) -> None:
    """Every request with never-seen ids (30 a request), far beyond the L1's size."""
    l1_mb = int(stack.config.env.get("RERANK_L1_CACHE_BYTES", str(64 << 20))) / 2**20
    rss0 = stack.rss_mb
    wb_error0 = stack.counter("rerank_embedding_writebacks_total", result="error")
    load = Load(stack.port, rec)
    rec.event(f"{plan.rate:.0f} req/s of never-seen ids (L1 {l1_mb:.0f} MiB)")
    await load.run(plan.rate, plan.churn_s, bodies.fresh_body)
    load.close()
    _no_failures(rec)
    distinct = int(plan.rate * plan.churn_s * bodies.m)
    rec.notes.append(f"{distinct} distinct ids sent")
    rss1 = stack.rss_mb
    rec.check("RSS growth within 1.5x the L1 setting + 50 MB", rss1 - rss0 <= 1.5 * l1_mb + 50,
              f"{rss0:.0f} -> {rss1:.0f} MB")  # fmt: skip
    errors = stack.counter("rerank_embedding_writebacks_total", result="error") - wb_error0
    rec.check("no write-back fails", errors == 0, f"{errors:.0f} failed write-backs")


async def sigterm(stack: Stack, rec: Record, plan: Plan, bodies: Bodies) -> None:
    """SIGTERM under load, the client stopping once readiness fails (a load balancer)."""
    load = Load(stack.port, rec, max_conns=1024)
    unready = {"t": None}

    async def watch() -> None:
        while True:
            try:
                ready = await asyncio.to_thread(stack.ready)
            except Exception:
                ready = False
            if not ready:
                unready["t"] = rec.now()
                rec.event("readiness failed: the client stops sending")
                return
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    task = asyncio.create_task(
        load.run(
            plan.sigterm_rate,
            4 * plan.phase_s,
            bodies.catalogue_body,
            stop_sending=lambda: unready["t"] is not None,
        )
    )
    await asyncio.sleep(plan.phase_s / 2)
    assert stack.service is not None
    stack.service.send_signal(15)
    t_term = rec.now()
    rec.event("SIGTERM")
    await task
    await watcher
    load.close()
    code = await asyncio.to_thread(stack.service.wait, 120)
    rec.event(f"the service exited ({code})")
    kinds = rec.kinds()
    errors = kinds.get("conn_error", 0) + kinds.get("timeout", 0)
    rec.check("0 connection errors for a client that stops once readiness fails",
              errors == 0, f"{kinds}")  # fmt: skip
    waited = (unready["t"] or float("inf")) - t_term
    rec.check("readiness fails within 1 s of SIGTERM", waited <= (1.0 if plan.timing else 30),
              f"{waited:.2f} s")  # fmt: skip
    rec.check("the service exits cleanly after its drain", code in (0, -15), str(code))


async def sweep_probe(stack: Stack, rec: Record, plan: Plan, bodies: Bodies) -> None:
    """A plain load at the steady rate: the reference the other scenarios compare with."""
    load = Load(stack.port, rec)
    await load.run(plan.rate, plan.phase_s, bodies.catalogue_body)
    load.close()
    _no_failures(rec)
    lat = rec.latencies()
    if plan.timing:
        rec.check("p99 within the budget", p99_ms(lat) <= plan.budget_ms, f"{p99_ms(lat):.1f} ms")


SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "steady": ("Steady load (reference)", sweep_probe),
    "redis_killed": ("Redis killed and restarted under load", redis_killed),
    "redis_slow": ("Redis slowed (DEBUG SLEEP, CLIENT PAUSE)", redis_slow),
    "overload": ("A step to 3x saturation and back", overload),
    "bundle_swaps": ("Bundle swaps under load", bundle_swaps),
    "slow_uploads": ("Slow and never-finishing uploads", slow_uploads),
    "id_churn": ("Id churn far beyond the L1 size", id_churn),
    "sigterm": ("SIGTERM under load", sigterm),  # last: it stops the service
}
