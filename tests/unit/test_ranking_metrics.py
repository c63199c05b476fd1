"""Ranking metrics (model/ranking_metrics.py) pinned on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.ranking_metrics import auc, clicks_at, list_metrics, map_at, ndcg_at, ranked_labels


def test_ndcg_hand_case() -> None:
    labels = np.array([[0.0, 1.0, 0.0, 1.0]])
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at(labels, 4)[0] == pytest.approx(dcg / idcg)
    assert ndcg_at(labels, 1)[0] == 0.0
    assert ndcg_at(np.array([[1.0, 1.0, 0.0]]), 3)[0] == pytest.approx(1.0)
    assert ndcg_at(np.zeros((1, 3)), 3)[0] == 0.0


def test_map_hand_case() -> None:
    labels = np.array([[0.0, 1.0, 0.0, 1.0]])
    # precisions at hits: 1/2 and 2/4; two relevant items
    assert map_at(labels, 4)[0] == pytest.approx((0.5 + 0.5) / 2)
    # cutoff 2: one hit at rank 2; LibRerank normalises by the hits inside the top k (1),
    # not by the list's clicks (evaluate_multi's AP_count)
    assert map_at(labels, 2)[0] == pytest.approx(0.5 / 1)
    # the reviewer's case: [0,1,0,0,1,0] at k = 3 is 0.5 in LibRerank (0.25 before)
    assert map_at(np.array([[0.0, 1.0, 0.0, 0.0, 1.0, 0.0]]), 3)[0] == pytest.approx(0.5)
    assert map_at(np.zeros((1, 4)), 4)[0] == 0.0


def test_clicks_and_ranked_labels() -> None:
    order = np.array([[2, 0, -1]])
    by_cand = np.array([[1.0, 0.0, 1.0]])
    lab = ranked_labels(order, by_cand)
    assert lab.tolist() == [[1.0, 1.0, 0.0]]
    assert clicks_at(lab, 1)[0] == 1.0
    assert list_metrics(lab)["clicks@3"] == 2.0


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        pos.size * neg.size
    )
    assert auc(s, y) == pytest.approx(brute)
    assert auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert math.isnan(auc(np.array([0.1, 0.2]), np.array([1, 1])))
