"""`python -m model results --quick`: the whole offline pipeline, small, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.cascade import LIST_ESTIMATORS
from model.tables import GREF, GREF_PAPER, METRICS, ROWS, UPSTREAM, competitors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    proc = subprocess.run(
        [sys.executable, "-m", "model", "results", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Table 1" in proc.stdout
    return out


def _summary(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_results_files_and_tables(quick_results: Path) -> None:
    summary = _summary(quick_results)
    small = {r.label for r in ROWS if "d = 64" not in r.label}  # --quick skips the large model
    assert small <= set(summary["models"])
    for label in small:
        row = summary["models"][label]
        for metric in METRICS:
            assert np.isfinite(row[metric]["mean"]), (label, metric)
        assert 0.0 <= row["auc"]["mean"] <= 1.0
        assert 0.0 <= row["ndcg@10"]["mean"] <= 1.0
        assert row["utility"]["mean"] > 0
    md = (quick_results / "results.md").read_text()
    for title in ("Table 1", "Table 2a", "Table 2b", "Table 2c", "Headroom", "Sensitivity"):
        assert title in md
    for png in (
        "utility_by_model.png",
        "utility_vs_latency.png",
        "training_curves.png",
        "paired_differences.png",
    ):
        data = (quick_results / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


def test_per_request_utilities_back_the_paired_table(quick_results: Path) -> None:
    summary = _summary(quick_results)
    world = next(w for w in summary["worlds"] if w["strength"] == "default")
    n = world["n_test"]
    for label, util in world["utility"].items():
        assert len(util) == n, label
        assert np.mean(util) == pytest.approx(world["rows"][label]["utility"], abs=1e-4)
    vs = summary["paired"]["gref_vs"]
    assert set(vs) == set(competitors())
    for label, r in vs.items():
        d = np.asarray(world["utility"][GREF]) - np.asarray(world["utility"][label])
        assert r["diff"] == pytest.approx(d.mean(), abs=1e-4)
        assert r["lo"] <= r["diff"] <= r["hi"]
        assert r["p_holm"] >= r["p"] - 1e-12
    # sensitivity worlds: off and doubled beside default, each with GReF and PRM on U
    assert set(summary["sensitivity"]) == {"off", "default", "doubled"}


def test_results_are_consistent(quick_results: Path) -> None:
    s = _summary(quick_results)["models"]
    # one model decoded with n = 4 is the same row in every table that names it
    assert s["n = 4"]["utility"] == s[GREF_PAPER]["utility"]
    assert s["Pre-train + value"]["utility"] == s[GREF]["utility"]
    assert s["n = 4, heads not aligned"]["utility"] == s["Pre-train + DPO"]["utility"]
    assert s["L_n + L_o"]["ndcg@10"] == s["Pre-train + DPO"]["ndcg@10"]
    # passes: ceil(10 / n) for the generative model, one for NAR4Rec, none for scorers
    assert [s[f"n = {n}"]["passes"]["mean"] for n in (1, 2, 4)] == [10, 5, 3]
    assert s["NAR4Rec-like"]["passes"]["mean"] == 1
    assert s["DNN"]["passes"]["mean"] == 0
    # every reranker reorders the same exposures: clicks@10 is the total and equal for all
    totals = {round(v["clicks@10"]["mean"], 9) for v in s.values()}
    assert len(totals) == 1
    summary = _summary(quick_results)
    room = summary["headroom"]
    assert room["searched"] > room["pointwise_relevance"] > room["upstream"]
    # upstream is the zero of the headroom share, the searched list its one
    share = summary["headroom_share"]
    assert share[UPSTREAM] == pytest.approx(0.0, abs=1e-3)
    assert share["oracle: searched"] == pytest.approx(1.0)
    gold = summary["logged_vs_gold"]
    assert gold["best under the true user model"]["utility"] > gold["logging order"]["utility"]
    assert "What the offline metrics reward" in (quick_results / "results.md").read_text()
    for metric in ("cascade_dm", "cascade_dr", "list_ips", "ips", "ndcg@10"):
        assert -1.0 <= summary["agreement"][metric] <= 1.0
    for order in gold.values():
        assert np.isfinite(order["cascade_dm"]) and np.isfinite(order["cascade_dr"])


def test_the_estimators_command_rescores_the_saved_lists(quick_results: Path) -> None:
    """`python -m model estimators` scores the saved worlds' lists again, without
    retraining, to the figures the results run reported, and writes results.json and
    results.md again from the saved worlds (a stale report is replaced)."""
    before = _summary(quick_results)
    stale = dict(before, agreement={})
    (quick_results / "results.json").write_text(json.dumps(stale))
    (quick_results / "results.md").write_text("stale\n")
    runs = sorted(p.stat().st_mtime for p in (quick_results / "runs").rglob("*.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "model", "estimators", "--out", str(quick_results)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(proc.stdout)
    summary = _summary(quick_results)
    for metric in (*LIST_ESTIMATORS, "list_ips", "ndcg@10"):
        assert table["agreement"][metric] == pytest.approx(before["agreement"][metric])
        assert summary["agreement"][metric] == pytest.approx(before["agreement"][metric])
    for order, vals in before["logged_vs_gold"].items():
        for name in LIST_ESTIMATORS:
            assert table["logged_vs_gold"][order][name] == pytest.approx(vals[name])
    assert summary["models"][GREF]["utility"] == before["models"][GREF]["utility"]
    md = (quick_results / "results.md").read_text()
    assert "What the offline metrics reward" in md and "Table 1" in md
    est = (quick_results / "estimators.md").read_text()
    assert "Kendall τ" in est and str(table["worlds"][0]) in est
    assert json.loads((quick_results / "estimators.json").read_text())["worlds"] == table["worlds"]
    assert sorted(p.name for p in (quick_results / "worlds").glob("*.orders.npz"))
    # nothing retrained
    after = sorted(p.stat().st_mtime for p in (quick_results / "runs").rglob("*.safetensors"))
    assert after == runs


def test_checkpoints_are_safetensors(quick_results: Path) -> None:
    files = list((quick_results / "runs").rglob("*"))
    assert any(f.name == "model.safetensors" for f in files)
    assert not [f for f in files if f.suffix in (".pt", ".pth", ".pkl", ".pickle")]
