"""`pytest -m bench -s tests/bench/test_bench_http.py`: a short run of the HTTP benchmark of
tests/bench/bench_http.py (plain floor, echo and service, every phase). Prints its table;
asserts only correctness: every target answered in every phase, no errors, the
latency-bound search ran its trials, the servers stopped."""

from __future__ import annotations

import pytest

from tests.bench.bench_http import BOUND_TARGETS, TARGETS, HttpPlan, run


@pytest.mark.bench
def test_http_benchmark_short() -> None:
    plan = HttpPlan(duration_s=2.0, warmup_s=1.0, rounds=1, client_check=False,
                    bound_trials=2, bound_duration_s=1.0)  # fmt: skip
    text, report = run(plan=plan)
    print()
    print(text)
    assert set(report.closed) == set(report.open) == set(TARGETS)
    for r in report.results():
        where = f"{r.phase.target}/{r.phase.mode}"
        assert len(r.latencies) > 0, f"{where}: no request answered"
        assert r.errors == 0, f"{where}: {r.errors} errors, first: {r.error_sample}"
        assert r.ok + r.degraded == len(r.latencies), where
    for name in ("plain", "echo"):
        assert report.closed[name].degraded == report.open[name].degraded == 0
    assert set(report.bound) == set(BOUND_TARGETS)
    assert all(len(b.trials) == 2 for b in report.bound.values())
    for heading in ("phase 1: closed loop", "phase 2: open loop", "phase 3: latency-bound",
                    "service / plain throughput", "service / plain: "):  # fmt: skip
        assert heading in text
