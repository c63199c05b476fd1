"""Evaluation: the gold metric (true utility under the simulator's user model), the
logged-data metrics (AUC, NDCG/MAP/clicks@k on the exposed lists), decoder passes and
decode latency — every model measured the same way, side by side.

Logged-data metrics rerank the EXPOSED items only (the other candidates are masked out,
their upstream positions kept), since only exposed items carry feedback; this is how
LibRerank evaluates rerankers on logs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from contract.features import FeatureSchema
from model.data import ListBatch
from model.ranking_metrics import auc, list_metrics, ranked_labels
from model.tensors import Inputs, to_inputs

if TYPE_CHECKING:
    from model.world import World


@dataclass(frozen=True)
class ListPolicy:
    """One way to build each request's list, as the evaluation compares them: a model (none
    for the upstream order) plus how its lists are decoded. kind: upstream | dnn | prm |
    nar4rec | gen_reranker."""

    name: str
    kind: str
    model: nn.Module | None = None
    items_per_pass: int | None = None  # gen_reranker: items emitted per decoder pass
    beam: int | None = None  # gen_reranker: beam width (one item per pass)
    # upstream / dnn / prm: how the top k is built from the scores. "" = sort; "cap" =
    # greedy with at most `cap` items of one category (the logging policy's rule); "mmr" =
    # greedy on score − mmr_penalty · (earlier items of the same category)
    list_rule: str = ""
    cap: int = 4
    mmr_penalty: float = 0.5


@dataclass(frozen=True)
class Reranked:
    order: np.ndarray  # (B, k) candidate indices, -1 = none
    item_scores: np.ndarray  # (B, M) per-candidate score (for AUC)
    passes: int  # decoder passes (0 for one-shot scorers)


def category_greedy(
    scores: torch.Tensor,
    category: torch.Tensor,
    cand_mask: torch.Tensor,
    k: int,
    cap: int | None = None,
    penalty: float = 0.0,
) -> torch.Tensor:
    """Greedy top k (B, k) candidate indices (-1 past the real ones) by score, with at most
    `cap` items of one category (relaxed when nothing else is left) and/or a penalty per
    earlier item of the same category (a category-level MMR). category (B, M) int64."""
    B, M = scores.shape
    available = cand_mask.clone()
    counts = torch.zeros(B, M, device=scores.device)  # earlier picks sharing j's category
    order = torch.full((B, k), -1, dtype=torch.long, device=scores.device)
    rows = torch.arange(B, device=scores.device)
    for t in range(min(k, M)):
        key = scores - penalty * counts
        allowed = available
        if cap is not None:
            allowed = available & (counts < cap)
            stuck = ~allowed.any(dim=1, keepdim=True)
            allowed = torch.where(stuck, available, allowed)
        j = key.masked_fill(~allowed, float("-inf")).argmax(dim=1)
        ok = allowed[rows, j]
        order[:, t] = torch.where(ok, j, -1)
        available[rows, j] = False
        same = category == category[rows, j][:, None]
        counts = counts + (same & ok[:, None]).float()
    return order


@torch.no_grad()
def rerank(r: ListPolicy, inp: Inputs, k: int) -> Reranked:
    from model.decode import beam_decode, greedy_decode, rank_scores

    B, M = inp.batch_size, inp.m
    if r.list_rule:
        if r.list_rule not in ("cap", "mmr") or r.kind not in ("upstream", "dnn", "prm"):
            raise ValueError(f"{r.name}: list_rule {r.list_rule!r} for kind {r.kind!r}")
        if r.kind == "upstream":
            scores = torch.where(inp.cand_mask, -torch.arange(M).float().expand(B, M), -1e9)
        elif r.model is None:
            raise ValueError(f"{r.name}: kind {r.kind!r} needs a model")
        else:
            scores = r.model(inp).float()
        cap, penalty = (r.cap, 0.0) if r.list_rule == "cap" else (None, r.mmr_penalty)
        order = category_greedy(scores, inp.item_cat[..., 0], inp.cand_mask, k, cap, penalty)
        return Reranked(order.numpy(), rank_scores(order, M).numpy(), 0)
    if r.kind == "upstream":
        # candidates arrive in upstream order: take the first k real ones
        idx = torch.arange(M).expand(B, M)
        key = torch.where(inp.cand_mask, idx, idx + M)
        order = torch.sort(key, dim=1).values[:, :k]
        order = torch.where(order < M, order, torch.full_like(order, -1))
        scores = torch.where(inp.cand_mask, -idx.float(), torch.full((B, M), -1e9))
        return Reranked(order.numpy(), scores.numpy(), 0)
    if r.model is None:
        raise ValueError(f"{r.name}: kind {r.kind!r} needs a model")
    if r.kind == "gen_reranker":
        if r.beam and r.beam > 1:
            res = beam_decode(r.model, inp, k, beam=r.beam)
        else:
            res = greedy_decode(r.model, inp, k, items_per_pass=r.items_per_pass)
        return Reranked(res.order.numpy(), rank_scores(res.order, M).numpy(), int(res.passes))
    order, scores = r.model.rerank(inp, k)  # type: ignore[operator]
    passes = 1 if r.kind == "nar4rec" else 0
    return Reranked(order.numpy(), scores.float().numpy(), passes)


def exposed_only(batch: ListBatch) -> ListBatch:
    """Mask every candidate that was not exposed (upstream positions unchanged)."""
    B, M = batch.item_id.shape
    exposed_mask = np.zeros((B, M), dtype=bool)
    rows, cols = np.nonzero(batch.exposed >= 0)
    exposed_mask[rows, batch.exposed[rows, cols]] = True
    return batch.with_(cand_mask=batch.cand_mask & exposed_mask)


def clicks_by_candidate(batch: ListBatch) -> np.ndarray:
    """(B, M) click label per candidate (0 for the unexposed)."""
    B, M = batch.item_id.shape
    out = np.zeros((B, M), dtype=np.float32)
    rows, cols = np.nonzero(batch.exposed >= 0)
    out[rows, batch.exposed[rows, cols]] = batch.click[rows, cols]
    return out


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def logged_metrics(
    r: ListPolicy,
    batch: ListBatch,
    schema: FeatureSchema,
    chunk: int = 4096,
    exam: np.ndarray | None = None,
) -> dict[str, float]:
    """AUC, NDCG/MAP/clicks@{1,3,5,10} and the position-based IPS utility ("ips",
    model.estimators.rerank_ips with the slots' examination propensities `exam`, None =
    harvested from `batch`) of reranking each exposed list."""
    from model.estimators import examination_propensities, rerank_ips

    if exam is None:
        exam = examination_propensities(batch)
    exp = exposed_only(batch)
    labels = clicks_by_candidate(batch)
    K = batch.k
    ranked, flat_scores, flat_labels, ips = [], [], [], []
    for sl in _chunks(len(exp), chunk):
        part = exp.take(sl)
        out = rerank(r, to_inputs(part, schema), K)
        ranked.append(ranked_labels(out.order, labels[sl]))
        ips.append(rerank_ips(batch.take(sl), out.order, exam))
        mask = part.cand_mask
        flat_scores.append(out.item_scores[mask])
        flat_labels.append(labels[sl][mask])
    metrics = list_metrics(np.concatenate(ranked))
    metrics["auc"] = auc(np.concatenate(flat_scores), np.concatenate(flat_labels))
    metrics["ips"] = float(np.concatenate(ips).mean()) if ips else float("nan")
    return metrics


def generate_lists(
    r: ListPolicy, batch: ListBatch, schema: FeatureSchema, k: int, chunk: int = 4096
) -> tuple[np.ndarray, int]:
    """(B, k) candidate indices of the generated lists over ALL candidates, and passes."""
    orders, passes = [], 0
    for sl in _chunks(len(batch), chunk):
        out = rerank(r, to_inputs(batch.take(sl), schema), k)
        orders.append(out.order)
        passes = out.passes
    return np.concatenate(orders), passes


def item_ids_of(batch: ListBatch, order: np.ndarray) -> np.ndarray:
    """Candidate indices -> item ids (-1 stays -1)."""
    safe = np.where(order >= 0, order, 0)
    ids = np.take_along_axis(batch.item_id, safe, axis=1)
    return np.where(order >= 0, ids, -1)


def decode_latency_ms(
    r: ListPolicy, batch: ListBatch, schema: FeatureSchema, k: int, reps: int = 200
) -> float:
    """Median wall time of reranking ONE request (batch 1) on one thread, in ms.
    The first few calls are warm-up and discarded."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = [to_inputs(batch.take(slice(i, i + 1)), schema) for i in range(min(reps, 50))]
        for inp in inputs[:5]:
            rerank(r, inp, k)
        times = []
        for i in range(reps):
            inp = inputs[i % len(inputs)]
            t0 = time.perf_counter()
            rerank(r, inp, k)
            times.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(times))
    finally:
        torch.set_num_threads(prev)


