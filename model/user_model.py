"""The user model of the simulated world: how a user responds to a list. Its ground truth
is known, so any list has an exact expected utility, the gold metric (numpy only, no
torch).

For user u shown a list y_1..y_K:
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
the pointwise sort: model/best_lists.py measures how much a reranker can win.
"""

from __future__ import annotations

import numpy as np

from model.world import World, WorldConfig


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def relevance_logit(world: World, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
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
    r = sigmoid(relevance_logit(world, user_idx, np.where(pad, 0, item_idx)))
    return np.where(pad, 0.0, r)


def engagement(
    world: World, user_idx: np.ndarray, item_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """P(like | click), P(long_view | click): (B, M) each; item_idx must be valid."""
    cfg = world.cfg
    match = np.einsum("bd,bmd->bm", world.user_pref[user_idx], world.item_latent[item_idx])
    like = sigmoid(cfg.like_bias + cfg.like_quality * world.item_quality[item_idx])
    long_view = sigmoid(
        cfg.long_view_bias
        + cfg.long_view_duration * world.item_duration[item_idx]
        + cfg.long_view_match * match
    )
    return like.astype(np.float64), long_view.astype(np.float64)


def user_terms(world: World, user_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user satiation strength and base continuation probability, (B,) each."""
    cfg = world.cfg
    div = world.user_diversity[user_idx].astype(np.float64)
    satiation = cfg.satiation * np.maximum(1.0 + cfg.diversity_gain * (div - 0.5), 0.0)
    patience = world.user_patience[user_idx].astype(np.float64)
    base_cont = np.clip(1.0 - cfg.position_decay * (1.0 - patience), 0.0, 1.0)
    return satiation, base_cont


def cascade(
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
    eff = np.where(pad, 0.0, sigmoid(z))
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
    satiation, base_cont = user_terms(world, user_idx)
    exam, eff, cont = cascade(
        world.cfg,
        world.complement_matrix,
        relevance_logit(world, user_idx, items),
        world.item_category[items],
        pad,
        satiation,
        base_cont,
    )
    like_c, long_view_c = engagement(world, user_idx, items)
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


def click_value(cfg: WorldConfig, like_c: np.ndarray, long_view_c: np.ndarray) -> np.ndarray:
    """Expected utility of one click: w_click + w_like·P(like|click) + w_lv·P(lv|click)."""
    return cfg.w_click + cfg.w_like * like_c + cfg.w_long_view * long_view_c


def true_utility(world: World, user_idx: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Expected utility (B,) of lists (B, K) of item indices (-1 = padding):
    Σ_t P(click_t)·(w_click + w_like·P(like|click) + w_long_view·P(long_view|click))."""
    p = list_feedback_probs(world, user_idx, lists)
    value = click_value(world.cfg, p["like_given_click"], p["long_view_given_click"])
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
