"""The simulated world: its items (categories, creators, quality, duration, freshness, a
latent vector, Zipf-like popularity) and its users (latent preference, category
affinities, diversity appetite, patience, activity), generated from a seed and saved as
one .npz (numpy only, no torch).

How users respond to a list is model/user_model.py (the gold); how requests are drawn,
retrieved and logged is model/simulated_logs.py; the best lists a search under the user
model finds are model/best_lists.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np


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
