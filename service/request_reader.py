"""The request reader of POST /v1/rerank: a raw body -> `Parsed` (service/api.py), with the
checks that need the served bundle's feature schema and limits.

On the hot path a body goes through `RequestReader.read_json`: msgspec decodes it, typed
and checked in C, into structs made for the served bundle (its feature names are struct
fields: an unknown name, a wrong type or a missing field fails the decode), and a few range
checks take it into numpy arrays. It accepts only what the models of service/api.py
(strict, NaN/Infinity refused, no extra keys) and the bundle checks (feature names,
duplicates, k against m, ranges) accept too, and builds the same arrays; anything it is not
sure of goes the checked way (`model_validate_json` on the raw bytes, then `read`), whose
error names the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any

import msgspec
import numpy as np

from contract.features import FeatureSchema, hash_id, hash_ids, hash_items
from contract.ids import MAX_ID_LENGTH, item_problem, string_key, string_problem
from service.api import (
    _MAX_ID_LEN,
    _REQUEST_ID_OK,
    MAX_BUDGET_MS,
    Candidate,
    Limits,
    Parsed,
    RerankIn,
    _integral,
    invalid,
    parse_body,
)

_INT64 = (-(1 << 63), (1 << 63) - 1)
# (m,) int64 raw ids, (m,) float64 scores, (m, Fc) int64 raw categoricals, (m, Fd) float64
_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_F32_MAX = float(np.finfo(np.float32).max)
_RANGE = "out of the float32 range"


_ITEM_ID, _SCORE, _FEATURES = attrgetter("item_id"), attrgetter("score"), attrgetter("features")


@lru_cache(maxsize=1 << 16)
def _item_key(value: int | str) -> int | None:
    """An item id's key on the fast path of a request with string ids, None when it cannot
    be one (the checked path says why). Memoised with its check, in C: a catalog's ids
    repeat from request to request."""
    if item_problem(value) is not None:
        return None
    return string_key(value) if type(value) is str else value  # type: ignore[return-value]


@lru_cache(maxsize=1 << 12)
def _string_user_key(text: str) -> int | None:
    """The key of a string user id, None when it cannot be one."""
    return None if string_problem(text) is not None else string_key(text)


def _getter(fields: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    """obj -> (obj.f for f in fields), a tuple for any number of fields (attrgetter gives
    a bare value for one)."""
    if not fields:
        return lambda _: ()
    if len(fields) == 1:
        one = attrgetter(fields[0])
        return lambda obj: (one(obj),)
    return attrgetter(*fields)


def _feature_struct(name: str, ints: Sequence[str], floats: Sequence[str]) -> type:
    """A struct whose fields are the bundle's feature names (any string: the fields are
    f0, f1, ... renamed to them), ints then floats, each 0 when left out, no other name."""
    names = [*ints, *floats]
    fields = [(f"f{i}", int, 0) if i < len(ints) else (f"f{i}", float, 0.0)
              for i in range(len(names))]  # fmt: skip
    rename = {f"f{i}": n for i, n in enumerate(names)}
    return msgspec.defstruct(name, fields, rename=rename, forbid_unknown_fields=True, gc=False)


class _Wire:
    """The request as msgspec structs for one feature schema, and the getters of their
    feature values in the schema's order. msgspec in its default strict mode: a JSON
    integer for an int field, any number for a float field (not a bool, not a string),
    no NaN or Infinity (not JSON), no unknown key, no missing required key."""

    def __init__(self, cat: Sequence[str], dense: Sequence[str], user: Sequence[str]) -> None:
        item_features = _feature_struct("ItemFeatures", cat, dense)
        user_features = _feature_struct("UserFeatures", (), user)
        # an id: an integer or a string of a bounded length (so that no longer one reaches
        # the memoised key functions, whose cache holds each string it was asked about)
        wire_id = int | Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]
        candidate = msgspec.defstruct("Candidate", [
            ("item_id", wire_id), ("score", float),
            ("features", item_features, msgspec.field(default_factory=item_features)),
        ], forbid_unknown_fields=True, gc=False)  # fmt: skip
        user_struct = msgspec.defstruct("User", [
            ("id", wire_id),
            ("features", user_features, msgspec.field(default_factory=user_features)),
        ], forbid_unknown_fields=True, gc=False)  # fmt: skip
        request = msgspec.defstruct("RerankIn", [
            ("user", user_struct), ("candidates", list[candidate]), ("k", int),  # type: ignore[valid-type]
            ("request_id", str | None, None), ("budget_ms", float | None, None),
        ], forbid_unknown_fields=True)  # fmt: skip
        self.decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(request)
        fields = [f"f{i}" for i in range(len(cat) + len(dense))]
        self.cat_of = _getter(fields[: len(cat)])
        self.dense_of = _getter(fields[len(cat) :])
        self.user_of = _getter([f"f{i}" for i in range(len(user))])


class RequestReader:
    """The checks that need the bundle: feature names, sizes, k; and the arrays."""

    def __init__(self, schema: FeatureSchema, limits: Limits) -> None:
        self.schema, self.limits = schema, limits
        self.cat_index = {n: i for i, n in enumerate(schema.categorical_names)}
        self.dense_index = {n: i for i, n in enumerate(schema.item_dense)}
        self.user_index = {n: i for i, n in enumerate(schema.user_dense)}
        self.known = frozenset([*self.cat_index, *self.dense_index])
        self.user_known = frozenset(self.user_index)
        self.cat_names, self.dense_names = tuple(self.cat_index), tuple(self.dense_index)
        self._wire = _Wire(self.cat_names, self.dense_names, tuple(self.user_index))

    def read_json(self, body: bytes) -> Parsed:
        """Raw body -> Parsed (the fast path), or the checked path's Parsed or ApiError."""
        fast = self._fast(body)
        return fast if fast is not None else self.read(parse_body(body))

    def _fast(self, body: bytes) -> Parsed | None:
        """The body as arrays when it is certainly valid; None sends it the checked way.
        Three steps, each refusing what it is unsure of: the request's head (sizes, k,
        request id, budget, user id), the item ids' keys, the numbers' arrays."""
        try:
            req = self._wire.decoder.decode(body)
        except msgspec.DecodeError:  # invalid JSON, a wrong type, an unknown or missing key
            return None
        user_key = self._fast_head(req)
        if user_key is None:
            return None
        keys = _fast_item_keys(req.candidates)
        if keys is None:
            return None
        return self._fast_arrays(req, user_key, *keys)

    def _fast_head(self, req: Any) -> int | None:
        """The user id's key when the request's sizes, k, request id, budget and user id
        are certainly valid; None otherwise."""
        m, k, rid, budget = len(req.candidates), req.k, req.request_id, req.budget_ms
        lim = self.limits
        if not 1 <= m <= lim.max_candidates or not 1 <= k <= min(m, lim.max_k):
            return None
        if rid is not None and (len(rid) > _MAX_ID_LEN or not _REQUEST_ID_OK(rid)):
            return None
        if budget is not None and not 0 <= budget <= MAX_BUDGET_MS:  # NaN fails this too
            return None
        uid = req.user.id
        if type(uid) is str:
            return _string_user_key(uid)
        return uid if _INT64[0] <= uid <= _INT64[1] else None

    def _fast_arrays(
        self, req: Any, user_key: int, ids: list[Any], sent: list[int | str] | None
    ) -> Parsed | None:
        """The request's numbers as arrays, None when one is out of range (or an integer
        id negative: the checked way says which)."""
        cands, wire, k, budget = req.candidates, self._wire, req.k, req.budget_ms
        m = len(cands)
        feats = list(map(_FEATURES, cands))
        try:  # beyond int64 (msgspec reads up to uint64): OverflowError
            ids_a = np.array(ids, np.int64)
            cat_a = np.array(list(chain.from_iterable(map(wire.cat_of, feats))), np.int64)
        except OverflowError:
            return None
        # one float64 array of every number: the range check (beyond float32, inf) at once
        numbers = np.array([*map(_SCORE, cands), *chain.from_iterable(map(wire.dense_of, feats)),
                            *wire.user_of(req.user.features)])  # fmt: skip
        negative = sent is None and m and ids_a.min() < 0
        if negative or not (np.abs(numbers) <= _F32_MAX).all():
            return None  # negative ids, NaN, inf or beyond float32: the checked way says which
        numbers32 = numbers.astype(np.float32)
        n_cat, n_dense = len(self.cat_names), len(self.dense_names)
        return Parsed(
            request_id=req.request_id,
            item_ids=ids_a,
            upstream_score=numbers32[:m],
            item_cat=cat_a.reshape(m, n_cat),
            item_dense=numbers32[m : m + m * n_dense].reshape(m, n_dense),
            user_id=hash_id(user_key, self.schema.user_id_buckets, self.schema.hash_salt),
            user_dense=numbers32[m + m * n_dense :],
            k=k,
            budget_ms=None if budget is None else float(budget),
            sent_ids=sent,
        )

    def read(self, req: RerankIn) -> Parsed:
        m, lim = len(req.candidates), self.limits
        if m > lim.max_candidates:
            raise invalid("candidates", f"{m} candidates, at most {lim.max_candidates}")
        if not 1 <= req.k <= min(m, lim.max_k):
            raise invalid("k", f"k={req.k}, want 1..{min(m, lim.max_k)} (min(candidates, max_k))")
        # float64 while reading: values beyond float32's range are refused, not cast to inf
        user_dense = np.zeros(len(self.user_index))
        for name, value in req.user.features.items():
            at = self.user_index.get(name)
            if at is None:
                raise invalid(f"user.features.{name}", f"unknown feature; known: "
                              f"{sorted(self.user_index)}")  # fmt: skip
            if isinstance(value, int) and abs(value) > _F32_MAX:
                raise invalid(f"user.features.{name}", _RANGE)
            user_dense[at] = value
        user_key = _user_key(req.user.id)
        # only bodies the fast path (read_json) was unsure of come here: one candidate at
        # a time, so the first problem is named
        ids, scores, cat, dense = self._candidates_checked(req.candidates)
        if (np.abs(scores) > _F32_MAX).any():
            bad = int(np.flatnonzero(np.abs(scores) > _F32_MAX)[0])
            raise invalid(f"candidates[{bad}].score", _RANGE)
        if (np.abs(dense) > _F32_MAX).any():
            bad, at = (int(x[0]) for x in np.nonzero(np.abs(dense) > _F32_MAX))
            raise invalid(f"candidates[{bad}].features.{self.schema.item_dense[at]}", _RANGE)
        if (np.abs(user_dense) > _F32_MAX).any():
            at = int(np.flatnonzero(np.abs(user_dense) > _F32_MAX)[0])
            raise invalid(f"user.features.{self.schema.user_dense[at]}", _RANGE)
        user_bucket = hash_ids(np.array([user_key]), self.schema.user_id_buckets,
                               self.schema.hash_salt)  # fmt: skip
        sent = [c.item_id for c in req.candidates]
        return Parsed(
            request_id=req.request_id,
            item_ids=ids,
            upstream_score=scores.astype(np.float32),
            item_cat=cat,
            item_dense=dense.astype(np.float32),
            user_id=int(user_bucket[0]),
            user_dense=user_dense.astype(np.float32),
            k=req.k,
            budget_ms=req.budget_ms,
            sent_ids=sent if str in set(map(type, sent)) else None,
        )

    def _candidates_checked(self, cands: list[Candidate]) -> _Arrays:
        """One candidate at a time, refusing the first problem with its field."""
        m = len(cands)
        ids = np.empty(m, np.int64)
        scores = np.empty(m)
        cat = np.zeros((m, len(self.cat_index)), np.int64)
        dense = np.zeros((m, len(self.dense_index)))
        seen: dict[int, int] = {}
        for i, c in enumerate(cands):
            key = _checked_item_key(i, c.item_id)
            if key in seen:
                raise invalid(f"candidates[{i}].item_id", _duplicate(cands, seen[key], i))
            seen[key] = i
            ids[i], scores[i] = key, c.score
            for name, value in c.features.items():
                if (at := self.dense_index.get(name)) is not None:
                    if isinstance(value, int) and abs(value) > _F32_MAX:  # no float64 either
                        raise invalid(f"candidates[{i}].features.{name}", _RANGE)
                    dense[i, at] = value
                elif (at := self.cat_index.get(name)) is not None:
                    value = _integral(value)
                    if not isinstance(value, int) or not _INT64[0] <= value <= _INT64[1]:
                        raise invalid(f"candidates[{i}].features.{name}",
                                      "categorical feature: want an integer id")  # fmt: skip
                    cat[i, at] = int(value)
                else:
                    raise invalid(f"candidates[{i}].features.{name}", "unknown feature; known: "
                                  f"{sorted([*self.cat_index, *self.dense_index])}")  # fmt: skip
        return ids, scores, cat, dense

    def hashed(self, p: Parsed, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The item tower's inputs of `rows` (hashed as in training)."""
        h = hash_items(self.schema, p.item_ids[rows], p.item_cat[rows], p.item_dense[rows])
        return h.item_id, h.item_cat, h.item_dense


def _fast_item_keys(cands: list[Any]) -> tuple[list[Any], list[int | str] | None] | None:
    """(the item ids' keys, the ids as sent when some are strings), None when one cannot be
    an id or two are the same after normalisation ("12" is 12)."""
    ids: list[Any] = list(map(_ITEM_ID, cands))
    sent: list[int | str] | None = None  # integers: their own keys (negatives: later)
    if str in set(map(type, ids)):  # string ids: their keys (negative ones among them)
        sent, ids = ids, list(map(_item_key, ids))
        if None in ids:
            return None
    if len(set(ids)) != len(ids):
        return None
    return ids, sent


def _user_key(value: int | str) -> int:
    """user.id's key, or the 422 that says why it cannot be an id."""
    if isinstance(value, str):
        if (problem := string_problem(value)) is not None:
            raise invalid("user.id", problem)
        return string_key(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise invalid("user.id", "out of the int64 range")
    return value


def _checked_item_key(i: int, value: int | str) -> int:
    """candidates[i].item_id's key, or the 422 that says why it cannot be an item id."""
    if (problem := item_problem(value)) is not None:
        raise invalid(f"candidates[{i}].item_id", problem)
    return string_key(value) if isinstance(value, str) else value


def _duplicate(cands: list[Candidate], first: int, i: int) -> str:
    """The message of candidates[i], the same item as candidates[first]."""
    a, b = cands[first].item_id, cands[i].item_id
    if a == b and type(a) is type(b):
        return f"duplicate of candidates[{first}]"
    return f"duplicate of candidates[{first}] ({json.dumps(b)} is {json.dumps(a)})"
