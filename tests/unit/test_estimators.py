"""Debiased offline estimators (model.estimators, model.cascade) and paired statistics
(model.stats)."""

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
    return _logs(np.tile(np.arange(M), (n, 1)), exposed, click)


def _logs(item_id: np.ndarray, exposed: np.ndarray, click: np.ndarray, width: int = 0,
          propensity: np.ndarray | None = None) -> ListBatch:  # fmt: skip
    """Logs of these candidates, exposures and clicks, every other field neutral: one
    user, `width` all-zero user and item features of each kind, no likes or long views."""
    (n, M), K = item_id.shape, exposed.shape[1]
    zeros = np.zeros((n, K), np.float32)
    return ListBatch(
        request_id=np.arange(n),
        ts=np.arange(n),
        user_id=np.zeros(n, np.int64),
        user_dense=np.zeros((n, width), np.float32),
        item_id=item_id,
        item_cat=np.zeros((n, M, width), np.int64),
        item_dense=np.zeros((n, M, width), np.float32),
        upstream_score=np.zeros((n, M), np.float32),
        cand_mask=np.ones((n, M), bool),
        exposed=exposed,
        click=click,
        like=zeros,
        long_view=zeros,
        propensity=propensity,
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


def _orders_by_category(logs: ListBatch, clumped: bool, seed: int = 0) -> np.ndarray:
    """Each request's exposed items reordered: same-category items adjacent (clumped) or
    interleaved (round robin over the categories), as candidate indices. Within a
    category the items come in a random order, not the logged one (whose clicks already
    carry the logged list's satiation)."""
    rng = np.random.default_rng(seed)
    cat = np.take_along_axis(logs.item_cat[..., 0], logs.exposed, 1)
    out = np.empty_like(logs.exposed)
    for b in range(len(logs)):
        key = rng.random(cat.shape[1])
        if clumped:
            out[b] = logs.exposed[b][np.lexsort((key, cat[b]))]
            continue
        rank = np.zeros(cat.shape[1], np.int64)  # j-th item of its category (random j)
        for c in np.unique(cat[b]):
            same = np.flatnonzero(cat[b] == c)
            rank[same] = np.argsort(np.argsort(key[same]))
        out[b] = logs.exposed[b][np.lexsort((cat[b], rank))]
    return out


def test_the_cascade_estimators_credit_satiation_a_position_based_one_cannot() -> None:
    """Items alike but for their category: under the position-based model every order of
    a list is worth the same in expectation, while the user tires of a category. Fitted
    on the logs alone, the cascade model must rank the interleaved order above the clumped
    one by about what the user model says. Position-based IPS sees only what the logged
    clicks happen to carry (items of a crowded category were clicked less in the logs,
    and the interleaved order puts them last), well short of the true gain."""
    from dataclasses import replace

    from model.cascade import cascade_dm, cascade_dr, fit_cascade
    from model.simulated_logs import generate_logs
    from model.user_model import true_utility
    from tests.support.simulated import SMALL

    flat = {"w_match": 0.0, "w_affinity": 0.0, "w_quality": 0.0, "w_freshness": 0.0}
    flat |= {"w_popularity": 0.0, "like_quality": 0.0, "long_view_duration": 0.0}
    cfg = replace(SMALL, n_categories=6, satiation=1.2, complement=0.0, **flat)
    cfg = replace(cfg, long_view_match=0.0, relevance_bias=-0.5)
    world, logs = generate_logs(cfg, seed=3, n_requests=5_000, progress=False, propensity=True)
    train, test = logs.take(slice(0, 4_000)), logs.take(slice(4_000, None))
    model = fit_cascade(train, steps=200)
    p = examination_propensities(train)
    clumped, mixed = _orders_by_category(test, True), _orders_by_category(test, False)

    def gold(order: np.ndarray) -> float:
        items = np.take_along_axis(test.item_id, order, 1)
        return float(true_utility(world, test.user_id, items).mean())

    true_gain = gold(mixed) - gold(clumped)
    assert true_gain > 0.3  # the world's satiation is strong enough to matter
    dm_gain = cascade_dm(model, test, mixed).mean() - cascade_dm(model, test, clumped).mean()
    # new orders of the exposed items: no exposure propensity (as rerank_ips)
    dr_mixed = cascade_dr(model, test, mixed, propensity=False).mean()
    dr_gain = dr_mixed - cascade_dr(model, test, clumped, propensity=False).mean()
    assert dm_gain == pytest.approx(true_gain, rel=0.35)
    assert dr_gain == pytest.approx(true_gain, rel=0.5)
    ips_gain = rerank_ips(test, mixed, p).mean() - rerank_ips(test, clumped, p).mean()
    assert ips_gain < 0.75 * true_gain
    assert abs(dm_gain - true_gain) < 0.5 * abs(ips_gain - true_gain)


def _appeal_logs(n: int, seed: int = 0) -> tuple[ListBatch, np.ndarray, np.ndarray]:
    """Logs where each catalogue item has an appeal no feature shows: 300 items, 20
    random candidates per request, the logger shows 5 of them at random; a click at slot
    t happens with exam_t · sigmoid(−1.5 + appeal). Returns the logs, the appeal and the
    examination curve."""
    rng = np.random.default_rng(seed)
    n_items, M, K = 300, 20, 5
    appeal = rng.standard_normal(n_items)
    exam = np.array([1.0, 0.8, 0.65, 0.5, 0.4])
    item_id = np.argsort(rng.random((n, n_items)), axis=1)[:, :M]
    exposed = np.argsort(rng.random((n, M)), axis=1)[:, :K]
    shown = np.take_along_axis(item_id, exposed, 1)
    prob = exam[None, :] / (1.0 + np.exp(1.5 - appeal[shown]))
    click = (rng.random((n, K)) < prob).astype(np.float32)
    logs = _logs(item_id, exposed, click, 1, np.full((n, M), K / M, np.float32))
    return logs, appeal, exam


def test_item_offsets_learn_what_no_feature_shows() -> None:
    """Items differ only by an appeal the features do not carry: the cascade model alone
    scores every list alike; with the item offsets from the training logs' clicks it
    credits a list of the most appealing candidates with about the true gain."""
    from model.cascade import (
        cascade_dm,
        fit_cascade,
        fit_item_offsets,
        load_cascade,
        save_cascade,
    )

    logs, appeal, exam = _appeal_logs(12_000)
    train, test = logs.take(slice(0, 10_000)), logs.take(slice(10_000, None))
    plain = fit_cascade(train, w_like=0.0, w_long_view=0.0, steps=150)
    model = fit_item_offsets(plain, train, group=None)
    assert model.item_ids is not None and model.item_offset is not None
    known = np.isin(np.arange(appeal.size), model.item_ids)
    corr = np.corrcoef(appeal[model.item_ids], model.item_offset)[0, 1]
    assert known.all() and corr > 0.8
    best = np.argsort(-appeal[test.item_id], axis=1)[:, :5]
    rand = test.exposed

    def gold(order: np.ndarray) -> float:
        a = appeal[np.take_along_axis(test.item_id, order, 1)]
        return float((exam[None, :] / (1.0 + np.exp(1.5 - a))).sum(1).mean())

    true_gain = gold(best) - gold(rand)
    assert true_gain > 0.5
    plain_gain = cascade_dm(plain, test, best).mean() - cascade_dm(plain, test, rand).mean()
    gain = cascade_dm(model, test, best).mean() - cascade_dm(model, test, rand).mean()
    assert abs(plain_gain) < 0.1 * true_gain
    assert gain == pytest.approx(true_gain, rel=0.25)
    # saved and loaded with the model (one .npz, nothing pickled)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        save_cascade(model, Path(d) / "c.npz")
        back = load_cascade(Path(d) / "c.npz")
    np.testing.assert_allclose(cascade_dm(back, test, best), cascade_dm(model, test, best))


def test_dr_blend_and_self_normalisation() -> None:
    """correction = 0 is the direct method, 1 doubly robust, between a blend; the
    self-normalised residual term does not move when every exposure propensity is off by
    the same factor (the plain one scales with it)."""
    from model.cascade import cascade_dm, cascade_dr, fit_cascade

    logs, appeal, _ = _appeal_logs(4_000, seed=1)
    model = fit_cascade(logs, w_like=0.0, w_long_view=0.0, steps=60)
    order = np.argsort(-appeal[logs.item_id], axis=1)[:, :5]
    dm = cascade_dm(model, logs, order)
    dr = cascade_dr(model, logs, order)
    np.testing.assert_allclose(cascade_dr(model, logs, order, correction=0.0), dm, rtol=1e-9)
    half = cascade_dr(model, logs, order, correction=0.5)
    np.testing.assert_allclose(half, dm + 0.5 * (dr - dm), rtol=1e-9)
    assert abs((dr - dm).mean()) > 1e-3  # the residual term matters here
    off = logs.with_(propensity=np.asarray(logs.propensity) * 2.0)

    def resid(batch: ListBatch, sn: bool) -> float:
        return float((cascade_dr(model, batch, order, self_normalize=sn) - dm).mean())

    assert resid(off, True) == pytest.approx(resid(logs, True), rel=1e-6)
    assert resid(off, False) == pytest.approx(0.5 * resid(logs, False), rel=1e-6)
