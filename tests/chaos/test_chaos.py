"""The fault suite (`make chaos`, marker `chaos`, not in the default run): every scenario
of tests/support/chaos/scenarios.py against the default bundle with Redis and a real Prometheus,
on loopback, bounded in time (about 10 minutes); report.md and a PNG per scenario in
loadtest/reports/chaos-<time>/. Fails when any scenario's acceptance fails, naming it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.support.chaos.run import ROOT, run_suite
from tests.support.chaos.scenarios import SCENARIOS, Plan
from tests.support.fuzz import fuzz_rerank
from tests.support.prometheus import find_prometheus
from tests.support.server import ServerThread, wait_ready

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

BUNDLE = Path(os.environ.get("GREF_CHAOS_BUNDLE", ROOT / "artifacts"))
OUT = ROOT / "loadtest" / "reports" / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}"


def test_every_fault_scenario_meets_its_acceptance() -> None:
    assert find_prometheus() is not None, "`make chaos` installs prometheus (apt-get, root)"
    records, report = run_suite(BUNDLE, OUT, Plan(), list(SCENARIOS))
    failed = [f"{r.title}: {what} ({measured})" for r in records
              for what, ok, measured in r.checks if not ok]  # fmt: skip
    assert not failed, f"see {report}:\n" + "\n".join(failed)


def test_schemathesis_against_openapi_1000_examples() -> None:
    """1,000 generated bodies against the default bundle's /openapi.json: 0 5xx, 0
    answers outside the schema, at least half answered 200."""
    srv = ServerThread(Settings(bundle=BUNDLE)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            wait_ready(c, timeout=300)
        result = fuzz_rerank(srv.url, examples=1000)
    finally:
        srv.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "schemathesis.md").write_text(
        f"# schemathesis, 1,000 examples, POST /v1/rerank\n\nstatuses: {dict(result.statuses)}"
        f"\n\nviolations: {len(result.violations)}\n\nrefusals (top 10): "
        f"{result.refusals.most_common(10)}\n"
    )
    assert result.sent == 1000
    assert result.server_errors == 0, result.statuses
    assert result.violations == [], result.violations[:10]
    assert result.statuses[200] >= result.sent / 2, (result.statuses, result.refusals)
