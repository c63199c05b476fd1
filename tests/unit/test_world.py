"""The simulated world (model/world.py): determinism, persistence, the simulated logs'
conventions (model/simulated_logs.py), the user model (model/user_model.py) and the
search for best lists (model/best_lists.py)."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

from contract.features import FeatureSchema
from model.best_lists import headroom, search_best_lists
from model.data import ListBatch
from model.simulated_logs import generate_logs, sample_requests
from model.user_model import list_feedback_probs, relevance, sample_feedback, true_utility
from model.world import World, WorldConfig

SMALL = WorldConfig(n_items=2_000, n_users=300, n_creators=200)


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(SMALL, seed=7)


@pytest.fixture(scope="module")
def logs() -> tuple[World, ListBatch]:
    return generate_logs(SMALL, seed=7, n_requests=1_500, chunk=600, progress=False)


def _arrays(obj: object) -> dict[str, np.ndarray]:
    return {
        f.name: getattr(obj, f.name)
        for f in fields(obj)
        if isinstance(getattr(obj, f.name), np.ndarray)
    }


# ---- config, generation, persistence -------------------------------------------------


def test_config_round_trip_and_validation() -> None:
    cfg = replace(SMALL, satiation=0.3)
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="k"):
        WorldConfig(m=5, k=10)
    with pytest.raises(ValueError, match="unknown"):
        WorldConfig.from_dict({**cfg.to_dict(), "nonsense": 1})


def test_generate_is_deterministic_for_a_seed(world: World) -> None:
    same = World.generate(SMALL, seed=7)
    other = World.generate(SMALL, seed=8)
    for name, a in _arrays(world).items():
        np.testing.assert_array_equal(a, getattr(same, name), err_msg=name)
    assert any(not np.array_equal(a, getattr(other, name)) for name, a in _arrays(world).items())
    assert not np.array_equal(world.item_latent, other.item_latent)


def test_generate_logs_is_deterministic(logs: tuple[World, ListBatch]) -> None:
    _, batch = logs
    _, again = generate_logs(SMALL, seed=7, n_requests=1_500, chunk=600, progress=False)
    _, other = generate_logs(SMALL, seed=8, n_requests=1_500, chunk=600, progress=False)
    for name, a in _arrays(batch).items():
        np.testing.assert_array_equal(a, getattr(again, name), err_msg=name)
    assert not np.array_equal(batch.item_id, other.item_id)


def test_save_load_round_trip(world: World, tmp_path) -> None:
    path = tmp_path / "world.bin"  # any name: save must not append a suffix
    world.save(path)
    loaded = World.load(path)
    assert loaded.cfg == world.cfg
    assert loaded.seed == world.seed
    for name, a in _arrays(world).items():
        b = getattr(loaded, name)
        assert b.dtype == a.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    users, items = np.arange(5), np.arange(50).reshape(5, 10)
    np.testing.assert_array_equal(
        true_utility(world, users, items), true_utility(loaded, users, items)
    )


def test_world_tables(world: World) -> None:
    cfg, schema = world.cfg, FeatureSchema()
    N, U, C = cfg.n_items, cfg.n_users, cfg.n_categories
    assert world.item_cat.shape == (N, len(schema.item_categorical))
    assert world.item_dense.shape == (N, len(schema.item_dense))
    assert world.user_features.shape == (U, len(schema.user_dense))
    np.testing.assert_allclose(world.item_popularity.sum(), 1.0)
    np.testing.assert_allclose(world.user_activity.sum(), 1.0)
    comp = world.complement_matrix
    np.testing.assert_array_equal(comp, comp.T)
    assert np.all(np.diag(comp) == 0) and 0 < (comp > 0).sum() < C * C / 2
    assert np.all((world.user_diversity > 0) & (world.user_diversity < 1))
    assert np.all((world.user_patience > 0) & (world.user_patience < 1))
    # a creator's items sit mostly in its home category: the creator feature carries signal
    home = world.creator_category[world.item_creator] == world.item_category
    assert home.mean() > 0.7
    # observed preferences are noisy copies of the latent ones
    d = cfg.latent_dim
    corr = np.corrcoef(world.user_features[:, :d].ravel(), world.user_pref.ravel())[0, 1]
    assert 0.7 < corr < 0.99


# ---- requests and logging ------------------------------------------------------------


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


# ---- the user model ------------------------------------------------------------------


def test_sampled_feedback_agrees_with_expected_probs(logs: tuple[World, ListBatch]) -> None:
    world, b = logs
    rows, reps = 6, 20_000
    users = np.repeat(b.user_id[:rows], reps)
    lists = np.take_along_axis(b.item_id[:rows], b.exposed[:rows], axis=1)
    lists[-1, -3:] = -1  # padding slots: no feedback there
    lists = np.repeat(lists, reps, axis=0)
    fb = sample_feedback(world, users, lists, np.random.default_rng(1))
    probs = list_feedback_probs(world, users[::reps], lists[::reps])
    for name in ("click", "like", "long_view"):
        freq = fb[name].reshape(rows, reps, -1).mean(1)
        p = probs[name]
        se = np.sqrt(p * (1 - p) / reps)
        assert np.all(np.abs(freq - p) <= 5 * se + 1e-9), name
    assert fb["click"][-1, -3:].sum() == 0
    # the expected utility is exactly Σ click + w_like·like + w_long_view·long_view
    cfg = world.cfg
    util = (probs["click"] + cfg.w_like * probs["like"] + cfg.w_long_view * probs["long_view"]).sum(
        1
    )
    np.testing.assert_allclose(true_utility(world, users[::reps], lists[::reps]), util)
    sampled = (fb["click"] + cfg.w_like * fb["like"] + cfg.w_long_view * fb["long_view"]).sum(1)
    means = sampled.reshape(rows, reps).mean(1)
    se = sampled.reshape(rows, reps).std(1) / np.sqrt(reps)
    assert np.all(np.abs(means - util) <= 5 * se)


def _items_near(rel: np.ndarray, pool: np.ndarray, target: float, n: int) -> np.ndarray:
    return pool[np.argsort(np.abs(rel[pool] - target))[:n]]


def test_spreading_a_repeated_category_helps_more_for_diverse_users(world: World) -> None:
    user = 0
    rel = relevance(world, np.array([user]), np.arange(world.n_items)[None])[0]
    cat = world.item_category
    big_cat = np.bincount(cat).argmax()
    repeated = _items_near(rel, np.flatnonzero(cat == big_cat), 0.3, 3)
    others = []
    for c in np.argsort(-np.bincount(cat, minlength=world.cfg.n_categories)):
        if c != big_cat and len(others) < 7:
            others.append(_items_near(rel, np.flatnonzero(cat == c), 0.3, 1)[0])
    a, x = repeated, others
    clumped = np.array([a[0], a[1], a[2], *x])
    spread = np.array([a[0], x[0], x[1], a[1], x[2], x[3], a[2], x[4], x[5], x[6]])
    assert sorted(clumped) == sorted(spread)

    def gain(diversity: float) -> float:
        div = world.user_diversity.copy()
        div[user] = diversity
        w = replace(world, user_diversity=div, cfg=replace(world.cfg, complement=0.0))
        u = true_utility(w, np.array([user, user]), np.stack([clumped, spread]))
        return float((u[1] - u[0]) / u[0])

    high, low = gain(0.95), gain(0.05)
    assert high > 0.02  # a high-diversity user clearly prefers the spread list
    assert high > 2 * low


def test_moving_a_relevant_item_to_the_top_raises_utility(world: World) -> None:
    user = 1
    rel = relevance(world, np.array([user]), np.arange(world.n_items)[None])[0]
    cat = world.item_category
    best = int(np.argmax(rel))
    mediocre = []
    for c in range(world.cfg.n_categories):
        if c != cat[best] and len(mediocre) < 9:
            mediocre.append(_items_near(rel, np.flatnonzero(cat == c), 0.15, 1)[0])
    last = np.array([*mediocre, best])
    first = np.array([best, *mediocre])
    u = true_utility(world, np.array([user, user]), np.stack([last, first]))
    assert u[1] > u[0] * 1.05


def test_poor_items_cause_abandonment_and_complements_help(world: World) -> None:
    user = 2
    rel = relevance(world, np.array([user]), np.arange(world.n_items)[None])[0]
    cat = world.item_category
    comp = world.complement_matrix
    a, b = np.unravel_index(np.argmax(comp), comp.shape)  # a complementary pair
    c = next(c for c in range(world.cfg.n_categories) if c not in (a, b) and comp[c, b] == 0)
    item = {k: _items_near(rel, np.flatnonzero(cat == k), 0.3, 2) for k in (a, b, c)}
    target = item[b][0]
    lists = np.array(
        [
            [item[a][0], target],  # after a complement
            [item[c][0], target],  # after an unrelated category
            [int(np.argmin(rel)), target],  # after a poor item
            [int(np.argmax(rel)), target],  # after a great item
        ]
    )
    p = list_feedback_probs(world, np.full(4, user), lists)
    eff, exam = p["effective_relevance"][:, 1], p["examine"][:, 1]
    assert eff[0] > eff[1]  # complements raise relevance
    assert exam[2] < exam[3]  # a poor item raises the chance the user stops
    assert np.all(p["examine"][:, 0] == 1.0)
    assert exam[3] <= world.user_patience[user] + 1e-6  # position decay caps continuation


# ---- headroom ------------------------------------------------------------------------


def test_search_respects_candidates_and_padding(logs: tuple[World, ListBatch]) -> None:
    world, b = logs
    cand = b.item_id[:50].copy()
    mask = np.ones_like(cand, dtype=bool)
    mask[:, 25:] = False  # only 25 real candidates...
    mask[0, 5:] = False  # ...and only 5 in the first request
    best = search_best_lists(world, b.user_id[:50], cand, 10, cand_mask=mask)
    assert best.shape == (50, 10)
    assert np.all(best[0, 5:] == -1) and np.all(best[0, :5] >= 0)
    for row, lst in zip(cand, best, strict=True):
        real = lst[lst >= 0]
        assert np.unique(real).size == real.size
        assert np.isin(real, row[:25]).all()


def test_headroom_best_list_is_not_the_pointwise_sort(logs: tuple[World, ListBatch]) -> None:
    world, b = logs
    h = headroom(world, b.take(slice(0, 600)))
    assert h["n"] == 600
    assert h["searched"] >= h["pointwise_value"] >= h["pointwise_relevance"] * 0.98
    assert h["gain_vs_pointwise_relevance"] > 0.05
    assert h["gain_vs_pointwise_relevance"] > 10 * h["se_gain_vs_pointwise_relevance"]
    assert h["pointwise_relevance"] > h["upstream"]
    assert h["upstream"] > 0.9 * h["logged"]


def test_logged_vs_gold_reorders_the_exposed_items(logs: tuple[World, ListBatch]) -> None:
    from model.evaluate import GOLD_ORDERS, logged_vs_gold
    from model.ranking_metrics import ndcg_at

    world, batch = logs
    part = batch.take(slice(0, 400))
    out = logged_vs_gold(world, part)
    assert tuple(out) == GOLD_ORDERS
    logged, best, by_rel = (out[name] for name in GOLD_ORDERS)
    # the logging order row is the logged exposure itself
    exposed = np.where(
        part.exposed >= 0, np.take_along_axis(part.item_id, np.maximum(part.exposed, 0), 1), -1
    )
    assert logged["utility"] == pytest.approx(true_utility(world, part.user_id, exposed).mean())
    assert logged["ndcg@10"] == pytest.approx(ndcg_at(part.click, 10).mean())
    # a search under the true user model does better for the users than either other order
    assert best["utility"] > by_rel["utility"] > logged["utility"]
    for row in out.values():
        assert 0.0 <= row["ndcg@10"] <= 1.0


def test_padding_mid_list_is_skipped_by_sampled_and_expected_feedback(world: World) -> None:
    """A padding slot in the middle of a list is transparent to both: the user skips it
    and the cascade goes on, so the sampled utility's mean is true_utility."""
    user, rows, reps = 0, 4, 2_000
    rel = relevance(world, np.array([user]), np.arange(world.n_items)[None])[0]
    users = np.full(rows, user)
    # relevant items of different categories: the slots after the padding matter
    pool = np.argsort(-rel)[:200]
    _, first = np.unique(world.item_category[pool], return_index=True)
    items = pool[np.sort(first)][:10]
    lists = np.tile(items, (rows, 1))
    lists[:, 3] = -1
    lists[1, 0] = -1  # padding first, too
    lists[2, 5:7] = -1  # two padding slots in a row
    util = true_utility(world, users, lists)
    # padding is transparent: dropping it (and padding the end) changes nothing
    packed = np.stack([np.concatenate([r[r >= 0], r[r < 0]]) for r in lists])
    np.testing.assert_allclose(true_utility(world, users, packed), util)
    fb = sample_feedback(
        world, np.repeat(users, reps), np.repeat(lists, reps, axis=0), np.random.default_rng(5)
    )
    assert fb["click"][np.repeat(lists, reps, axis=0) < 0].sum() == 0
    cfg = world.cfg
    sampled = (fb["click"] + cfg.w_like * fb["like"] + cfg.w_long_view * fb["long_view"]).sum(1)
    sampled = sampled.reshape(rows, reps)
    means, se = sampled.mean(1), sampled.std(1, ddof=1) / np.sqrt(reps)
    assert np.all(np.abs(means - util) <= 5 * se), (means, util, se)


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
