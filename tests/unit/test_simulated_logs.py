"""The simulated logs (model/simulated_logs.py): determinism, the ListBatch conventions,
the logging policy and its logged propensities."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from contract.features import FeatureSchema
from model.data import ListBatch
from model.simulated_logs import generate_logs, sample_requests
from model.user_model import relevance
from model.world import World
from tests.support.simulated import SMALL, array_fields


def test_generate_logs_is_deterministic(logs: tuple[World, ListBatch]) -> None:
    _, batch = logs
    _, again = generate_logs(SMALL, seed=7, n_requests=1_500, chunk=600, progress=False)
    _, other = generate_logs(SMALL, seed=8, n_requests=1_500, chunk=600, progress=False)
    for name, a in array_fields(batch).items():
        np.testing.assert_array_equal(a, getattr(again, name), err_msg=name)
    assert not np.array_equal(batch.item_id, other.item_id)


def test_list_batch_conventions(logs: tuple[World, ListBatch]) -> None:
    world, b = logs
    cfg = world.cfg
    B, M, K = len(b), cfg.m, cfg.k
    assert (b.m, b.k) == (M, K)
    expected = {
        "request_id": ((B,), np.int64),
        "ts": ((B,), np.int64),
        "user_id": ((B,), np.int64),
        "user_dense": ((B, 10), np.float32),
        "item_id": ((B, M), np.int64),
        "item_cat": ((B, M, 2), np.int64),
        "item_dense": ((B, M, 3), np.float32),
        "upstream_score": ((B, M), np.float32),
        "cand_mask": ((B, M), np.bool_),
        "exposed": ((B, K), np.int64),
        "click": ((B, K), np.float32),
        "like": ((B, K), np.float32),
        "long_view": ((B, K), np.float32),
    }
    for name, (shape, dtype) in expected.items():
        a = getattr(b, name)
        assert a.shape == shape and a.dtype == dtype, (name, a.shape, a.dtype)
    assert np.all(np.diff(b.upstream_score, axis=1) <= 0)  # candidate j = upstream position j
    assert np.all(np.diff(b.ts) > 0)
    assert np.unique(b.request_id).size == B
    assert b.cand_mask.all()
    srt = np.sort(b.item_id, axis=1)
    assert np.all(srt[:, 1:] != srt[:, :-1]) and srt.min() >= 0 and srt.max() < cfg.n_items
    ex = np.sort(b.exposed, axis=1)
    assert np.all(ex[:, 1:] != ex[:, :-1]) and ex.min() >= 0 and ex.max() < M
    np.testing.assert_array_equal(b.item_cat[..., 0], world.item_category[b.item_id])
    np.testing.assert_array_equal(b.item_cat[..., 1], world.item_creator[b.item_id])
    np.testing.assert_array_equal(b.item_dense, world.item_dense[b.item_id])
    np.testing.assert_array_equal(b.user_dense, world.user_features[b.user_id])
    for name in ("click", "like", "long_view"):
        assert set(np.unique(getattr(b, name))) <= {0.0, 1.0}
    assert np.all(b.like <= b.click) and np.all(b.long_view <= b.click)
    assert 0.5 < b.click.sum(1).mean() < 2.5  # neither vanishingly rare nor saturated
    # candidates are plausible: retrieval prefers relevant items to random ones
    rng = np.random.default_rng(0)
    random_items = rng.integers(0, cfg.n_items, size=b.item_id.shape)
    assert (
        relevance(world, b.user_id, b.item_id).mean()
        > 2 * relevance(world, b.user_id, random_items).mean()
    )


def test_logging_policy_explores_and_caps(logs: tuple[World, ListBatch]) -> None:
    world, b = logs
    top_k = np.arange(world.cfg.k)
    assert (b.exposed == top_k).all(1).mean() < 0.5  # logged orders vary
    assert np.mean(b.exposed < world.cfg.k) > 0.6  # but mostly follow the upstream order
    cfg = world.cfg

    def per_category(cats: np.ndarray) -> np.ndarray:  # (B, n) -> (B, C) counts
        return np.stack([(cats == c).sum(1) for c in range(cfg.n_categories)], axis=1)

    exposed_counts = per_category(np.take_along_axis(b.item_cat[..., 0], b.exposed, axis=1))
    # the cap holds wherever the candidates allow it (it is relaxed only where they don't)
    feasible = np.minimum(per_category(b.item_cat[..., 0]), cfg.category_cap).sum(1) >= cfg.k
    assert feasible.mean() > 0.9
    assert exposed_counts[feasible].max() <= cfg.category_cap


def test_large_candidate_lists_work(world: World) -> None:
    big = replace(world, cfg=replace(world.cfg, m=200))
    b = sample_requests(big, 40, np.random.default_rng(0), first_request=100)
    assert b.item_id.shape == (40, 200) and b.request_id[0] == 100
    assert np.all(np.diff(b.upstream_score, axis=1) <= 0)


def test_logged_propensities_and_their_column(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The simulator logs the logging policy's exposure propensities from their own random
    stream (the logs are the same without them); they round-trip through the optional
    Parquet column, and a file without it reads as 'not logged'."""
    from model.log_io import read_logs, write_logs

    _, plain = generate_logs(SMALL, seed=5, n_requests=400, chunk=200, progress=False)
    _, logs = generate_logs(
        SMALL, seed=5, n_requests=400, chunk=200, progress=False, propensity=True
    )
    for name in ("item_id", "exposed", "click", "like", "long_view"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(logs, name))
    assert logs.has_propensity and not plain.has_propensity
    p = logs.propensity
    assert ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(p.sum(1), logs.k, rtol=1e-5)  # k exposed per draw
    assert (np.take_along_axis(p, logs.exposed, 1) > 0).all()  # the logged draw counts
    # exploration: upstream position 0 is shown more often than position 20
    assert p[:, 0].mean() > p[:, 20].mean()

    schema = FeatureSchema()
    write_logs(logs, tmp_path / "with.parquet", schema)
    write_logs(plain, tmp_path / "without.parquet", schema)
    back = read_logs(tmp_path / "with.parquet")
    np.testing.assert_allclose(back.propensity, p)
    assert not read_logs(tmp_path / "without.parquet").has_propensity
