"""The in-memory form of logged requests: one padded numpy batch (no torch).

Conventions shared by every part of model/:
- Candidates arrive in upstream order: candidate j has upstream position j (0-based),
  so "the upstream order" is simply 0, 1, 2, ...
- Padding: item_id = -1 and cand_mask = False for missing candidates; exposed = -1
  for missing exposure slots (feedback 0 there).
- Ids are raw (user and item ids as logged); hashing happens in contract/features.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class ListBatch:
    request_id: np.ndarray  # (B,) int64
    ts: np.ndarray  # (B,) int64, request time (logs are split by it)
    user_id: np.ndarray  # (B,) int64
    user_dense: np.ndarray  # (B, Fu) float32
    item_id: np.ndarray  # (B, M) int64, -1 = padding
    item_cat: np.ndarray  # (B, M, Fc) int64 raw categorical values
    item_dense: np.ndarray  # (B, M, Fd) float32
    upstream_score: np.ndarray  # (B, M) float32
    cand_mask: np.ndarray  # (B, M) bool
    exposed: np.ndarray  # (B, K) int64 indices into candidates, exposed order, -1 = padding
    click: np.ndarray  # (B, K) float32, per exposed slot
    like: np.ndarray  # (B, K) float32
    long_view: np.ndarray  # (B, K) float32
    # (B, M) float32: the logging policy's probability of exposing each candidate in its
    # top K (the simulator writes it; real logs may carry it). NaN = not logged: the
    # estimators that need it are off (model.estimators).
    propensity: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.propensity is None:
            object.__setattr__(
                self, "propensity", np.full(self.item_id.shape, np.nan, dtype=np.float32)
            )

    @property
    def has_propensity(self) -> bool:
        """True when every real candidate carries a logging propensity."""
        p = np.asarray(self.propensity)
        return bool(np.isfinite(p[self.cand_mask.astype(bool)]).all()) if len(self) else False

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def m(self) -> int:
        return int(self.item_id.shape[1])

    @property
    def k(self) -> int:
        return int(self.exposed.shape[1])

    def take(self, idx: np.ndarray | slice) -> ListBatch:
        """Rows idx of every array (a view for slices)."""
        return ListBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def with_(self, **changes: np.ndarray) -> ListBatch:
        return replace(self, **changes)

    @staticmethod
    def concat(batches: list[ListBatch]) -> ListBatch:
        """Concatenate along requests, padding M and K to the largest."""
        M = max(b.m for b in batches)
        K = max(b.k for b in batches)
        out = {}
        pads = {"item_id": -1, "exposed": -1, "propensity": np.nan}
        for f in fields(ListBatch):
            parts = []
            for b in batches:
                a = getattr(b, f.name)
                if a.ndim >= 2:
                    width = M if f.name in _M_FIELDS else K if f.name in _K_FIELDS else a.shape[1]
                    if a.shape[1] < width:
                        pad = [(0, 0)] * a.ndim
                        pad[1] = (0, width - a.shape[1])
                        a = np.pad(a, pad, constant_values=pads.get(f.name, 0))
                parts.append(a)
            out[f.name] = np.concatenate(parts, axis=0)
        return ListBatch(**out)


_M_FIELDS = {"item_id", "item_cat", "item_dense", "upstream_score", "cand_mask", "propensity"}
_K_FIELDS = {"exposed", "click", "like", "long_view"}


def feedback_utility(
    batch: ListBatch, w_click: float = 1.0, w_like: float = 1.5, w_long_view: float = 0.8
) -> np.ndarray:
    """U_i per exposed slot (B, K): the configurable feedback weights of Rerank-DPO."""
    return (w_click * batch.click + w_like * batch.like + w_long_view * batch.long_view).astype(
        np.float32
    )
