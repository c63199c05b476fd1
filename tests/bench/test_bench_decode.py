"""`pytest -m bench -s tests/bench/test_bench_decode.py`: a short run of the OMTP decode
benchmark of tests/bench/bench_decode.py on a tiny random bundle (n = 4 heads, room for
m = 200). Prints its table; asserts only the run's shape: every m measured, the passes
each variant needs, the figures written. No time is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.build import build_bundle
from export.config import ExportConfig
from tests.bench.bench_decode import VARIANTS, main
from tests.support.bundle import make_checkpoint
from tests.support.tiny import tiny_config


@pytest.mark.bench
def test_decode_benchmark_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(max_candidates=256, max_steps=64, omtp_heads=4)
    make_checkpoint(tmp_path / "ckpt", cfg=cfg)
    build_bundle(tmp_path / "ckpt", tmp_path / "artifacts", ExportConfig(label="bench"))
    out = tmp_path / "figures.json"
    argv = ["--bundle", str(tmp_path / "artifacts"), "--reps", "5", "--warmup", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    with capsys.disabled():
        print()
        print(text)
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert [r["m"] for r in rows] == [30, 100, 200]
    assert [r["bucket"] for r in rows] == [32, 128, 256]
    for r in rows:
        assert r["passes"] == {"gref_n4": 3, "gref_n4_multi": 3, "gref_n1": 10, "nar": 1}
        assert set(r["p50_ms"]) == set(r["p90_ms"]) == set(VARIANTS)
        assert all(v > 0 for v in r["p50_ms"].values())
    assert "RANDOM weights" in figures["setup"]["nar"]
    assert figures["setup"]["n4_path"] == "one call (greedy.onnx)"
    assert text.count("(goal <= 1.5x)") == 3
    assert all("target_met" in r for r in rows)
