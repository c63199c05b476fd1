"""`python -m model results --quick`: the whole offline pipeline, small, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.results import EVALS, GREF, METRICS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    proc = subprocess.run(
        [sys.executable, "-m", "model", "results", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Table 1" in proc.stdout
    return out


def test_results_files_and_tables(quick_results: Path) -> None:
    summary = json.loads((quick_results / "results.json").read_text())
    for label, *_ in EVALS:
        row = summary["models"][label]
        for metric in METRICS:
            assert np.isfinite(row[metric]["mean"]), (label, metric)
        assert 0.0 <= row["auc"]["mean"] <= 1.0
        assert 0.0 <= row["ndcg@10"]["mean"] <= 1.0
        assert row["utility"]["mean"] > 0
    md = (quick_results / "results.md").read_text()
    for title in ("Table 1", "Table 3a", "Table 3b", "Table 3c", "Headroom"):
        assert title in md
    for png in ("utility_by_model.png", "utility_vs_latency.png", "training_curves.png"):
        data = (quick_results / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


def test_results_are_consistent(quick_results: Path) -> None:
    s = json.loads((quick_results / "results.json").read_text())["models"]
    # one model decoded with n = 4 is the same row in every table that names it
    assert s["n = 4"]["utility"] == s[GREF]["utility"]
    assert s["n = 4, heads not aligned"]["utility"] == s["Pre-train + DPO"]["utility"]
    assert s["L_n + L_o"]["ndcg@10"] == s["Pre-train + DPO"]["ndcg@10"]
    # passes: ceil(10 / n) for the generative model, one for NAR4Rec, none for scorers
    assert [s[f"n = {n}"]["passes"]["mean"] for n in (1, 2, 4)] == [10, 5, 3]
    assert s["NAR4Rec-like"]["passes"]["mean"] == 1
    assert s["DNN"]["passes"]["mean"] == 0
    # every reranker reorders the same exposures: clicks@10 is the total and equal for all
    totals = {round(s[label]["clicks@10"]["mean"], 9) for label, *_ in EVALS}
    assert len(totals) == 1
    # the world has headroom: the searched list beats the pointwise sort
    room = json.loads((quick_results / "results.json").read_text())["headroom"]
    assert room["searched"] > room["pointwise_relevance"] > room["upstream"]
    gold = json.loads((quick_results / "results.json").read_text())["logged_vs_gold"]
    assert gold["best under the true user model"]["utility"] > gold["logging order"]["utility"]
    assert "What the logged NDCG rewards" in (quick_results / "results.md").read_text()


def test_checkpoints_are_safetensors(quick_results: Path) -> None:
    files = list((quick_results / "runs").rglob("*"))
    assert any(f.name == "model.safetensors" for f in files)
    assert not [f for f in files if f.suffix in (".pt", ".pth", ".pkl", ".pickle")]
