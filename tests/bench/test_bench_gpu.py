"""`pytest -m bench -s tests/bench/test_bench_gpu.py`: a short run of the CPU vs GPU engine
benchmark of tests/bench/bench_gpu.py. Without the CUDA execution provider it checks only
that the script says so and succeeds (exit 0), as `make bench` relies on."""

from __future__ import annotations

import pytest

from tests.bench.bench_gpu import NOT_MEASURED, has_cuda, main, run


@pytest.mark.bench
def test_gpu_benchmark_short(capsys: pytest.CaptureFixture[str]) -> None:
    if not has_cuda():
        assert main([]) == 0
        assert capsys.readouterr().out.strip() == NOT_MEASURED
        return
    text = run(batches=(1, 8, 64), seconds=0.5)
    with capsys.disabled():
        print()
        print(text)
    if text.startswith("GPU: not measured"):  # the provider is listed but did not start
        return
    assert "| batch |" in text and "gpu reranks/s" in text
