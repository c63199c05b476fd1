"""A short fault suite in the default test run: the tiny bundle, a small load, Redis
killed and restarted (the breaker alert fires and resolves in a real Prometheus), bundle
swaps (a corrupt version, a missing directory, the same version, new ones: no failed
request, RSS bounded), id churn and SIGTERM (no connection error for a client that stops
once readiness fails). No latency assertions here: answers, alerts and memory only."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.network import GenReranker
from tests.support.chaos.run import run_suite
from tests.support.chaos.scenarios import Plan
from tests.support.prometheus import find_prometheus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHORT = Plan(rate=40, phase_s=3, swaps=3, sigterm_rate=100, churn_s=3, timing=False)


def test_short_fault_suite(tiny_bundle: tuple[Path, GenReranker], tmp_path: Path) -> None:
    if find_prometheus() is None:
        pytest.skip("prometheus absent: `make test` installs it (apt-get, as root)")
    records, report = run_suite(
        tiny_bundle[0], tmp_path / "report", SHORT,
        ["redis_killed", "bundle_swaps", "id_churn", "sigterm"],
        {"RERANK_RELOAD_INTERVAL_S": "0.2", "RERANK_MAX_K": "10", "RERANK_WARMUP": "false"},
    )  # fmt: skip
    failed = [f"{r.title}: {what} ({measured})" for r in records
              for what, ok, measured in r.checks if not ok]  # fmt: skip
    assert not failed, report.read_text()
    assert (tmp_path / "report" / "bundle_swaps.png").stat().st_size > 0
