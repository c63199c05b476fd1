"""`pytest -m bench -s tests/bench/test_bench_load.py`: a short run of the load benchmark of
tests/bench/bench_load.py (micro-batching, adaptive decoding, overload). Prints its tables;
asserts only that it ran: every section printed, figures present, the plot drawn, every
request of the schedules accounted for. No latency or throughput is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.bench_load import SECTIONS, LoadConfig, run


@pytest.mark.bench
def test_load_benchmark_short(tmp_path: Path) -> None:
    png = tmp_path / "policy.png"
    cfg = LoadConfig(duration_s=1.0, warmup_s=0.5, n_requests=200, fractions=(0.5, 1.3), out=png)
    text, figures = run(cfg)
    print()
    print(text)
    for heading in ("== micro-batching", "== load-adaptive decoding", "== overload",
                    "goals:", "timeline"):  # fmt: skip
        assert heading in text
    assert set(SECTIONS) <= set(figures)
    closed = figures["batching"]["closed"]
    assert closed["batched"]["max_rps"] > 0 and closed["one_per_call"]["max_rps"] > 0
    runs = figures["policy"]["runs"]
    assert {(r["policy"], r["fraction"]) for r in runs} == {
        (p, f) for p in ("adaptive", "fixed") for f in cfg.fractions
    }
    assert all(r["utility"] > 0 and r["foreign"] == 0 for r in runs)
    assert png.is_file() and png.stat().st_size > 0
    over = figures["overload"]
    assert over["sent"] == sum(p["sent"] for p in over["phases"]) > 0
    assert over["met"]["up"], "the service went down under the step load"
