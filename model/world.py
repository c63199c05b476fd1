"""The simulated world: items, users, an upstream ranker, a logging policy and a user
model whose ground truth is known (numpy only, deterministic for a seed, no torch).

The user model (the gold), for user u shown a list y_1..y_K:
- pointwise relevance r(u, i) = σ(bias + latent match u·v_i + category affinity
  + quality + freshness + popularity);
- category satiation: every earlier item of the same category lowers the logit of
  y_t by s_u (larger for users with a high diversity appetite); complements: an
  earlier item of a complementary category raises it. e_t = σ(that logit) is the
  effective relevance;
- cascade examination: the user examines y_1, and after examining y_t continues
  with probability c_u·(1 − a·(1 − e_t)): c_u is the user's patience (position
  decay) and a poor item raises the chance the user abandons the list;
- P(click_t) = P(examine_t)·e_t; like and long view happen only after a click
  (like from quality, long view from duration and match).
Continuation does not depend on the realized click, so the expected feedback has a
closed form (list_feedback_probs) and true_utility is exact, not a Monte Carlo
estimate. Because of satiation, complements and abandonment, the best list is not
the pointwise sort: search_best_lists and headroom measure how much a reranker can win.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from model.data import ListBatch

logger = logging.getLogger(__name__)

_TS0 = 1_700_000_000  # first request time (unix seconds) of simulated logs
_TS_STEP = 3  # seconds between consecutive simulated requests


@dataclass(frozen=True)
class WorldConfig:
    """Sizes, generative knobs and user-model strengths of the simulated world."""

    # sizes
    n_items: int = 20_000  # enough for a long popularity tail and some id-hash collisions
    n_users: int = 5_000  # heavy users repeat, so personalization can be learned
    n_categories: int = 20  # few enough that top candidates share categories (satiation bites)
    n_creators: int = 2_000  # ~10 items per creator: the creator feature carries signal
    latent_dim: int = 8  # == the pref_0..pref_7 user features of FeatureSchema
    m: int = 30  # candidates per request (the Kuaishou setting)
    k: int = 10  # exposed items per request
    # popularity and activity
    item_zipf: float = 1.0  # item popularity ∝ rank^-a: a long tail of rarely seen items
    user_zipf: float = 0.8  # user activity ∝ rank^-a: some users make many requests
    creator_zipf: float = 0.8  # creator sizes ∝ rank^-a: a few prolific creators
    category_zipf: float = 0.6  # category sizes ∝ rank^-a: some categories dominate
    creator_home_prob: float = 0.85  # share of a creator's items in its home category
    popularity_quality_corr: float = 0.5  # popular items tend to be good ones
    # upstream retrieval and ranking
    retrieval_pool_factor: int = 4  # pool of factor·m items (popularity + user categories)
    retrieval_noise: float = 1.0  # Gumbel scale when retrieval picks m of the pool
    upstream_noise: float = 1.0  # σ of the upstream score's error on the relevance logit
    # logging policy (the existing system)
    explore_temperature: float = 0.5  # Gumbel scale on upstream scores: logged orders vary
    category_cap: int = 4  # at most this many items of one category in the exposed k
    # observable user features
    user_feature_noise: float = 0.5  # σ of noise on observed pref/diversity/patience
    # pointwise relevance logit = bias + Σ weight·term
    relevance_bias: float = -3.5  # sets the base click rate (about 1.5 clicks per list of 10)
    w_match: float = 0.8  # latent match u·v (items' v have unit norm; u ~ N(0, I))
    w_affinity: float = 0.6  # the user's affinity for the item's category
    w_quality: float = 0.35  # quality helps everyone a little
    w_freshness: float = 0.2  # fresher items are a little more attractive
    w_popularity: float = 0.2  # popular items are a little more clickable
    # intra-list user model
    satiation: float = 0.6  # logit drop per earlier same-category item (average user)
    diversity_gain: float = 1.6  # satiation_u = satiation·(1 + gain·(diversity_u − ½))
    complement: float = 0.8  # logit boost from an earlier complementary-category item
    complement_extra_edges: int = 6  # complement pairs beyond one partner per category
    abandonment: float = 0.35  # continuation ×(1 − a·(1 − e_t)): poor items end sessions
    position_decay: float = 1.0  # continuation base = 1 − decay·(1 − patience_u)
    # engagement after a click
    like_bias: float = -2.0  # likes are rarer than long views (about 45% of clicks)
    like_quality: float = 1.0  # likes follow quality
    long_view_bias: float = -0.4  # about 60% of clicks become long views
    long_view_duration: float = -0.8  # long items are less often watched to the end
    long_view_match: float = 0.6  # well matched items are watched longer
    # feedback weights of the utility (and of Rerank-DPO's U)
    w_click: float = 1.0  # the paper's richer-feedback weights
    w_like: float = 1.5  # a like is a stronger signal than a click
    w_long_view: float = 0.8  # a long view is a weaker one

    def __post_init__(self) -> None:
        for name in ("n_items", "n_users", "n_categories", "n_creators", "latent_dim", "m", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.m:
            raise ValueError(f"WorldConfig.k ({self.k}) must be <= m ({self.m})")
        if self.retrieval_pool_factor < 1:
            raise ValueError(
                f"retrieval_pool_factor must be >= 1, got {self.retrieval_pool_factor}"
            )
        if self.n_items < self.retrieval_pool:
            raise ValueError(f"n_items ({self.n_items}) must be >= the retrieval pool")
        if not 0.0 <= self.abandonment <= 1.0:
            raise ValueError(f"abandonment must be in [0, 1], got {self.abandonment}")

    @property
    def retrieval_pool(self) -> int:
        return self.retrieval_pool_factor * self.m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown WorldConfig fields: {sorted(unknown)}")
        return cls(**d)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _zipf_probs(
    n: int, a: float, rng: np.random.Generator, key: np.ndarray | None = None
) -> np.ndarray:
    """Zipf-like probabilities over n entities, ranks assigned by descending key (random
    when key is None). (n,) float64 summing to 1."""
    order = rng.permutation(n) if key is None else np.argsort(-key, kind="stable")
    p = np.empty(n)
    p[order] = (np.arange(1, n + 1, dtype=np.float64)) ** -a
    return p / p.sum()


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


@dataclass(frozen=True, eq=False)
class World:
    """Everything the simulator knows. Item and user ids equal their row index."""

    cfg: WorldConfig
    seed: int
    # categories and creators
    category_latent: np.ndarray  # (C, d) float32 unit vectors
    complement_matrix: np.ndarray  # (C, C) float32 symmetric, sparse, zero diagonal
    creator_category: np.ndarray  # (Nc,) int64 home category
    creator_latent: np.ndarray  # (Nc, d) float32 style offset
    # items
    item_category: np.ndarray  # (N,) int64
    item_creator: np.ndarray  # (N,) int64
    item_quality: np.ndarray  # (N,) float32 ~ N(0, 1)
    item_duration: np.ndarray  # (N,) float32 standardized log-duration
    item_freshness: np.ndarray  # (N,) float32 ~ N(0, 1)
    item_latent: np.ndarray  # (N, d) float32 unit vectors
    item_popularity: np.ndarray  # (N,) float64 probabilities, Zipf-like
    # users
    user_pref: np.ndarray  # (U, d) float32 latent preference ~ N(0, I)
    user_affinity: np.ndarray  # (U, C) float32 category affinity
    user_diversity: np.ndarray  # (U,) float32 in (0, 1): appetite for variety
    user_patience: np.ndarray  # (U,) float32 in (0, 1): base continuation probability
    user_activity: np.ndarray  # (U,) float64 probabilities, Zipf-like
    user_features: np.ndarray  # (U, d + 2) float32 observed: pref_*, diversity, patience

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def generate(cls, cfg: WorldConfig, seed: int) -> World:
        rng = np.random.default_rng(seed)
        C, d, N, Nc, U = cfg.n_categories, cfg.latent_dim, cfg.n_items, cfg.n_creators, cfg.n_users

        category_latent = _unit(rng.standard_normal((C, d)))
        complement = np.zeros((C, C))
        perm = rng.permutation(C)  # one partner per category (pairs), then a few extra edges
        for a, b in zip(perm[0::2], perm[1::2], strict=False):
            complement[a, b] = rng.uniform(0.5, 1.0)
        for _ in range(cfg.complement_extra_edges):
            a, b = rng.choice(C, size=2, replace=False) if C > 1 else (0, 0)
            complement[a, b] = rng.uniform(0.5, 1.0)
        complement = np.maximum(complement, complement.T)
        np.fill_diagonal(complement, 0.0)

        category_p = _zipf_probs(C, cfg.category_zipf, rng)
        creator_category = rng.choice(C, size=Nc, p=category_p)
        creator_latent = 0.6 * _unit(rng.standard_normal((Nc, d)))
        creator_quality = rng.standard_normal(Nc)

        # items: a creator's items sit mostly in its home category and share its style
        item_creator = rng.choice(Nc, size=N, p=_zipf_probs(Nc, cfg.creator_zipf, rng))
        at_home = rng.random(N) < cfg.creator_home_prob
        item_category = np.where(
            at_home, creator_category[item_creator], rng.choice(C, size=N, p=category_p)
        )
        item_latent = _unit(
            category_latent[item_category]
            + creator_latent[item_creator]
            + 0.5 * rng.standard_normal((N, d)) / np.sqrt(d)
        )
        item_quality = _standardize(0.6 * creator_quality[item_creator] + rng.standard_normal(N))
        item_duration = _standardize(
            rng.standard_normal(N) + 0.3 * rng.standard_normal(C)[item_category]
        )
        item_freshness = rng.standard_normal(N)
        rho = cfg.popularity_quality_corr
        pop_key = rho * item_quality + np.sqrt(max(1.0 - rho**2, 0.0)) * rng.standard_normal(N)
        item_popularity = _zipf_probs(N, cfg.item_zipf, rng, key=pop_key)

        # users
        user_pref = rng.standard_normal((U, d))
        user_affinity = user_pref @ category_latent.T + 0.5 * rng.standard_normal((U, C))
        user_diversity = rng.beta(2.0, 2.0, size=U)
        user_patience = 0.55 + 0.43 * rng.beta(4.0, 2.0, size=U)  # in (0.55, 0.98)
        user_activity = _zipf_probs(U, cfg.user_zipf, rng)
        sigma = cfg.user_feature_noise
        user_features = np.concatenate(
            [
                user_pref + sigma * rng.standard_normal((U, d)),
                (_standardize(user_diversity) + sigma * rng.standard_normal(U))[:, None],
                (_standardize(user_patience) + sigma * rng.standard_normal(U))[:, None],
            ],
            axis=1,
        )

        f32 = np.float32
        return cls(
            cfg=cfg,
            seed=int(seed),
            category_latent=category_latent.astype(f32),
            complement_matrix=complement.astype(f32),
            creator_category=creator_category.astype(np.int64),
            creator_latent=creator_latent.astype(f32),
            item_category=item_category.astype(np.int64),
            item_creator=item_creator.astype(np.int64),
            item_quality=item_quality.astype(f32),
            item_duration=item_duration.astype(f32),
            item_freshness=item_freshness.astype(f32),
            item_latent=item_latent.astype(f32),
            item_popularity=item_popularity,
            user_pref=user_pref.astype(f32),
            user_affinity=user_affinity.astype(f32),
            user_diversity=user_diversity.astype(f32),
            user_patience=user_patience.astype(f32),
            user_activity=user_activity,
            user_features=user_features.astype(f32),
        )

    # ---- persistence (a single .npz, nothing pickled) ------------------------------------

    def save(self, path: str | Path) -> None:
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _META}
        meta = json.dumps({"config": self.cfg.to_dict(), "seed": self.seed, "format": 1})
        with open(path, "wb") as f:  # a file object: numpy would append .npz to a bare name
            np.savez_compressed(f, meta_json=np.array(meta), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> World:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta_json"]))
            arrays = {f.name: z[f.name] for f in fields(cls) if f.name not in _META}
        return cls(cfg=WorldConfig.from_dict(meta["config"]), seed=int(meta["seed"]), **arrays)

    # ---- tables -------------------------------------------------------------------------

    @property
    def n_items(self) -> int:
        return int(self.item_category.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_pref.shape[0])

    @cached_property
    def item_popularity_z(self) -> np.ndarray:
        """(N,) standardized log-popularity: the popularity term of relevance."""
        return _standardize(np.log(self.item_popularity))

    @cached_property
    def retrieval_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sampling tables of retrieval: popularity CDF (N,); items sorted by category
        (N,); their key c + within-category popularity CDF, in (c, c + 1] (N,); each
        category's total popularity (C,)."""
        order = np.argsort(self.item_category, kind="stable")
        cat_sorted = self.item_category[order]
        pop_sorted = self.item_popularity[order]
        cat_total = np.bincount(cat_sorted, weights=pop_sorted, minlength=self.cfg.n_categories)
        cat_start = np.concatenate([[0.0], np.cumsum(cat_total)[:-1]])
        within = (np.cumsum(pop_sorted) - cat_start[cat_sorted]) / cat_total[cat_sorted]
        return np.cumsum(self.item_popularity), order, cat_sorted + within, cat_total

    @property
    def item_id(self) -> np.ndarray:
        return np.arange(self.n_items, dtype=np.int64)

    @property
    def item_cat(self) -> np.ndarray:
        """(N, 2) int64 raw categorical features in FeatureSchema order (category, creator)."""
        return np.stack([self.item_category, self.item_creator], axis=1)

    @property
    def item_dense(self) -> np.ndarray:
        """(N, 3) float32 in FeatureSchema order (quality, duration, freshness)."""
        return np.stack([self.item_quality, self.item_duration, self.item_freshness], axis=1)


