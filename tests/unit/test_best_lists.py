"""The search for best lists under the true user model (model/best_lists.py): it keeps to
the candidates, beats the pointwise sorts, and tells logged metrics from the gold."""

from __future__ import annotations

import numpy as np
import pytest

from model.best_lists import headroom, search_best_lists
from model.data import ListBatch
from model.user_model import true_utility
from model.world import World


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
