"""A real Prometheus runs deploy/prometheus's configuration and alert rules (time
compressed: tests/support/prometheus.py) against a real service: every Grafana panel's
query returns data after a load, and alerts fire in /api/v1/alerts and resolve."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.network import GenReranker
from service.settings import Settings
from tests.support.bodies import make_request
from tests.support.bundle import copy_version, point_latest
from tests.support.prometheus import PrometheusProcess, dashboard_queries, find_prometheus
from tests.support.server import ServerThread, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def stack(
    tiny_bundle: tuple[Path, GenReranker],
    tmp_path: Path,
) -> Iterator[tuple[ServerThread, PrometheusProcess, Path]]:
    binary = find_prometheus()
    if binary is None:
        pytest.skip("prometheus absent: `make test` installs it (apt-get, as root)")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    copy_version(tiny_bundle[0], artifacts, "v1")
    point_latest(artifacts, "v1")
    settings = Settings(bundle=artifacts, reload_interval_s=0.2, max_k=10, warmup=False,
                        default_budget_ms=30_000)  # fmt: skip
    srv = ServerThread(settings, admin=True).start()
    prom = PrometheusProcess(binary, [f"127.0.0.1:{srv.admin_port}"])
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            wait_ready(c)
        prom.start()
        deadline = time.monotonic() + 60
        while not prom.targets_up():
            assert time.monotonic() < deadline, prom.log_tail()
            time.sleep(0.25)
        yield srv, prom, artifacts
    finally:
        prom.stop()
        srv.stop()


def _load(url: str, stop: threading.Event, budget_ms: float | None = None) -> None:
    """Requests one after the other until `stop`: model answers, or with `budget_ms`
    degraded ones; every tenth a 422 (k = 0)."""
    rng = np.random.default_rng(0)
    extra = {} if budget_ms is None else {"budget_ms": budget_ms}
    with httpx.Client(base_url=url, timeout=30) as c:
        n = 0
        while not stop.is_set():
            body = make_request(rng, 20, 5, **extra)
            if n % 10 == 9:
                body["k"] = 0
            c.post("/v1/rerank", json=body)
            n += 1


def test_dashboard_queries_return_data_and_alerts_fire_and_resolve(
    stack: tuple[ServerThread, PrometheusProcess, Path],
    tiny_bundle: tuple[Path, GenReranker],
) -> None:
    srv, prom, artifacts = stack
    stop = threading.Event()
    load = threading.Thread(target=_load, args=(srv.url, stop), daemon=True)
    load.start()
    try:
        time.sleep(8)  # several scrapes of steady traffic
        empty = [(title, expr) for title, exprs in dashboard_queries().items()
                 for expr in exprs if not prom.query(expr)]  # fmt: skip
        assert empty == [], empty
        # a rollout whose `latest` names nothing: GrefBundleReloadFailed fires, then
        # resolves once the 10-minute window (10 s here) has no new failure
        point_latest(artifacts, "v-missing")
        prom.wait_alert("GrefBundleReloadFailed", "firing", timeout=30)
        copy_version(tiny_bundle[0], artifacts, "v2")
        point_latest(artifacts, "v2")
        prom.wait_alert("GrefBundleReloadFailed", None, timeout=60)
    finally:
        stop.set()
        load.join(30)
    # every answer degraded (a budget no request can meet): GrefDegradedRateHigh fires;
    # back to normal traffic, it resolves
    stop = threading.Event()
    load = threading.Thread(target=_load, args=(srv.url, stop, 1e-3), daemon=True)
    load.start()
    try:
        prom.wait_alert("GrefDegradedRateHigh", "firing", timeout=60)
    finally:
        stop.set()
        load.join(30)
    prom.wait_alert("GrefDegradedRateHigh", None, timeout=60)
