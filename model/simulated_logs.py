"""How the simulated logs come about: requests drawn by user activity, an upstream
retrieval and noisy ranker proposing m candidates, the logging policy (the existing
system) exposing k of them, and feedback drawn from the user model (numpy only,
deterministic for a seed, no torch).
"""

from __future__ import annotations

import logging

import numpy as np

from model.data import ListBatch
from model.user_model import relevance_logit, sample_feedback
from model.world import World, WorldConfig

logger = logging.getLogger(__name__)

_TS0 = 1_700_000_000  # first request time (unix seconds) of simulated logs
_TS_STEP = 3  # seconds between consecutive simulated requests


_RETRIEVAL_BLOCK = 2_500_000  # pool entries scored at once: bounds memory at large m


def _retrieve(world: World, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """m distinct candidate items per request (n, m): a pool drawn half by popularity,
    half from the user's favourite categories, narrowed to m by noisy relevance."""
    rows = max(1, _RETRIEVAL_BLOCK // world.cfg.retrieval_pool)
    parts = [_retrieve_block(world, users[s : s + rows], rng) for s in range(0, len(users), rows)]
    return np.concatenate(parts) if parts else np.zeros((0, world.cfg.m), dtype=np.int64)


def _retrieve_block(world: World, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cfg = world.cfg
    n, P, C = users.shape[0], cfg.retrieval_pool, cfg.n_categories
    n_pop = P // 2
    pop_cdf, by_cat, cat_key, cat_total = world.retrieval_tables
    pop_draws = np.searchsorted(pop_cdf, rng.random((n, n_pop)) * pop_cdf[-1], side="right")

    # category draws: category ~ softmax(affinity), then item ~ popularity inside it
    logits = np.where(cat_total > 0, world.user_affinity[users].astype(np.float64), -np.inf)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    cat_cdf = np.cumsum(probs / probs.sum(1, keepdims=True), axis=1)  # (n, C)
    u = rng.random((n, P - n_pop))
    cats = (cat_cdf[:, None, :] < u[:, :, None]).sum(-1).clip(max=C - 1)  # (n, P - n_pop)
    at = np.searchsorted(cat_key, cats + rng.random(cats.shape), side="right")
    cat_draws = by_cat[at.clip(max=len(by_cat) - 1)]

    pool = np.concatenate([pop_draws.clip(max=cfg.n_items - 1), cat_draws], axis=1)
    pool = np.sort(pool, axis=1)  # (n, P), duplicates adjacent
    dup = np.zeros(pool.shape, dtype=bool)
    dup[:, 1:] = pool[:, 1:] == pool[:, :-1]
    noise = cfg.retrieval_noise * rng.gumbel(size=pool.shape)
    score = np.where(dup, -np.inf, relevance_logit(world, users, pool) + noise)
    for row in np.flatnonzero((~dup).sum(1) < cfg.m):  # rare: too few distinct items
        pool[row] = rng.choice(cfg.n_items, size=P, replace=False)
        score[row] = relevance_logit(world, users[row : row + 1], pool[row][None])[0]
    top = np.argpartition(-score, cfg.m - 1, axis=1)[:, : cfg.m]
    return np.take_along_axis(pool, top, axis=1).astype(np.int64)


def logging_policy(
    world: World, upstream_score: np.ndarray, cand_items: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The existing system's exposure (B, k) as indices into candidates: greedy on
    upstream scores perturbed by Gumbel exploration noise, with a per-category cap."""
    cfg = world.cfg
    B, M = cand_items.shape
    cat = world.item_category[cand_items]  # (B, M)
    noisy = upstream_score + cfg.explore_temperature * rng.gumbel(size=(B, M))
    counts = np.zeros((B, cfg.n_categories), dtype=np.int64)
    chosen = np.zeros((B, M), dtype=bool)
    exposed = np.empty((B, cfg.k), dtype=np.int64)
    rows = np.arange(B)
    for t in range(cfg.k):
        allowed = ~chosen & (np.take_along_axis(counts, cat, axis=1) < cfg.category_cap)
        stuck = ~allowed.any(1)  # the cap cannot be met: relax it
        allowed[stuck] = ~chosen[stuck]
        j = np.where(allowed, noisy, -np.inf).argmax(1)
        exposed[:, t] = j
        chosen[rows, j] = True
        counts[rows, cat[rows, j]] += 1
    return exposed


def exposure_propensity(
    world: World,
    upstream_score: np.ndarray,
    cand_items: np.ndarray,
    exposed: np.ndarray,
    rng: np.random.Generator,
    draws: int = 63,
    block: int = 2_000,
) -> np.ndarray:
    """P(the logging policy exposes candidate j in its top k), (B, M) float32: the share of
    `draws` fresh runs of logging_policy on the same scores that expose j, counting the
    logged exposure as one more draw (so a logged item never has propensity 0)."""
    B, M = cand_items.shape
    counts = np.zeros((B, M), dtype=np.float64)
    rows = np.arange(B)[:, None]
    counts[rows, exposed] += 1.0
    for s in range(0, B, block):
        e = min(B, s + block)
        n = e - s
        rep = logging_policy(
            world,
            np.repeat(upstream_score[s:e], draws, axis=0),
            np.repeat(cand_items[s:e], draws, axis=0),
            rng,
        )  # (n * draws, k)
        hit = np.zeros((n * draws, M), dtype=np.float64)
        hit[np.arange(n * draws)[:, None], rep] = 1.0
        counts[s:e] += hit.reshape(n, draws, M).sum(1)
    return (counts / (draws + 1)).astype(np.float32)


def sample_requests(
    world: World,
    n: int,
    rng: np.random.Generator,
    first_request: int = 0,
    propensity_rng: np.random.Generator | None = None,
) -> ListBatch:
    """n logged requests: users by activity, m retrieved candidates sorted by a noisy
    upstream score, the logging policy's exposure and feedback sampled from the user
    model. request_id = first_request + row; ts increases with request_id. With
    propensity_rng, the logging policy's exposure propensities (exposure_propensity,
    from that stream, so the logs themselves do not change) are logged too."""
    cfg = world.cfg
    users = np.searchsorted(np.cumsum(world.user_activity), rng.random(n), side="right")
    users = users.clip(max=cfg.n_users - 1).astype(np.int64)
    cand = _retrieve(world, users, rng)  # (n, m)
    upstream = relevance_logit(world, users, cand) + cfg.upstream_noise * rng.standard_normal(
        cand.shape
    )
    order = np.argsort(-upstream, axis=1, kind="stable")  # candidate j has upstream position j
    cand = np.take_along_axis(cand, order, axis=1)
    upstream = np.take_along_axis(upstream, order, axis=1).astype(np.float32)
    exposed = logging_policy(world, upstream, cand, rng)
    fb = sample_feedback(world, users, np.take_along_axis(cand, exposed, axis=1), rng)
    rid = first_request + np.arange(n, dtype=np.int64)
    propensity = None
    if propensity_rng is not None:
        propensity = exposure_propensity(world, upstream, cand, exposed, propensity_rng)
    return ListBatch(
        request_id=rid,
        ts=_TS0 + _TS_STEP * rid,
        user_id=users,
        user_dense=world.user_features[users],
        item_id=cand,
        item_cat=np.stack([world.item_category[cand], world.item_creator[cand]], axis=-1),
        item_dense=np.stack(
            [world.item_quality[cand], world.item_duration[cand], world.item_freshness[cand]],
            axis=-1,
        ),
        upstream_score=upstream,
        cand_mask=np.ones(cand.shape, dtype=bool),
        exposed=exposed,
        click=fb["click"],
        like=fb["like"],
        long_view=fb["long_view"],
        propensity=propensity,
    )


def generate_logs(
    cfg: WorldConfig,
    seed: int,
    n_requests: int,
    chunk: int = 20_000,
    progress: bool = True,
    propensity: bool = False,
) -> tuple[World, ListBatch]:
    """A world and n_requests logged requests (deterministic for seed, n_requests, chunk).
    propensity=True also logs the logging policy's exposure propensities (from their own
    random stream: the requests and feedback are the same either way)."""
    world = World.generate(cfg, seed)
    rng = np.random.default_rng([seed, 1])  # a stream independent of the world's
    prop_rng = np.random.default_rng([seed, 2]) if propensity else None
    starts = range(0, n_requests, chunk)
    try:
        from tqdm import tqdm

        bar = tqdm(starts, desc="simulate requests", unit="chunk", disable=not progress)
    except ImportError:  # tqdm is a train extra; the simulator works without it
        bar = starts
    batches = [sample_requests(world, min(chunk, n_requests - s), rng, s, prop_rng) for s in bar]
    logs = ListBatch.concat(batches) if batches else sample_requests(world, 0, rng)
    logger.info(
        "simulated %d requests (seed %d): %.2f clicks per exposed list",
        len(logs),
        seed,
        float(logs.click.sum(1).mean()) if len(logs) else 0.0,
    )
    return world, logs
