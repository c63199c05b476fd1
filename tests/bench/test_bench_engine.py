"""`pytest -m bench -s tests/bench`: the decode benchmark of tests/bench/bench_engine.py
(also runnable as a script). Prints its table; asserts only that the lists agree."""

from __future__ import annotations

import pytest

from tests.bench.bench_engine import run


@pytest.mark.bench
def test_decode_benchmark() -> None:
    print()
    print(run(iters=300, warmup=30))
