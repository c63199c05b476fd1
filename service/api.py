"""The HTTP contract of POST /v1/rerank (design §6): pydantic models (the schema of record
for OpenAPI), the parse of a raw body, the request checks that need the bundle's feature
schema, and the one error type the handler maps to a stable JSON body.

The models are the schema of record. On the hot path a body goes through
`RequestReader.read_json`: msgspec decodes it, typed and checked in C, into structs made
for the served bundle (its feature names are struct fields: an unknown name, a wrong type
or a missing field fails the decode), and a few range checks take it into numpy arrays.
It accepts only what the models (strict, NaN/Infinity refused, no extra keys) and the
bundle checks (feature names, duplicates, k against m, ranges) accept too, and builds the
same arrays; anything it is not sure of goes the checked way (`model_validate_json` on the
raw bytes, then `read`), whose error names the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

from contract.features import FeatureSchema, hash_id, hash_ids, hash_items
from contract.ids import (
    ID_PATTERN,
    MAX_ID_LENGTH,
    item_problem,
    string_key,
    string_problem,
)

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

FeatureValue = Annotated[float, Field(allow_inf_nan=False)]


def _integral(value: Any) -> Any:
    """JSON has one number type: 12.0 is the integer 12 (JSON Schema says so too, and the
    OpenAPI schema's "integer" with it), taken exactly; 12.5 stays a float, refused."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# an integer field: strict (no strings, no booleans), but an integral JSON number is one
JsonInt = Annotated[int, BeforeValidator(_integral)]
# Limits the service enforces (RequestReader), stated in the schema (OpenAPI): the checks
# themselves stay in the reader, whose messages name the field and the reason
_F32 = float(np.finfo(np.float32).max)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_STRING_ID: dict[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN,
    "description": "A string id: printable ASCII without spaces. One that spells an int64 "
    "in canonical decimal form (\"123\", not \"0123\") is that integer; any other is "
    "hashed to a 64-bit key (contract/ids.py), the same way in training.",
}  # fmt: skip


def _id_schema(minimum: int, description: str) -> WithJsonSchema:
    """An id field's schema: an integer (an integral JSON number is one) or a string id.
    The reader checks both (its messages name the field); the schema states the limits."""
    integer = {"type": "integer", "minimum": minimum, "maximum": _INT64_MAX}
    return WithJsonSchema({"anyOf": [integer, _STRING_ID], "description": description})


UserId = Annotated[int | str, BeforeValidator(_integral), _id_schema(
    _INT64_MIN, "Raw user id: an int64 or a string id (hashed by the service as in training).",
)]  # fmt: skip
ItemId = Annotated[int | str, BeforeValidator(_integral), _id_schema(
    0, "Raw item id, unique within the request: an int64 >= 0 (negative integers are "
    "padding) or a string id. Duplicates are found after normalisation: \"123\" and 123 "
    "are the same item. Echoed as sent.",
)]  # fmt: skip
_F32_RANGE: dict[str, Any] = {"minimum": -_F32, "maximum": _F32}
MAX_BUDGET_MS = 60_000.0  # a minute: past it an answer no longer serves an online request
# what an HTTP header value can carry as is (no CR/LF, no non-Latin-1): the id is echoed
REQUEST_ID_PATTERN = r"^[\x21-\x7e]*$"
_REQUEST_ID_OK = re.compile(REQUEST_ID_PATTERN).match


class User(BaseModel):
    """The user the list is for."""

    model_config = _STRICT
    id: UserId
    features: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="User dense features by name (the bundle's user_dense names, see "
        "GET /v1/model). A known feature left out counts as 0; an unknown name is refused.",
    )


class Candidate(BaseModel):
    """One candidate, in upstream order."""

    model_config = _STRICT
    item_id: ItemId
    score: FeatureValue = Field(
        description="Upstream ranker's score (within the float32 range).",
        json_schema_extra=_F32_RANGE,
    )
    features: dict[str, int | FeatureValue] = Field(
        default_factory=dict,
        description="Item features by name: categorical ones (integers, raw ids) and dense "
        "ones (numbers). A known feature left out counts as 0; an unknown name is refused. "
        "Used only for items whose embedding is in no cache.",
    )


