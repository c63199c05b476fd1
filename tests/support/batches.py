"""Padded ListBatches for the log tests: a random one in a small schema, the padding the
reader gives back, and field-by-field equality."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from contract.features import FeatureSchema
from model.data import ListBatch

SCHEMA = FeatureSchema(
    item_categorical=(("category", 64), ("creator", 128)),
    item_dense=("quality", "duration"),
    user_dense=("pref_0", "patience"),
)


def random_batch(B: int = 13, M: int = 7, seed: int = 0) -> ListBatch:
    """A padded batch with m varying per row (one row full, so M is the true max) and K
    varying per row (including K = 0), padding at the tail as data.py prescribes."""
    rng = np.random.default_rng(seed)
    m = rng.integers(1, M + 1, B)
    m[0] = M
    k = np.minimum(rng.integers(0, M + 1, B), m)
    k[1] = 0
    K = int(k.max())
    cand = np.arange(M)[None, :] < m[:, None]  # (B, M)
    shown = np.arange(K)[None, :] < k[:, None]  # (B, K)
    exposed = np.full((B, K), -1, np.int64)
    for b in range(B):  # a random permutation prefix per row (test data only)
        exposed[b, : k[b]] = rng.permutation(m[b])[: k[b]]
    fc, fd = len(SCHEMA.categorical_names), len(SCHEMA.item_dense)

    def fb() -> np.ndarray:
        return np.where(shown, rng.random((B, K)) < 0.4, 0).astype(np.float32)

    return ListBatch(
        request_id=np.arange(1000, 1000 + B, dtype=np.int64),
        ts=rng.integers(0, 50, B).astype(np.int64),
        user_id=rng.integers(0, 10**12, B).astype(np.int64),
        user_dense=rng.standard_normal((B, len(SCHEMA.user_dense))).astype(np.float32),
        item_id=np.where(cand, rng.integers(0, 10**9, (B, M)), -1).astype(np.int64),
        item_cat=np.where(cand[..., None], rng.integers(0, 500, (B, M, fc)), 0).astype(np.int64),
        item_dense=np.where(cand[..., None], rng.random((B, M, fd)), 0).astype(np.float32),
        upstream_score=np.where(cand, rng.standard_normal((B, M)), 0).astype(np.float32),
        cand_mask=cand,
        exposed=exposed,
        click=fb(),
        like=fb(),
        long_view=fb(),
    )


def trimmed(batch: ListBatch) -> ListBatch:
    """The batch padded to its own largest m and K (as the reader pads)."""
    m = int(batch.cand_mask.sum(1).max(initial=0))
    k = int((batch.exposed >= 0).sum(1).max(initial=0))
    cut = {f: getattr(batch, f)[:, :m] for f in ("item_id", "item_cat", "item_dense")}
    cut |= {f: getattr(batch, f)[:, :m] for f in ("upstream_score", "cand_mask", "propensity")}
    cut |= {f: getattr(batch, f)[:, :k] for f in ("exposed", "click", "like", "long_view")}
    return batch.with_(**cut)


def assert_batches_equal(a: ListBatch, b: ListBatch) -> None:
    for f in fields(ListBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype, f.name
        np.testing.assert_array_equal(x, y, err_msg=f.name)
