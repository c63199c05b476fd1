"""The user model (model/user_model.py): sampled feedback agrees with its closed form, and
satiation, complements, abandonment and padding act as specified."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from model.data import ListBatch
from model.user_model import list_feedback_probs, relevance, sample_feedback, true_utility
from model.world import World


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
