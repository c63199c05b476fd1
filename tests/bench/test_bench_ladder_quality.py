"""tests/bench/bench_ladder_quality.py: the engine-time table on a tiny random bundle (every
level, every m), and its refusal to tune on a held-out world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.build import build_bundle
from export.config import ExportConfig
from tests.bench.bench_ladder_quality import LEVELS, main
from tests.support.bundle import make_checkpoint
from tests.support.tiny import tiny_config


def test_a_held_out_seed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="held-out"):
        main(["--results", str(tmp_path), "--seeds", "100"])


@pytest.mark.bench
def test_engine_time_per_level_short(tmp_path: Path) -> None:
    cfg = tiny_config(max_candidates=256, max_steps=64, omtp_heads=4)
    make_checkpoint(tmp_path / "ckpt", cfg=cfg)
    build_bundle(tmp_path / "ckpt", tmp_path / "artifacts", ExportConfig(label="bench"))
    out = tmp_path / "figures.json"
    argv = ["--bundle", str(tmp_path / "artifacts"), "--reps", "3", "--warmup", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    cost = json.loads(out.read_text())["cost"]
    assert list(cost["by_m"]) == ["30", "100", "200"]
    for row in cost["by_m"].values():
        assert list(row) == [name for name, _, _ in LEVELS]
        assert all(0 < v["p50_ms"] <= v["p90_ms"] for v in row.values())