class RerankIn(BaseModel):
    """A rerank request."""

    model_config = _STRICT
    request_id: str | None = Field(
        default=None,
        max_length=128,
        pattern=REQUEST_ID_PATTERN,
        description="Echoed back, in the body and the X-Request-ID header: printable ASCII "
        "without spaces (a header value must be). Generated when absent.",
    )
    user: User
    candidates: list[Candidate] = Field(
        min_length=1, description="Candidates in upstream order (1..max_candidates)."
    )
    k: JsonInt = Field(
        description="Length of the returned list: 1..min(len(candidates), max_k).",
        json_schema_extra={"minimum": 1},
    )
    budget_ms: FeatureValue | None = Field(
        default=None,
        ge=0,
        le=MAX_BUDGET_MS,
        description="Latency budget in ms, 0..60000 (default: the server's).",
    )


class Item(BaseModel):
    item_id: int | str = Field(description="The candidate's item_id, exactly as sent.")
    score: float = Field(description="Score of the head that chose it (upstream score when "
                         "degraded to upstream order).")  # fmt: skip


class Timings(BaseModel):
    queue_ms: float = Field(description="Waiting for the engine.")
    cache_ms: float = Field(description="Embedding lookups (L1, Redis, item tower).")
    encode_ms: float
    decode_ms: float
    total_ms: float = Field(description="Arrival to response.")


Reason = Literal["budget", "overload", "cache", "model"]


class RerankOut(BaseModel):
    """A reranked list."""

    request_id: str
    model_version: str
    items: list[Item] = Field(description="k items, best first, distinct, from the request.")
    degraded: bool = Field(description="True: not the model's full list (see reason).")
    reason: Reason | None = Field(
        description="budget: deadline reached (list completed early or upstream order); "
        "overload: too many requests waiting; cache: no embeddings; model: engine failure."
    )
    passes: int = Field(description="Decoder passes run (0 when degraded to upstream order).")
    timings: Timings


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None


