"""Paired comparisons of two rerankers on the same requests (numpy only).

Each world (seed) is its own test set; a claim "a beats b" is about the per-request
differences d = U_a − U_b on the same requests. Per world: the mean of d and its
standard error sd(d) / sqrt(n). Pooled over worlds: the mean of the per-world means
(each world weighs the same) with SE sqrt(Σ SE_w²) / W. Intervals are normal 95%;
p-values two-sided; across the baselines of one claim, p-values are Holm-corrected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """One world: mean of a − b, its SE, relative gain over b's mean, z and p."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    mean = float(d.mean()) if n else float("nan")
    base = float(np.mean(b)) if n else float("nan")
    return _finish(mean, se, base)


def _finish(mean: float, se: float, base: float) -> dict[str, float]:
    z = mean / se if se and se > 0 else float("nan")
    p = 2.0 * _norm_sf(abs(z)) if math.isfinite(z) else float("nan")
    return {
        "diff": mean,
        "se": se,
        "lo": mean - Z95 * se,
        "hi": mean + Z95 * se,
        "rel": mean / base if base else float("nan"),
        "rel_lo": (mean - Z95 * se) / base if base else float("nan"),
        "rel_hi": (mean + Z95 * se) / base if base else float("nan"),
        "z": z,
        "p": p,
    }


def pooled(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> dict[str, float]:
    """Several worlds: a[w], b[w] per-request utilities of world w (paired). The pooled
    difference is the mean of the worlds' mean differences; wins = worlds with a > b."""
    per = [paired(x, y) for x, y in zip(a, b, strict=True)]
    W = len(per)
    mean = float(np.mean([p["diff"] for p in per]))
    se = float(math.sqrt(sum(p["se"] ** 2 for p in per)) / W)
    base = float(np.mean([np.mean(y) for y in b]))
    out = _finish(mean, se, base)
    out["wins"] = float(sum(p["diff"] > 0 for p in per))
    out["worlds"] = float(W)
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN)."""
    p = np.asarray(pvalues, np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, np.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(x) for x in out]
