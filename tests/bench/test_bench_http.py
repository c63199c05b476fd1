"""`pytest -m bench -s tests/bench/test_bench_http.py`: a short run of the HTTP benchmark of
tests/bench/bench_http.py (service and echo, both phases). Prints its table; asserts only
correctness: both targets answered in every phase, no errors, the servers stopped."""

from __future__ import annotations

import pytest

from tests.bench.bench_http import run


@pytest.mark.bench
def test_http_benchmark_short() -> None:
    text, report = run(duration_s=2.0, warmup_s=1.0, rounds=1, client_check=False)
    print()
    print(text)
    assert set(report.closed) == set(report.open) == {"echo", "service"}
    for r in report.results():
        where = f"{r.phase.target}/{r.phase.mode}"
        assert len(r.latencies) > 0, f"{where}: no request answered"
        assert r.errors == 0, f"{where}: {r.errors} errors, first: {r.error_sample}"
        assert r.ok + r.degraded == len(r.latencies), where
    assert report.closed["echo"].degraded == report.open["echo"].degraded == 0
    for heading in ("phase 1: closed loop", "phase 2: open loop", "service / echo throughput"):
        assert heading in text