GOLD_ORDERS = ("logging order", "best under the true user model", "true relevance")


def logged_vs_gold(
    world: World,
    batch: ListBatch,
    beam: int = 8,
    exam: np.ndarray | None = None,
    orders_out: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """What the logged metrics reward in this world: three orders of each request's
    EXPOSED items (the same items the logged metrics rerank), each with its NDCG@10 on the
    logged clicks (LibRerank's, as logged_metrics) and its true utility:
    - the logging order;
    - the best order a search under the TRUE user model finds (search_best_lists over the
      exposed items, k = their number): what a reranker that knew the users would show;
    - the exposed items sorted by true pointwise relevance.
    The logged clicks were drawn under the logging order's position bias, so a reranker
    that moves a clicked item down loses logged NDCG even when the list is better for the
    user: the second row's NDCG says how far the logged metric and the gold disagree.
    Each order also gets the position-based IPS utility (model.estimators.rerank_ips, with
    the slots' examination propensities `exam`, None = harvested from `batch`).
    orders_out, when given, receives each order as (B, K) candidate indices."""
    from model.best_lists import search_best_lists
    from model.estimators import examination_propensities, rerank_ips
    from model.user_model import relevance, true_utility

    if exam is None:
        exam = examination_propensities(batch)

    K = batch.k
    slots = np.where(batch.exposed >= 0, np.arange(K)[None, :], -1)  # logging order
    items = np.where(
        batch.exposed >= 0,
        np.take_along_axis(batch.item_id, np.maximum(batch.exposed, 0), axis=1),
        -1,
    )  # (B, K) exposed item ids, logging order
    users = batch.user_id
    best = search_best_lists(world, users, items, K, beam=beam)  # item ids, -1 padding
    same = (best[:, :, None] == items[:, None, :]) & (best[:, :, None] >= 0)  # (B, K, K)
    best_slots = np.where(same.any(axis=2), same.argmax(axis=2), -1)
    rel = np.where(items >= 0, relevance(world, users, items), -np.inf)  # padding last
    by_rel = np.argsort(-rel, axis=1, kind="stable")
    rel_slots = np.where(np.take_along_axis(items, by_rel, axis=1) >= 0, by_rel, -1)
    out: dict[str, dict[str, float]] = {}
    for name, order in zip(GOLD_ORDERS, (slots, best_slots, rel_slots), strict=True):
        labels = ranked_labels(order, batch.click)  # clicks are per exposed slot
        lists = np.where(order >= 0, np.take_along_axis(items, np.maximum(order, 0), 1), -1)
        slot = np.maximum(order, 0)
        cand_order = np.where(order >= 0, np.take_along_axis(batch.exposed, slot, 1), -1)
        if orders_out is not None:
            orders_out[name] = cand_order
        out[name] = {
            "ndcg@10": float(list_metrics(labels, (10,))["ndcg@10"]),
            "ips": float(rerank_ips(batch, cand_order, exam).mean()),
            "utility": float(true_utility(world, users, lists).mean()),
        }
    return out
