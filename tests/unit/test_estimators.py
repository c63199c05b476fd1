"""Debiased offline estimators (model.estimators) and paired statistics (model.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from model.data import ListBatch
from model.estimators import (
    examination_propensities,
    kendall_tau,
    list_ips,
    rerank_ips,
)
from model.stats import holm, paired, pooled


def _pbm_logs(n: int, p: np.ndarray, r: np.ndarray, seed: int = 0) -> ListBatch:
    """Logs from a position-based model: candidate j (upstream rank j) has relevance r_j,
    the logger shows a random permutation of the first K candidates, a click happens with
    p_t · r_j at slot t."""
    rng = np.random.default_rng(seed)
    K, M = p.size, r.size
    exposed = np.argsort(rng.random((n, M))[:, :K] + 0.0, axis=1)  # a permutation of 0..K-1
    click = (rng.random((n, K)) < p[None, :] * r[exposed]).astype(np.float32)
    zeros = np.zeros((n, K), np.float32)
    return ListBatch(
        request_id=np.arange(n),
        ts=np.arange(n),
        user_id=np.zeros(n, np.int64),
        user_dense=np.zeros((n, 0), np.float32),
        item_id=np.tile(np.arange(M), (n, 1)),
        item_cat=np.zeros((n, M, 0), np.int64),
        item_dense=np.zeros((n, M, 0), np.float32),
        upstream_score=np.zeros((n, M), np.float32),
        cand_mask=np.ones((n, M), bool),
        exposed=exposed,
        click=click,
        like=zeros,
        long_view=zeros,
    )


def test_intervention_harvesting_recovers_the_examination_curve() -> None:
    p = np.array([1.0, 0.7, 0.5, 0.35, 0.25])
    r = np.array([0.9, 0.7, 0.5, 0.3, 0.2, 0.1])
    logs = _pbm_logs(40_000, p, r)
    est = examination_propensities(logs)
    np.testing.assert_allclose(est, p, rtol=0.06)
    # the naive click rate per slot mixes position and which items land there: a logger
    # that always shows the best items first must not change the estimate's shape much
    assert est[0] == 1.0 and np.all(np.diff(est) < 0)


def test_rerank_ips_is_unbiased_under_the_pbm() -> None:
    p = np.array([1.0, 0.6, 0.4, 0.25])
    r = np.array([0.1, 0.3, 0.6, 0.9])
    logs = _pbm_logs(60_000, p, r, seed=1)
    best = np.tile(np.array([3, 2, 1, 0]), (len(logs), 1))  # most relevant first
    worst = best[:, ::-1]
    est_best = rerank_ips(logs, best, p).mean()
    est_worst = rerank_ips(logs, worst, p).mean()
    true_best, true_worst = float((p * r[::-1]).sum()), float((p * r).sum())
    assert est_best == pytest.approx(true_best, rel=0.03)
    assert est_worst == pytest.approx(true_worst, rel=0.03)
    # the logged order scores exactly the logged utility
    np.testing.assert_allclose(rerank_ips(logs, logs.exposed, p), logs.click.sum(1), rtol=1e-6)


def test_list_ips_needs_the_logging_propensities() -> None:
    p = np.array([1.0, 0.6, 0.4, 0.25])
    logs = _pbm_logs(100, p, np.full(6, 0.5))
    order = np.tile(np.arange(4), (100, 1))
    assert np.isnan(list_ips(logs, order, p)).all()
    # every candidate in the logger's top 4 with probability 2/3: weights scale by 3/2
    prop = np.full(logs.item_id.shape, 2 / 3, np.float32)
    with_prop = logs.with_(propensity=prop)
    assert with_prop.has_propensity
    np.testing.assert_allclose(
        list_ips(with_prop, order, p), 1.5 * rerank_ips(logs, order, p), rtol=1e-6
    )
    # an item the new list does not show contributes nothing
    hidden = np.where(order == logs.exposed[:, :1], -1, order)
    assert (list_ips(with_prop, hidden, p) <= list_ips(with_prop, order, p) + 1e-9).all()


def test_kendall_tau() -> None:
    assert kendall_tau(np.arange(5), np.arange(5)) == pytest.approx(1.0)
    assert kendall_tau(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)
    assert kendall_tau(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(4 / 6)


def test_paired_and_pooled_differences() -> None:
    rng = np.random.default_rng(0)
    b = [rng.normal(3.0, 1.0, 2000) for _ in range(3)]
    a = [x + 0.1 + rng.normal(0, 0.2, x.size) for x in b]
    one = paired(a[0], b[0])
    assert one["diff"] == pytest.approx(0.1, abs=0.02)
    assert one["se"] == pytest.approx(0.2 / np.sqrt(2000), rel=0.1)  # paired: b cancels
    both = pooled(a, b)
    assert both["lo"] > 0 and both["wins"] == 3 and both["worlds"] == 3
    assert both["se"] < one["se"]
    assert both["rel"] == pytest.approx(0.1 / 3.0, rel=0.2)


def test_holm_adjustment() -> None:
    # sorted p: 0.01 (x3), 0.02 (x2), 0.04 (x1); running max keeps them monotone
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = holm([float("nan"), 0.01])
    assert np.isnan(out[0]) and out[1] == pytest.approx(0.01)
