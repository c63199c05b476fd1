"""`pytest -m bench -s tests/bench/test_bench_admission.py`: a short run of
tests/bench/bench_admission.py. Prints its figures; asserts only that it ran and that
every request of the schedule is accounted for. No latency or throughput is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.bench_admission import AdmissionBench, run


@pytest.mark.bench
def test_admission_benchmark_short(tmp_path: Path) -> None:
    png = tmp_path / "admission.png"
    cfg = AdmissionBench(base_s=2.0, step_s=4.0, after_s=3.0, saturation_s=2.0, tight_s=2.0,
                         n_requests=200, out=png)  # fmt: skip
    text, figures = run(cfg)
    print()
    print(text)
    step = figures["steps"]["admission on"]
    kinds = step["model"] + step["degraded"] + step["shed"] + step["unanswered"]
    assert step["sent"] == kinds > 0
    assert step["reference_rps"] > 0
    assert figures["tight"]["sent"] > 0
    assert png.is_file() and png.stat().st_size > 0
