"""Every metric a dashboard panel or an alert names is a series the real app exports: a
real uvicorn serves a few ok, degraded and refused requests, and its /metrics is read."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.network import GenReranker
from service.settings import Settings
from tests.support.bodies import make_request
from tests.support.ops import alert_exprs, dashboard_exprs, unknown_names
from tests.support.server import ServerThread, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(tiny_bundle: tuple[Path, GenReranker]) -> set[str]:
    """The series names of /metrics after a few served, degraded and refused requests."""
    settings = Settings(bundle=tiny_bundle[0], max_k=10, default_budget_ms=30_000)
    rng = np.random.default_rng(0)
    server = ServerThread(settings).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            wait_ready(client)
            for m in (5, 12, 30):
                assert client.post("/v1/rerank", json=make_request(rng, m, 4)).status_code == 200
            slow = client.post("/v1/rerank", json=make_request(rng, 9, 3, budget_ms=1e-3))
            assert slow.json()["degraded"]
            assert client.post("/v1/rerank", content=b"{}").status_code == 422
            text = client.get("/metrics").text
    finally:
        server.stop()
    families = list(text_string_to_metric_families(text))
    return {sample.name for family in families for sample in family.samples}


def test_every_dashboard_query_reads_exported_series(exported: set[str]) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    assert unknown_names(exprs, exported) == {}


def test_every_alert_reads_exported_series(exported: set[str]) -> None:
    assert unknown_names(alert_exprs(), exported) == {}
    assert "rerank_redis_breaker_open" in exported and "rerank_model_info" in exported
