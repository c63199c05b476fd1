"""Ranking metrics on logged data, as LibRerank computes them, plus AUC.

LibRerank (Liu et al., `librerank/utils.py: evaluate_multi`): for a reranked list with
click labels, at cutoff k
- NDCG@k: gain 2^label − 1, discount log2(i + 1) for 1-based rank i, ideal DCG from the
  labels sorted descending (a list with no clicks contributes 0);
- MAP@k: mean over the list's clicked items in the top k of precision at their ranks,
  normalised by the number of clicks IN THE TOP k (LibRerank's AP_count; 0 when none);
- clicks@k: the sum of labels in the top k.
All functions are vectorized over requests: labels are given in the model's order.
"""

from __future__ import annotations

import numpy as np


def ranked_labels(order: np.ndarray, labels_by_cand: np.ndarray) -> np.ndarray:
    """Labels in the model's order. order (B,L) candidate indices (-1 pad), labels_by_cand
    (B,M) -> (B,L), 0 at padding."""
    safe = np.where(order >= 0, order, 0)
    out = np.take_along_axis(labels_by_cand, safe, axis=1)
    return np.where(order >= 0, out, 0.0)


def ndcg_at(labels: np.ndarray, k: int) -> np.ndarray:
    """labels (B,L) in ranked order -> (B,) NDCG@k."""
    top = labels[:, :k]
    disc = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    dcg = ((2.0**top - 1.0) * disc).sum(axis=1)
    ideal = -np.sort(-labels, axis=1)[:, :k]
    idcg = ((2.0**ideal - 1.0) * disc[: ideal.shape[1]]).sum(axis=1)
    return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)


def map_at(labels: np.ndarray, k: int) -> np.ndarray:
    """labels (B,L) binary-ish in ranked order -> (B,) MAP@k."""
    top = (labels[:, :k] > 0).astype(np.float64)
    hits = np.cumsum(top, axis=1)
    prec = hits / np.arange(1, top.shape[1] + 1)
    n_rel = top.sum(axis=1)  # clicks inside the top k (LibRerank), not in the whole list
    ap = (prec * top).sum(axis=1)
    return np.where(n_rel > 0, ap / np.maximum(n_rel, 1), 0.0)


def clicks_at(labels: np.ndarray, k: int) -> np.ndarray:
    return labels[:, :k].sum(axis=1)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Item-wise ROC AUC (ties count half), flat arrays. NaN if one class is absent."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over ties (1-based)
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


CUTOFFS = (1, 3, 5, 10)


def list_metrics(labels: np.ndarray, cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, float]:
    """Means over requests of NDCG/MAP/clicks at each cutoff. labels (B,L) in ranked order."""
    out: dict[str, float] = {}
    for k in cutoffs:
        out[f"ndcg@{k}"] = float(ndcg_at(labels, k).mean())
        out[f"map@{k}"] = float(map_at(labels, k).mean())
        out[f"clicks@{k}"] = float(clicks_at(labels, k).mean())
    return out
