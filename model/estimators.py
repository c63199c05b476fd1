"""Debiased offline estimates of a ranking's utility from logged feedback under the
position-based model (numpy).

Logged NDCG rewards putting the items the logging policy's users clicked where the
logging policy put them: the clicks were drawn under its position bias. The estimators
here correct for that bias with propensities learned from the logs themselves:

- Examination propensities by intervention harvesting (Agarwal et al., WSDM 2019;
  Joachims et al., WSDM 2017). The logging policy explores (its exposure varies between
  requests with the same upstream scores), so candidates of the same upstream rank j are
  shown at several slots t. Under the position-based model (PBM) the feedback rate of
  the cell (j, t) is p_t · r_j; the rank-1 Poisson maximum likelihood fit of the cells'
  utility sums gives p (normalised so p_0 = 1). `examination_propensities`.
- Reranking the exposed items: position-based IPS, Σ_t U_t · p(new slot) / p(logged slot)
  (the expected utility of the new order under the PBM; `rerank_ips`).
- Whole lists over all candidates: an item-level IPS that adds the logging policy's
  exposure propensity μ_j (the logging_propensity column): an exposed item j contributes
  U_j · p(new slot) / (p(logged slot) · max(μ_j, μ_min)) when the new list shows it
  (`list_ips`). Without the column this estimator is off (NaN).

Both are unbiased only under the PBM; the user model of the simulated world has
satiation, complements and abandonment, which they cannot credit: the list-aware
estimators (a cascade click model of the displayed prefix, direct and doubly robust) are
in model/cascade.py, with the table of the list estimators that results reports.

What each can and cannot rank is checked against the gold (results: logged-vs-gold and
Kendall τ with true utility; `python -m model estimators` rescores saved lists).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from model.data import ListBatch, feedback_utility

MU_MIN = 0.02  # floor of the exposure propensity in list_ips (weights at most 50)


def _cells(batch: ListBatch, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Impressions n (J, K) and label sums c (J, K) per (upstream rank j, slot t)."""
    M, K = batch.m, batch.k
    shown = batch.exposed >= 0
    j = batch.exposed[shown]
    t = np.broadcast_to(np.arange(K), batch.exposed.shape)[shown]
    n = np.zeros((M, K))
    c = np.zeros((M, K))
    np.add.at(n, (j, t), 1.0)
    np.add.at(c, (j, t), label[shown])
    return n, c


def examination_propensities(
    batch: ListBatch,
    w_click: float = 1.0,
    w_like: float = 1.5,
    w_long_view: float = 0.8,
    iters: int = 200,
    reduce: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """(K,) examination propensity of each slot relative to slot 0, by intervention
    harvesting: the rank-1 Poisson fit c[j, t] ≈ n[j, t] · p_t · r_j over the cells
    (upstream rank j, slot t) of the logs (alternating closed-form updates). Slots no
    logged item reached get the last estimated value. `reduce` sums the cells over the
    processes that each hold part of the logs (torchrun: distributed.sum_cells), so every
    process fits the whole logs' cells."""
    K = batch.k
    u = feedback_utility(batch, w_click, w_like, w_long_view)
    n, c = _cells(batch, u)
    if reduce is not None:
        n, c = reduce(n, c)
    if n.sum() == 0 or K == 0:
        return np.ones(K)
    p = np.ones(K)
    r = np.full(n.shape[0], max(c.sum(), 1e-12) / max(n.sum(), 1e-12))
    for _ in range(iters):
        r = c.sum(1) / np.maximum((n * p[None, :]).sum(1), 1e-12)
        p = c.sum(0) / np.maximum((n * r[:, None]).sum(0), 1e-12)
        p = p / p[0] if p[0] > 0 else p
    seen = n.sum(0) > 0
    if not seen.all():
        last = p[seen][-1] if seen.any() else 1.0
        p = np.where(seen, p, last)
    return np.maximum(p, 1e-6)


def new_slots(batch: ListBatch, order: np.ndarray) -> np.ndarray:
    """(B, K): the slot of the new order (B, k) candidate indices at which each logged
    exposed item stands, -1 when the new list does not show it."""
    B = len(batch)
    k = order.shape[1]
    slot_of = np.full((B, batch.m + 1), -1, dtype=np.int64)  # spare column for -1
    col = np.where(order >= 0, order, batch.m)
    slot_of[np.arange(B)[:, None], col] = np.arange(k)[None, :]
    slot_of[:, batch.m] = -1
    return np.take_along_axis(slot_of, np.where(batch.exposed >= 0, batch.exposed, batch.m), 1)


def _pbm_weights(batch: ListBatch, order: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(B, K) p(new slot) / p(logged slot) of each exposed item, 0 where not shown."""
    K = batch.k
    new = new_slots(batch, order)
    pk = np.concatenate([p, np.full(max(order.shape[1] - K, 0), p[-1])])
    num = np.where(new >= 0, pk[np.maximum(new, 0)], 0.0)
    return np.where(batch.exposed >= 0, num / p[None, :K], 0.0)


def rerank_ips(
    batch: ListBatch,
    order: np.ndarray,
    p: np.ndarray,
    w_click: float = 1.0,
    w_like: float = 1.5,
    w_long_view: float = 0.8,
) -> np.ndarray:
    """(B,) position-based IPS utility of a new order (B, k) of each request's EXPOSED
    items (candidate indices): Σ_t U_t · p(new slot) / p(logged slot)."""
    u = feedback_utility(batch, w_click, w_like, w_long_view)
    return (u * _pbm_weights(batch, order, p)).sum(1)


def list_ips(
    batch: ListBatch,
    order: np.ndarray,
    p: np.ndarray,
    w_click: float = 1.0,
    w_like: float = 1.5,
    w_long_view: float = 0.8,
    mu_min: float = MU_MIN,
) -> np.ndarray:
    """(B,) item-level IPS utility of new lists (B, k) over ALL candidates: rerank_ips's
    weights divided by the logging policy's exposure propensity of each shown logged item
    (floored at mu_min). NaN when the batch carries no logging propensities."""
    if not batch.has_propensity:
        return np.full(len(batch), np.nan)
    u = feedback_utility(batch, w_click, w_like, w_long_view)
    mu = np.take_along_axis(np.asarray(batch.propensity), np.maximum(batch.exposed, 0), 1)
    w = _pbm_weights(batch, order, p) / np.maximum(np.nan_to_num(mu, nan=1.0), mu_min)
    return (u * w).sum(1)


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b of two equally long vectors (ties counted as neither)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(x.size, 1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = i.size
    tx, ty = (sx == 0).sum(), (sy == 0).sum()
    denom = np.sqrt(float(n0 - tx) * float(n0 - ty))
    return float((sx * sy).sum() / denom) if denom > 0 else float("nan")
