"""The HTTP contract of POST /v1/rerank (design §6): pydantic models (the schema of record
for OpenAPI), the checked parse of a raw body, the request as the service carries it
(`Parsed`), and the one error type the handler maps to a stable JSON body. The hot path's
reader, which builds `Parsed` from a body with the checks that need the bundle's feature
schema, is service/request_reader.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

if TYPE_CHECKING:
    from service.request_reader import RequestReader

from contract.ids import (
    ID_PATTERN,
    MAX_ID_LENGTH,
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


_MAX_ID_LEN = 128  # RerankIn.request_id's max_length


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


def finite(x: float) -> float:
    """JSON has no inf: a -inf score (never chosen) is sent as the lowest float."""
    return x if math.isfinite(x) else -3.4e38
