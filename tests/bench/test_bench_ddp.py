"""`pytest -m bench -s tests/bench/test_bench_ddp.py`: a short run of the data-parallel
training benchmark of tests/bench/bench_ddp.py (a tiny log, one epoch, one repetition).
Prints its table; asserts only the run's shape: every variant measured, the figures and
the plot written. No speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.bench_ddp import REFERENCE, VARIANTS, main


@pytest.mark.bench
def test_ddp_benchmark_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "figures.json", tmp_path / "ddp.png"
    argv = ["--rows", "1024", "--valid", "512", "--epochs", "1", "--reps", "1"]
    assert main([*argv, "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    with capsys.disabled():
        print()
        print(text)
    figures = json.loads(out.read_text())
    assert set(figures["median"]) == set(VARIANTS)
    assert all(v > 0 for v in figures["median"].values())
    assert f"| {REFERENCE} |" in text and png.stat().st_size > 0