_META = ("cfg", "seed")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


# ---- the user model (gold) --------------------------------------------------------------


def _relevance_logit(world: World, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """(B,), (B, M) -> (B, M) float64 pointwise relevance logit; item_idx must be valid."""
    cfg = world.cfg
    u = np.asarray(user_idx)
    match = np.einsum("bd,bmd->bm", world.user_pref[u], world.item_latent[item_idx])
    affinity = np.take_along_axis(world.user_affinity[u], world.item_category[item_idx], axis=1)
    pop_z = world.item_popularity_z[item_idx]
    return (
        cfg.relevance_bias
        + cfg.w_match * match
        + cfg.w_affinity * affinity
        + cfg.w_quality * world.item_quality[item_idx]
        + cfg.w_freshness * world.item_freshness[item_idx]
        + cfg.w_popularity * pop_z
    ).astype(np.float64)


def relevance(world: World, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """Pointwise relevance probability (B, M) of items (B, M) for users (B,); -1 → 0."""
    item_idx = np.asarray(item_idx)
    pad = item_idx < 0
    r = _sigmoid(_relevance_logit(world, user_idx, np.where(pad, 0, item_idx)))
    return np.where(pad, 0.0, r)


def _engagement(
    world: World, user_idx: np.ndarray, item_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """P(like | click), P(long_view | click): (B, M) each; item_idx must be valid."""
    cfg = world.cfg
    match = np.einsum("bd,bmd->bm", world.user_pref[user_idx], world.item_latent[item_idx])
    like = _sigmoid(cfg.like_bias + cfg.like_quality * world.item_quality[item_idx])
    long_view = _sigmoid(
        cfg.long_view_bias
        + cfg.long_view_duration * world.item_duration[item_idx]
        + cfg.long_view_match * match
    )
    return like.astype(np.float64), long_view.astype(np.float64)


def _user_terms(world: World, user_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user satiation strength and base continuation probability, (B,) each."""
    cfg = world.cfg
    div = world.user_diversity[user_idx].astype(np.float64)
    satiation = cfg.satiation * np.maximum(1.0 + cfg.diversity_gain * (div - 0.5), 0.0)
    patience = world.user_patience[user_idx].astype(np.float64)
    base_cont = np.clip(1.0 - cfg.position_decay * (1.0 - patience), 0.0, 1.0)
    return satiation, base_cont


def _cascade(
    cfg: WorldConfig,
    complement_matrix: np.ndarray,
    logit: np.ndarray,
    cat: np.ndarray,
    pad: np.ndarray,
    satiation: np.ndarray,
    base_cont: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The intra-list part of the user model, vectorized over rows.

    logit, cat, pad: (R, K) relevance logit, category, padding of each slot;
    satiation, base_cont: (R,). Returns examine, effective relevance and continuation
    (the probability that the cascade goes on past slot t): (R, K) each. Padding is
    transparent: the user skips it (examine and effective relevance 0, continuation 1)."""
    K = logit.shape[1]
    earlier = np.tri(K, K, -1, dtype=bool)  # [t, s] = s < t
    valid_before = earlier[None] & ~pad[:, None, :]  # (R, K, K)
    n_same = ((cat[:, :, None] == cat[:, None, :]) & valid_before).sum(-1)  # (R, K)
    comp = complement_matrix[cat[:, :, None], cat[:, None, :]] * valid_before  # (R, K, K)
    z = logit - satiation[:, None] * n_same + cfg.complement * comp.max(-1, initial=0.0)
    eff = np.where(pad, 0.0, _sigmoid(z))
    cont = np.where(pad, 1.0, base_cont[:, None] * (1.0 - cfg.abandonment * (1.0 - eff)))
    exam = np.ones_like(eff)
    exam[:, 1:] = np.cumprod(cont[:, :-1], axis=1)
    return np.where(pad, 0.0, exam), eff, cont


def _feedback_probs(
    world: World, user_idx: np.ndarray, lists: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """list_feedback_probs and the cascade's continuation probabilities (B, K)."""
    user_idx = np.asarray(user_idx)
    lists = np.asarray(lists)
    pad = lists < 0
    items = np.where(pad, 0, lists)
    satiation, base_cont = _user_terms(world, user_idx)
    exam, eff, cont = _cascade(
        world.cfg,
        world.complement_matrix,
        _relevance_logit(world, user_idx, items),
        world.item_category[items],
        pad,
        satiation,
        base_cont,
    )
    like_c, long_view_c = _engagement(world, user_idx, items)
    like_c = np.where(pad, 0.0, like_c)
    long_view_c = np.where(pad, 0.0, long_view_c)
    click = exam * eff
    probs = {
        "examine": exam,
        "effective_relevance": eff,
        "click": click,
        "like": click * like_c,
        "long_view": click * long_view_c,
        "like_given_click": like_c,
        "long_view_given_click": long_view_c,
    }
    return probs, cont


def list_feedback_probs(
    world: World, user_idx: np.ndarray, lists: np.ndarray
) -> dict[str, np.ndarray]:
    """Expected feedback of each slot of lists (B, K) of item indices (-1 = padding).

    Returns (B, K) float64 arrays: examine, effective_relevance, click (= examine ·
    effective relevance), like and long_view (marginal: click · P(· | click)), and
    like_given_click, long_view_given_click."""
    return _feedback_probs(world, user_idx, lists)[0]


def _click_value(cfg: WorldConfig, like_c: np.ndarray, long_view_c: np.ndarray) -> np.ndarray:
    """Expected utility of one click: w_click + w_like·P(like|click) + w_lv·P(lv|click)."""
    return cfg.w_click + cfg.w_like * like_c + cfg.w_long_view * long_view_c


def true_utility(world: World, user_idx: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Expected utility (B,) of lists (B, K) of item indices (-1 = padding):
    Σ_t P(click_t)·(w_click + w_like·P(like|click) + w_long_view·P(long_view|click))."""
    p = list_feedback_probs(world, user_idx, lists)
    value = _click_value(world.cfg, p["like_given_click"], p["long_view_given_click"])
    return (p["click"] * value).sum(axis=1)


def sample_feedback(
    world: World, user_idx: np.ndarray, lists: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One draw of the cascade along lists (B, K): click, like, long_view (B, K) float32
    0/1 (0 on padding). Their expectations are list_feedback_probs'. Padding anywhere in
    a list is skipped, as in true_utility: the cascade goes on past it."""
    p, cont = _feedback_probs(world, user_idx, lists)
    B, K = p["click"].shape
    # one continuation draw per slot, with the cascade's own P(continue after t): 1 on
    # padding (not exam_{t+1} / exam_t, which is 0 / 0 after a padding slot)
    continued = rng.random((B, K - 1)) < cont[:, :-1]
    examined = np.ones((B, K), dtype=bool)
    examined[:, 1:] = np.cumprod(continued, axis=1).astype(bool)
    examined &= np.asarray(lists) >= 0
    click = examined & (rng.random((B, K)) < p["effective_relevance"])
    like = click & (rng.random((B, K)) < p["like_given_click"])
    long_view = click & (rng.random((B, K)) < p["long_view_given_click"])
    f32 = np.float32
    return {
        "click": click.astype(f32),
        "like": like.astype(f32),
        "long_view": long_view.astype(f32),
    }


# ---- requests and logging ---------------------------------------------------------------


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
    score = np.where(dup, -np.inf, _relevance_logit(world, users, pool) + noise)
    for row in np.flatnonzero((~dup).sum(1) < cfg.m):  # rare: too few distinct items
        pool[row] = rng.choice(cfg.n_items, size=P, replace=False)
        score[row] = _relevance_logit(world, users[row : row + 1], pool[row][None])[0]
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
    upstream = _relevance_logit(world, users, cand) + cfg.upstream_noise * rng.standard_normal(
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


# ---- the headroom check: how good can a list be under the true user model? -------------


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
    like_c, long_view_c = _engagement(world, user_idx, items)
    satiation, base_cont = _user_terms(world, user_idx)
    return _Candidates(
        logit=np.where(pad, -1e9, _relevance_logit(world, user_idx, items)),
        cat=world.item_category[items],
        value=_click_value(world.cfg, like_c, long_view_c),
        pad=pad,
        satiation=satiation,
        base_cont=base_cont,
    )


def _utility_of_positions(world: World, c: _Candidates, pos: np.ndarray) -> np.ndarray:
    """Utility (B, R) of lists pos (B, R, K) given as candidate indices."""
    B, R, K = pos.shape

    def gather(a: np.ndarray) -> np.ndarray:  # (B, M) -> (B * R, K)
        return np.take_along_axis(a[:, None, :], pos, axis=2).reshape(B * R, K)

    exam, eff, _ = _cascade(
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
        eff = _sigmoid(z)  # (B, W, M)
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
    greedy = np.argsort(-(_sigmoid(c.logit) * c.value), axis=1, kind="stable")[:, :k]
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
            np.argsort(-(_sigmoid(c.logit) * c.value), axis=1, kind="stable")[:, :k]
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
