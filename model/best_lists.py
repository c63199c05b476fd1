"""The headroom check: how good can a list be under the true user model? A beam search
and a local search for near-best lists, and how far they beat the pointwise sorts
(numpy only, no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from model.data import ListBatch
from model.user_model import (
    cascade,
    click_value,
    engagement,
    relevance_logit,
    sigmoid,
    true_utility,
    user_terms,
)
from model.world import World


@dataclass(frozen=True)
class _Candidates:
    """Per-candidate terms of the user model for a batch of requests."""

    logit: np.ndarray  # (B, M) relevance logit; very negative on padding
    cat: np.ndarray  # (B, M) category
    value: np.ndarray  # (B, M) expected utility of a click
    pad: np.ndarray  # (B, M) bool
    satiation: np.ndarray  # (B,)
    base_cont: np.ndarray  # (B,)


def _candidates(
    world: World, user_idx: np.ndarray, cand_items: np.ndarray, cand_mask: np.ndarray | None
) -> _Candidates:
    cand_items = np.asarray(cand_items)
    pad = cand_items < 0
    if cand_mask is not None:
        pad = pad | ~np.asarray(cand_mask, dtype=bool)
    items = np.where(pad, 0, cand_items)
    user_idx = np.asarray(user_idx)
    like_c, long_view_c = engagement(world, user_idx, items)
    satiation, base_cont = user_terms(world, user_idx)
    return _Candidates(
        logit=np.where(pad, -1e9, relevance_logit(world, user_idx, items)),
        cat=world.item_category[items],
        value=click_value(world.cfg, like_c, long_view_c),
        pad=pad,
        satiation=satiation,
        base_cont=base_cont,
    )


def _utility_of_positions(world: World, c: _Candidates, pos: np.ndarray) -> np.ndarray:
    """Utility (B, R) of lists pos (B, R, K) given as candidate indices."""
    B, R, K = pos.shape

    def gather(a: np.ndarray) -> np.ndarray:  # (B, M) -> (B * R, K)
        return np.take_along_axis(a[:, None, :], pos, axis=2).reshape(B * R, K)

    exam, eff, _ = cascade(
        world.cfg,
        world.complement_matrix,
        gather(c.logit),
        gather(c.cat),
        gather(c.pad),
        np.repeat(c.satiation, R),
        np.repeat(c.base_cont, R),
    )
    return (exam * eff * gather(c.value)).sum(1).reshape(B, R)


def _beam_search(world: World, c: _Candidates, k: int, beam: int) -> np.ndarray:
    """Beam search on the cumulative expected utility; (B, k) candidate indices.

    The state of a beam (examination probability, category counts, strongest
    complement seen) makes each step's gain exact under the user model."""
    cfg = world.cfg
    B, M = c.logit.shape
    C = cfg.n_categories
    comp = world.complement_matrix.astype(np.float64)
    seq = np.zeros((B, 1, 0), dtype=np.int64)
    score = np.zeros((B, 1))
    exam = np.ones((B, 1))
    counts = np.zeros((B, 1, C))
    comp_seen = np.zeros((B, 1, C))  # max complement weight from chosen items, per category
    chosen = np.zeros((B, 1, M), dtype=bool)
    rows = np.arange(B)[:, None]
    for _ in range(k):
        W = seq.shape[1]
        cat = np.broadcast_to(c.cat[:, None, :], (B, W, M))
        n_same = np.take_along_axis(counts, cat, axis=2)  # (B, W, M)
        boost = np.take_along_axis(comp_seen, cat, axis=2)
        z = c.logit[:, None, :] - c.satiation[:, None, None] * n_same + cfg.complement * boost
        eff = sigmoid(z)  # (B, W, M)
        expand = np.where(
            chosen, -np.inf, score[:, :, None] + exam[:, :, None] * eff * c.value[:, None, :]
        )
        flat = expand.reshape(B, W * M)
        Wn = min(beam, W * M)
        top = np.argsort(-flat, axis=1, kind="stable")[:, :Wn]  # (B, Wn)
        w, j = top // M, top % M
        eff_j = eff[rows, w, j]  # (B, Wn)
        seq = np.concatenate([seq[rows, w], j[:, :, None]], axis=2)
        score = flat[rows, top]
        exam = exam[rows, w] * c.base_cont[:, None] * (1.0 - cfg.abandonment * (1.0 - eff_j))
        cat_j = c.cat[rows, j]  # (B, Wn)
        counts = counts[rows, w]
        counts[rows, np.arange(Wn)[None, :], cat_j] += 1
        comp_seen = np.maximum(comp_seen[rows, w], comp[cat_j])
        chosen = chosen[rows, w]
        chosen[rows, np.arange(Wn)[None, :], j] = True
    best = np.argmax(score, axis=1)
    return seq[np.arange(B), best]


