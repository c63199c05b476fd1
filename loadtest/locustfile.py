"""Locust users for POST /v1/rerank with production-like traffic (loadtest/traffic.py).

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -u 16 -r 4 -t 60s
    python -m loadtest.run         (starts Redis and the service, runs this, writes a report)

At test start the served bundle's manifest (GET /v1/model) gives the feature schema, so the
requests are valid for whatever bundle is served. Each answer is checked (k distinct ids,
all from the request; a bad request must get 422): a failed check is a locust failure.
Statistics by name: "/v1/rerank" (every valid request, degraded or not), "invalid:<kind>"
(the ~1% deliberately bad ones), and, type DEGRADED, "degraded:<reason>" (an extra event
per degraded answer with its response time: counted, not a failure; locust's Aggregated
row therefore counts a degraded answer twice).

Environment (python -m loadtest.run sets them):
    LOADTEST_SHAPE      steady | step | spike (loadtest/shapes.py; reads -u, -r, -t)
    LOADTEST_DURATION   seconds the shape runs (default: -t; neither: steady runs until
                        stopped, step and spike take 300 s)
    LOADTEST_USER_RPS   requests per second per user (constant throughput); 0: no pause
    LOADTEST_CATALOGUE  catalogue size (default 200000); LOADTEST_ZIPF popularity exponent
    LOADTEST_SEED       seed of the traffic (one process: the same requests every run;
                        distributed, each worker draws its own stream of it: see
                        traffic_stream)
    LOADTEST_BREAKDOWN  a JSON file: at the end, every valid answer's degraded reason and
                        stage times by list size (loadtest/breakdown.py; a distributed
                        worker appends .<its stream> to the name)

Imports stay light (locust monkey-patches with gevent): numpy and the standard library.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import gevent
from locust import FastHttpUser, LoadTestShape, constant, constant_throughput, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from loadtest.breakdown import Breakdown
from loadtest.shapes import OPEN_ENDED_S, SHAPES
from loadtest.traffic import RERANK, FeatureSpec, Traffic, TrafficConfig, check_response

_traffic: Traffic | None = None  # one per locust process, built at test start
_breakdown = Breakdown()  # every valid answer's reason and stage times


def traffic_stream(environment: Environment) -> int | None:
    """This process's stream of the traffic seed: None in a single process (the seed's own,
    as ever), a worker's index in a distributed run (its pid when the master gave none).
    With one stream for all, every worker would send the same requests in step: the
    service's caches would see each one N times and report inflated hit rates."""
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):
        return None
    index = getattr(runner, "worker_index", -1)
    return index if isinstance(index, int) and index >= 0 else os.getpid()


def _config(stream: int | None = None) -> TrafficConfig:
    env = os.environ
    base = TrafficConfig()
    return TrafficConfig(
        catalogue=int(env.get("LOADTEST_CATALOGUE", base.catalogue)),
        zipf=float(env.get("LOADTEST_ZIPF", base.zipf)),
        seed=int(env.get("LOADTEST_SEED", base.seed)),
        stream=stream,
    )


@events.test_start.add_listener
def _build_traffic(environment: Environment, **_: Any) -> None:
    """The served bundle's feature schema -> the request generator."""
    global _traffic
    host = (environment.host or "").rstrip("/")
    with urllib.request.urlopen(f"{host}/v1/model", timeout=30) as r:
        manifest = json.loads(r.read())
    _traffic = Traffic(FeatureSpec.from_manifest(manifest), _config(traffic_stream(environment)))


@events.quitting.add_listener
def _last_csv_pass(environment: Environment, **_: Any) -> None:
    """Locust rewrites its CSVs once a second and not at exit: one more pass, so the
    requests that finished during the graceful stop are in them too."""
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)


@events.quitting.add_listener
def _write_breakdown(environment: Environment, **_: Any) -> None:
    """LOADTEST_BREAKDOWN: the answers' reasons and stage times (after the CSV pass above,
    so the requests that finished during the graceful stop are in it)."""
    path = os.environ.get("LOADTEST_BREAKDOWN")
    if not path:
        return
    stream = traffic_stream(environment)
    target = Path(path if stream is None else f"{path}.{stream}")
    target.write_text(json.dumps(_breakdown.to_json(), indent=1) + "\n")


class RerankUser(FastHttpUser):
    """One upstream caller: a request at a time, LOADTEST_USER_RPS per second at most."""

    _rps = float(os.environ.get("LOADTEST_USER_RPS", "10"))
    wait_time = constant_throughput(_rps) if _rps > 0 else constant(0)
    headers = {"content-type": "application/json"}  # noqa: RUF012 - read only

    @task
    def rerank(self) -> None:
        if _traffic is None:
            raise RuntimeError("no traffic: the test_start listener did not run")
        call = _traffic.next()
        with self.client.post(RERANK, data=call.body, headers=self.headers, name=call.name,
                              catch_response=True) as resp:  # fmt: skip
            if not resp.status_code:  # no HTTP answer: locust reports the connection error
                return
            verdict = check_response(call, resp.status_code, resp.content or b"")
            if verdict.error is not None:
                resp.failure(verdict.error)
                return
            resp.success()
            if call.expect == 200:
                _breakdown.add(len(call.item_ids), verdict.degraded, verdict.timings,
                               call.budget_ms)  # fmt: skip
            if verdict.degraded is not None:
                events.request.fire(
                    request_type="DEGRADED",
                    name=f"degraded:{verdict.degraded}",
                    response_time=resp.request_meta["response_time"],
                    response_length=resp.request_meta["response_length"],
                    exception=None,
                    context={},
                )


class _Shape(LoadTestShape):
    """A plan of loadtest/shapes.py over locust's -u, -r and -t."""

    abstract = True
    use_common_options = True
    shape: ClassVar[str] = "steady"

    def tick(self) -> tuple[int, float] | None:
        if self.runner is None:  # set by locust before the first tick
            raise RuntimeError("a shape ticked without its runner")
        opts = self.runner.environment.parsed_options
        users = int(getattr(opts, "num_users", None) or 1)
        rate = float(getattr(opts, "spawn_rate", None) or users)
        # LOADTEST_DURATION (run.py): the shape ends the test gracefully (requests in flight
        # finish and are counted) before -t, a backstop, would cut them short
        duration = float(os.environ.get("LOADTEST_DURATION") or getattr(opts, "run_time", None)
                         or OPEN_ENDED_S[self.shape])  # fmt: skip
        return SHAPES[self.shape](self.get_run_time(), users, rate, duration)


class SteadyShape(_Shape):
    abstract = True
    shape = "steady"


class StepShape(_Shape):
    abstract = True
    shape = "step"


class SpikeShape(_Shape):
    abstract = True
    shape = "spike"


_BY_NAME = {"steady": SteadyShape, "step": StepShape, "spike": SpikeShape}
_shape = os.environ.get("LOADTEST_SHAPE", "steady")
if _shape not in _BY_NAME:
    raise SystemExit(f"LOADTEST_SHAPE={_shape!r}: want one of {sorted(_BY_NAME)}")
# locust runs the first non-abstract LoadTestShape of this module: the chosen one
LoadShape = type("LoadShape", (_BY_NAME[_shape],), {"abstract": False})
