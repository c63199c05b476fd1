"""Prometheus metrics in multiprocess mode (several uvicorn workers), in a subprocess:
PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
from prometheus_client.parser import text_string_to_metric_families
from service.lifecycle import unlabel_model
from service.metrics import Metrics

metrics = Metrics()
metrics.model_info.labels(version="v1", label="x", created="t").set(1)
metrics.model_info.labels(version="v2", label="x", created="t").set(1)  # the swap
unlabel_model(metrics, ("v1", "x", "t"))
text = metrics.render()[0].decode()
for family in text_string_to_metric_families(text):
    for s in family.samples:
        if s.name == "rerank_model_info":
            print(s.labels["version"], s.value)
"""


def test_a_retired_bundle_reads_0_in_model_info_with_several_workers(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    values = dict(line.split() for line in out.stdout.splitlines())
    assert values == {"v1": "0.0", "v2": "1.0"}, out.stdout


DEAD_WORKER = """
from service.metrics import Metrics
m = Metrics()
m.inflight.inc(7)
m.breaker_open.set(1)
m.ready.set(1)
m.late.inc(3)
"""

LIVE_SCRAPE = """
from prometheus_client.parser import text_string_to_metric_families
from service.metrics import Metrics
m = Metrics()
m.ready.set(1)
for family in text_string_to_metric_families(m.render()[0].decode()):
    for s in family.samples:
        if s.name in ("rerank_inflight_requests", "rerank_redis_breaker_open", "rerank_ready",
                      "rerank_late_responses_total"):
            print(s.name, s.value)
"""


def test_a_dead_workers_live_gauges_leave_the_scrape_and_its_counts_stay(tmp_path: Path) -> None:
    """A worker that died (and was replaced) must not keep its in-flight count, its open
    breaker or its readiness in every scrape; what it counted still happened."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    subprocess.run([sys.executable, "-c", DEAD_WORKER], env=env, timeout=60, check=True)
    assert any(p.name.startswith("gauge_livesum_") for p in tmp_path.iterdir())
    out = subprocess.run([sys.executable, "-c", LIVE_SCRAPE], env=env, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    values = {name: float(v) for name, v in (line.split() for line in out.stdout.splitlines())}
    want = {"rerank_inflight_requests": 0.0, "rerank_redis_breaker_open": 0.0,
            "rerank_ready": 1.0, "rerank_late_responses_total": 3.0}  # fmt: skip
    assert values == want, out.stdout