def _local_search(world: World, c: _Candidates, pos: np.ndarray, max_rounds: int) -> np.ndarray:
    """Best-improvement local search from pos (B, k): swap two slots, or replace a slot
    with an unexposed candidate, until no move improves (or max_rounds)."""
    B, K = pos.shape
    M = c.logit.shape[1]
    pos = pos.copy()
    current = _utility_of_positions(world, c, pos[:, None, :])[:, 0]
    ii, jj = np.triu_indices(K, 1)
    active = np.arange(B)
    for _ in range(max_rounds):
        if active.size == 0:
            break
        p = pos[active]  # (A, K)
        A = p.shape[0]
        # swaps: (A, S, K)
        swaps = np.repeat(p[:, None, :], ii.size, axis=1)
        s = np.arange(ii.size)
        swaps[:, s, ii], swaps[:, s, jj] = p[:, jj], p[:, ii]
        # replacements: slot t <- an unused candidate (A, K * (M - K), K)
        used = np.zeros((A, M), dtype=bool)
        used[np.arange(A)[:, None], p] = True
        unused = np.argsort(used, axis=1, kind="stable")[:, : M - K]  # (A, M - K)
        reps = np.repeat(p[:, None, :], K * (M - K), axis=1)
        slot = np.repeat(np.arange(K), M - K)
        reps[:, np.arange(K * (M - K)), slot] = np.tile(unused, K)
        moves = np.concatenate([swaps, reps], axis=1)  # (A, R, K)
        util = np.empty(moves.shape[:2])
        step = max(1, 4_000_000 // (moves.shape[1] * K * K))  # bound the (rows, K, K) temporaries
        for a in range(0, A, step):
            util[a : a + step] = _utility_of_positions(
                world, _take_rows(c, active[a : a + step]), moves[a : a + step]
            )
        pad = c.pad[active][:, None, :]  # (A, 1, M)
        adds_pad = np.take_along_axis(pad, moves, axis=2).any(2)  # (A, R)
        has_pad = np.take_along_axis(pad, p[:, None, :], axis=2).any(2)  # (A, 1)
        bad = adds_pad & ~has_pad
        util[bad] = -np.inf  # never swap a real item for padding
        best = util.argmax(1)
        gain = util[np.arange(A), best] - current[active]
        better = gain > 1e-12
        pos[active[better]] = moves[np.arange(A)[better], best[better]]
        current[active[better]] = util[np.arange(A)[better], best[better]]
        active = active[better]
    return pos


def _take_rows(c: _Candidates, idx: np.ndarray) -> _Candidates:
    return _Candidates(**{f.name: getattr(c, f.name)[idx] for f in fields(c)})


def search_best_lists(
    world: World,
    user_idx: np.ndarray,
    cand_items: np.ndarray,
    k: int,
    beam: int = 8,
    local_search: bool = True,
    cand_mask: np.ndarray | None = None,
    max_rounds: int = 20,
) -> np.ndarray:
    """A near-best list (B, k) of item indices under the true user model: beam search
    over candidates (B, M) (-1 or cand_mask False = padding), seeded also with the
    pointwise sort by expected click value, then pairwise-swap / replace local search.
    Slots that only padding could fill are -1."""
    cand_items = np.asarray(cand_items)
    B, M = cand_items.shape
    if not 1 <= k <= M:
        raise ValueError(f"k must be in [1, M={M}], got {k}")
    c = _candidates(world, user_idx, cand_items, cand_mask)
    beamed = _beam_search(world, c, k, beam)
    greedy = np.argsort(-(sigmoid(c.logit) * c.value), axis=1, kind="stable")[:, :k]
    starts = np.stack([beamed, greedy], axis=1)  # (B, 2, k)
    util = _utility_of_positions(world, c, starts)
    pos = starts[np.arange(B), util.argmax(1)]
    if local_search:
        pos = _local_search(world, c, pos, max_rounds)
    # padding is transparent to the user model, so moving it to the end changes nothing
    pos = np.take_along_axis(pos, np.argsort(np.take_along_axis(c.pad, pos, 1), 1, "stable"), 1)
    items = np.take_along_axis(cand_items, pos, axis=1)
    return np.where(np.take_along_axis(c.pad, pos, axis=1), -1, items)


def headroom(
    world: World, batch: ListBatch, beam: int = 8, local_search: bool = True
) -> dict[str, float]:
    """Mean true utility of the logged exposure, the upstream top-k, the top-k by true
    pointwise relevance, the top-k by true expected click value (relevance × value) and
    the searched best list, with standard errors of the search's gains (paired)."""
    users = batch.user_id
    cand = np.where(batch.cand_mask, batch.item_id, -1)
    k = batch.k
    c = _candidates(world, users, cand, None)

    def items_at(pos: np.ndarray) -> np.ndarray:
        ok = pos >= 0
        it = np.take_along_axis(cand, np.where(ok, pos, 0), axis=1)
        return np.where(ok, it, -1)

    lists = {
        "logged": items_at(batch.exposed),
        # upstream order = candidate order, skipping padding
        "upstream": items_at(np.argsort(c.pad, axis=1, kind="stable")[:, :k]),
        "pointwise_relevance": items_at(np.argsort(-c.logit, axis=1, kind="stable")[:, :k]),
        "pointwise_value": items_at(
            np.argsort(-(sigmoid(c.logit) * c.value), axis=1, kind="stable")[:, :k]
        ),
        "searched": search_best_lists(world, users, cand, k, beam=beam, local_search=local_search),
    }
    util = {name: true_utility(world, users, lst) for name, lst in lists.items()}
    n = len(batch)
    out: dict[str, float] = {"n": float(n)}
    out.update({name: float(u.mean()) for name, u in util.items()})
    for base in ("pointwise_relevance", "pointwise_value"):
        diff = util["searched"] - util[base]
        out[f"gain_vs_{base}"] = float(diff.mean() / util[base].mean())
        out[f"se_gain_vs_{base}"] = float(diff.std(ddof=1) / np.sqrt(n) / util[base].mean())
    out["mean_clicks_logged"] = float(batch.click.sum(1).mean())
    return out
