"""The feature schema shared by training, export and serving (numpy only, no torch).

Ids of any size are hashed into a fixed number of buckets, so any item or user id
works at serving time without a vocabulary (a string id is first mapped to its 64-bit key
by contract.ids, then hashed like an integer). The hash is splitmix64 on uint64,
vectorized in numpy; the same function runs offline and online, and its name and
salt travel in every checkpoint and bundle manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from contract.ids import PAD_KEY

HASH_NAME = "splitmix64-v1"


@dataclass(frozen=True)
class FeatureSchema:
    """Names and bucket counts of every model input feature."""

    item_id_buckets: int = 65_536  # hashed item ids; collisions are shared embeddings
    user_id_buckets: int = 16_384
    # categorical item features: name -> hash buckets
    item_categorical: tuple[tuple[str, int], ...] = (("category", 1024), ("creator", 8192))
    item_dense: tuple[str, ...] = ("quality", "duration", "freshness")
    user_dense: tuple[str, ...] = (
        "pref_0", "pref_1", "pref_2", "pref_3", "pref_4", "pref_5", "pref_6", "pref_7",
        "diversity", "patience",
    )  # fmt: skip
    hash_name: str = HASH_NAME
    hash_salt: int = 0x5EED

    @property
    def categorical_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.item_categorical)

    @property
    def categorical_buckets(self) -> tuple[int, ...]:
        return tuple(b for _, b in self.item_categorical)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["item_categorical"] = [list(x) for x in self.item_categorical]
        d["item_dense"] = list(self.item_dense)
        d["user_dense"] = list(self.user_dense)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        d = dict(d)
        d["item_categorical"] = tuple((str(n), int(b)) for n, b in d["item_categorical"])
        d["item_dense"] = tuple(d["item_dense"])
        d["user_dense"] = tuple(d["user_dense"])
        return cls(**d)


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def hash_ids(ids: np.ndarray, buckets: int, salt: int = 0x5EED) -> np.ndarray:
    """splitmix64(id + salt) mod buckets, as int64. Bucket 0 is reserved for padding,
    so real ids land in [1, buckets)."""
    x = np.asarray(ids).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(salt) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(buckets - 1)).astype(np.int64) + 1


_MASK = (1 << 64) - 1


def hash_id(value: int, buckets: int, salt: int = 0x5EED) -> int:
    """hash_ids of one id, in plain Python (a request's user id: no numpy round trip)."""
    x = (value + salt + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return x % (buckets - 1) + 1


@dataclass(frozen=True)
class HashedItems:
    """Hashed item inputs of the item tower."""

    item_id: np.ndarray  # (..., ) int64 bucket
    item_cat: np.ndarray  # (..., Fc) int64 buckets
    item_dense: np.ndarray  # (..., Fd) float32


def hash_items(
    schema: FeatureSchema, item_id: np.ndarray, item_cat: np.ndarray, item_dense: np.ndarray
) -> HashedItems:
    """Id keys (contract.ids) and raw categoricals -> buckets. item_cat has the schema's
    categorical order on its last axis. Padding (key -1, PAD_KEY) maps to bucket 0
    everywhere; any other key, a string id's negative one included, is hashed."""
    pad = np.asarray(item_id) == PAD_KEY
    hid = hash_ids(item_id, schema.item_id_buckets, schema.hash_salt)
    hcat = np.stack(
        [
            hash_ids(item_cat[..., f], b, schema.hash_salt + 1 + f)
            for f, b in enumerate(schema.categorical_buckets)
        ],
        axis=-1,
    )
    hid[pad] = 0
    hcat[pad] = 0
    dense = np.where(pad[..., None], 0.0, item_dense).astype(np.float32)
    return HashedItems(hid, hcat, dense)
