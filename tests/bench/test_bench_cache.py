"""`pytest -m bench -s tests/bench/test_bench_cache.py`: a short run of
tests/bench/bench_cache.py (also runnable as a script). Prints its table; asserts only that
every case was measured."""

from __future__ import annotations

import pytest

from tests.bench.bench_cache import run, table


@pytest.mark.bench
def test_cache_benchmark() -> None:
    results = run(calls=20, rounds=2)
    print()
    print(table(results))
    assert len(results) == 4 and all(r["wall_ratio"] > 0 for r in results.values())