class ErrorOut(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """A request refused at the edge: HTTP status, error type, field (dotted path), reason."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type_, message, field

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, "field": self.field}}


def invalid(field: str | None, message: str) -> ApiError:
    return ApiError(422, "invalid_request", message, field)


def _loc(loc: tuple[int | str, ...]) -> str:
    """('candidates', 3, 'score') -> 'candidates[3].score'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# pydantic names the member of a union that failed after the field: an item feature
# (int | float) refused reads `candidates[0].features.category.int`; the field is the feature
_UNION_TAGS = frozenset({"int", "float"})
# an id (int | str) refused reads `user.id.int`: the field is the id
_ID_FIELDS, _ID_TAGS = frozenset({"id", "item_id"}), frozenset({"int", "str"})
_ID_TYPE_MESSAGE = "Input should be an integer or a string id"
_FEATURE_MESSAGE = "Input should be a number (an integer for a categorical feature)"
_REQUEST_ID_MESSAGE = (
    "printable ASCII without spaces only (it is echoed in the X-Request-ID header)"
)


def parse_body(body: bytes) -> RerankIn:
    """Raw JSON bytes -> RerankIn, or ApiError(422) naming the first bad field."""
    try:
        return RerankIn.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise invalid(None, f"body is not valid JSON: {err['msg']}") from None
        loc, message = tuple(err["loc"]), err["msg"]
        if loc == ("request_id",) and err["type"] == "string_pattern_mismatch":
            message = _REQUEST_ID_MESSAGE
        elif len(loc) >= 3 and loc[-3] == "features" and loc[-1] in _UNION_TAGS:
            loc, message = loc[:-1], _FEATURE_MESSAGE
        elif len(loc) >= 2 and loc[-2] in _ID_FIELDS and loc[-1] in _ID_TAGS:
            loc, message = loc[:-1], _ID_TYPE_MESSAGE
        raise invalid(_loc(loc) or None, message) from None


def bad_request_id(rid: str) -> str | None:
    """Why `rid` cannot be a request id (None: it can). The body's request_id rule, for
    the X-Request-ID header too: both are echoed in the response's X-Request-ID."""
    if len(rid) > _MAX_ID_LEN:
        return f"at most {_MAX_ID_LEN} characters"
    return None if _REQUEST_ID_OK(rid) else _REQUEST_ID_MESSAGE


@dataclass(frozen=True)
class Limits:
    max_candidates: int
    max_k: int


@dataclass(frozen=True)
class Parsed:
    """A checked request as arrays (id keys; hashed ones for the model)."""

    request_id: str | None
    item_ids: np.ndarray  # (m,) int64 id keys (contract.ids; the cache keys)
    upstream_score: np.ndarray  # (m,) float32
    item_cat: np.ndarray  # (m, Fc) int64 raw categorical ids
    item_dense: np.ndarray  # (m, Fd) float32
    user_id: int  # hashed bucket
    user_dense: np.ndarray  # (Fu,) float32
    k: int
    budget_ms: float | None
    # the item ids as sent, when some are strings (None: all integers, item_ids are them)
    sent_ids: list[int | str] | None = None

    @property
    def m(self) -> int:
        return int(self.item_ids.shape[0])

    def answer_ids(self, order: slice | np.ndarray) -> list[int | str]:
        """The item ids at `order` (candidate indices), each as the caller sent it."""
        sent = self.sent_ids
        if sent is None:
            return self.item_ids[order].tolist()
        if isinstance(order, slice):
            return sent[order]
        return [sent[i] for i in order.tolist()]


_INT64 = (-(1 << 63), (1 << 63) - 1)
_MAX_ID_LEN = 128  # RerankIn.request_id's max_length
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
        """The body as arrays when it is certainly valid; None sends it the checked way."""
        wire = self._wire
        try:
            req = wire.decoder.decode(body)
        except msgspec.DecodeError:  # invalid JSON, a wrong type, an unknown or missing key
            return None
        cands, k, rid, budget = req.candidates, req.k, req.request_id, req.budget_ms
        m, lim = len(cands), self.limits
        if not 1 <= m <= lim.max_candidates or not 1 <= k <= min(m, lim.max_k):
            return None
        if rid is not None and (len(rid) > _MAX_ID_LEN or not _REQUEST_ID_OK(rid)):
            return None
        uid = req.user.id
        if type(uid) is str:
            uid = _string_user_key(uid)
            if uid is None:
                return None
        elif not _INT64[0] <= uid <= _INT64[1]:
            return None
        if budget is not None and not 0 <= budget <= MAX_BUDGET_MS:  # NaN fails this too
            return None
        ids: list[Any] = list(map(_ITEM_ID, cands))
        sent: list[int | str] | None = None  # integers: their own keys (negatives: below)
        if str in set(map(type, ids)):  # string ids: their keys (negative ones among them)
            sent, ids = ids, list(map(_item_key, ids))
            if None in ids:
                return None
        if len(set(ids)) != m:  # duplicates after normalisation ("12" is 12)
            return None
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
            request_id=rid,
            item_ids=ids_a,
            upstream_score=numbers32[:m],
            item_cat=cat_a.reshape(m, n_cat),
            item_dense=numbers32[m : m + m * n_dense].reshape(m, n_dense),
            user_id=hash_id(uid, self.schema.user_id_buckets, self.schema.hash_salt),
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


def request_schema(reader: RequestReader | None) -> dict[str, Any]:
    """RerankIn's JSON schema (its `$defs` refer to #/components/schemas/) with the served
    bundle's limits when `reader` is given: at most max_candidates candidates, no two the
    same, k at most max_k and at most the number of candidates, and the feature names
    the bundle knows (categorical ones int64, dense ones numbers in the float32 range),
    nothing else."""
    body = RerankIn.model_json_schema(ref_template="#/components/schemas/{model}")
    if reader is None:
        return body
    props, defs, lim = body["properties"], body["$defs"], reader.limits
    props["candidates"]["maxItems"] = lim.max_candidates
    props["k"]["maximum"] = k_max = min(lim.max_k, lim.max_candidates)
    # duplicates are refused: identical candidates are (a weaker rule, but one a schema
    # can state, and one that schema-driven generators then keep to)
    props["candidates"]["uniqueItems"] = True
    # k <= len(candidates), as the union over j of (k <= j and at least j candidates)
    body["anyOf"] = [{"properties": {"k": {"maximum": j}, "candidates": {"minItems": j}}}
                     for j in range(1, k_max + 1)]  # fmt: skip
    number = {"type": "number", **_F32_RANGE}
    categorical = {"type": "integer", "minimum": _INT64_MIN, "maximum": _INT64_MAX}
    item = {**dict.fromkeys(reader.cat_names, categorical), **dict.fromkeys(reader.dense_names,
            number)}  # fmt: skip
    user = dict.fromkeys(reader.user_index, number)
    for model, names in (("Candidate", item), ("User", user)):
        features = defs[model]["properties"]["features"]
        features.pop("additionalProperties", None)
        features.update(type="object", properties=names, additionalProperties=False)
    return body


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


def finite(x: float) -> float:
    """JSON has no inf: a -inf score (never chosen) is sent as the lowest float."""
    return x if math.isfinite(x) else -3.4e38
