"""`python -m model estimators` rewrites the report from saved worlds only (model.results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.results import ResultsConfig, rescore, run


def test_reuse_only_never_trains(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no saved world"):
        run(ResultsConfig.quick(), tmp_path, progress=False, reuse_only=True)
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_rescore_refuses_a_report_whose_worlds_are_not_saved(tmp_path: Path) -> None:
    """A results.json whose worlds are missing is left as it is, not rewritten by training
    them."""
    from dataclasses import asdict

    (tmp_path / "worlds").mkdir()
    report = json.dumps({"config": asdict(ResultsConfig.quick())})
    (tmp_path / "results.json").write_text(report)
    table = rescore(tmp_path)
    assert "no saved world" in table["not_rewritten"] and "rewrote" not in table
    assert (tmp_path / "results.json").read_text() == report
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
