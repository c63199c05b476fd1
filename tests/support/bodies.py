"""Rerank request bodies for the tiny schema: valid ones (`make_request`) and the table of
bad ones (`BAD`: name, body maker, the field the 422 must name; None: not JSON at all),
checked against the limits MAX_CANDIDATES and MAX_K."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tests.support.tiny import TINY_SCHEMA as SCHEMA

MAX_CANDIDATES, MAX_K = 64, 20  # the limits BAD's bodies are bad against


def make_request(
    rng: np.random.Generator,
    m: int = 30,
    k: int = 10,
    item_ids: np.ndarray | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A valid rerank body for the test bundle's schema (random raw ids and features)."""
    ids = item_ids if item_ids is not None else rng.choice(1_000_000, m, replace=False)
    candidates = [
        {
            "item_id": int(i),
            "score": float(rng.standard_normal()),
            "features": {
                "category": int(rng.integers(0, 50)),
                "creator": int(rng.integers(0, 500)),
                **{name: float(rng.standard_normal()) for name in SCHEMA.item_dense},
            },
        }
        for i in ids[:m]
    ]
    user = {
        "id": int(rng.integers(0, 1 << 40)),
        "features": {name: float(rng.standard_normal()) for name in SCHEMA.user_dense},
    }
    return {"user": user, "candidates": candidates, "k": k, **extra}


def good_body() -> dict[str, Any]:
    """A valid body of 30 candidates, k = 10 (the same every call)."""
    return make_request(np.random.default_rng(3), 30, 10)


def _with(path: str, value: Any) -> bytes:
    """The good body with one field set (dotted path, list indices as numbers)."""
    body: Any = good_body()
    keys = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = body
    for key in keys[:-1]:
        target = target[key]
    if value is _DROP:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return json.dumps(body).encode()


_DROP = object()


def _raw(good_json_with: str, old: str) -> bytes:
    """The good body with a literal swapped in (NaN / Infinity are not in json.dumps' way)."""
    text = json.dumps(good_body())
    assert old in text
    return text.replace(old, good_json_with, 1).encode()


def _dup() -> bytes:
    body = good_body()
    body["candidates"][7]["item_id"] = body["candidates"][2]["item_id"]
    return json.dumps(body).encode()


def _dup_as_string() -> bytes:
    """candidates[7] is candidates[2]'s integer id written as a string ("12" is 12)."""
    body = good_body()
    body["candidates"][7]["item_id"] = str(body["candidates"][2]["item_id"])
    return json.dumps(body).encode()


def _dup_strings() -> bytes:
    body = good_body()
    body["candidates"][2]["item_id"] = body["candidates"][7]["item_id"] = "sku-7"
    return json.dumps(body).encode()


def _first_score() -> str:
    return json.dumps(good_body()["candidates"][0]["score"])


BAD: list[tuple[str, Any, str | None]] = [
    ("empty list", lambda: _with("candidates", []), "candidates"),
    ("too many", lambda: json.dumps(make_request(np.random.default_rng(0), 65, 5)).encode(),
     "candidates"),
    ("duplicate ids", _dup, "candidates[7].item_id"),
    ("NaN score", lambda: _raw("NaN", _first_score()), "candidates[0].score"),
    ("Infinity score", lambda: _raw("Infinity", _first_score()), "candidates[0].score"),
    ("-Infinity user feature", lambda: _with("user.features.pref_0", float("-inf")),
     "user.features.pref_0"),
    ("string score", lambda: _with("candidates.3.score", "1.0"), "candidates[3].score"),
    ("float item id", lambda: _with("candidates.4.item_id", 1.5), "candidates[4].item_id"),
    ("bool item id", lambda: _with("candidates.4.item_id", True), "candidates[4].item_id"),
    ("item id an object", lambda: _with("candidates.4.item_id", {"a": 1}),
     "candidates[4].item_id"),
    # string ids: 1..128 printable ASCII characters without spaces
    ("empty string item id", lambda: _with("candidates.3.item_id", ""), "candidates[3].item_id"),
    ("string item id too long", lambda: _with("candidates.3.item_id", "s" * 129),
     "candidates[3].item_id"),
    ("string item id with a space", lambda: _with("candidates.3.item_id", "sku 1"),
     "candidates[3].item_id"),
    ("string item id with a newline", lambda: _with("candidates.3.item_id", "sku-1\n"),
     "candidates[3].item_id"),
    ("string item id not ASCII", lambda: _with("candidates.3.item_id", "sku-\u00e9"),
     "candidates[3].item_id"),
    ("string item id with a NUL", lambda: _with("candidates.3.item_id", "sku\u0000"),
     "candidates[3].item_id"),
    ("string item id spelling a negative integer", lambda: _with("candidates.6.item_id", "-3"),
     "candidates[6].item_id"),
    ("duplicate after normalisation", _dup_as_string, "candidates[7].item_id"),
    ("duplicate string ids", _dup_strings, "candidates[7].item_id"),
    ("string user id too long", lambda: _with("user.id", "u" * 129), "user.id"),
    ("string user id with a tab", lambda: _with("user.id", "u\t1"), "user.id"),
    ("float user id", lambda: _with("user.id", 2.5), "user.id"),
    ("bool k", lambda: _with("k", True), "k"),
    ("string k", lambda: _with("k", "10"), "k"),
    ("missing user", lambda: _with("user", _DROP), "user"),
    ("missing candidates", lambda: _with("candidates", _DROP), "candidates"),
    ("missing k", lambda: _with("k", _DROP), "k"),
    ("missing score", lambda: _with("candidates.5.score", _DROP), "candidates[5].score"),
    ("missing user id", lambda: _with("user.id", _DROP), "user.id"),
    ("k = 0", lambda: _with("k", 0), "k"),
    ("k > m", lambda: json.dumps(make_request(np.random.default_rng(0), 5, 6)).encode(), "k"),
    ("k > max_k", lambda: _with("k", MAX_K + 1), "k"),
    ("negative budget", lambda: _with("budget_ms", -1.0), "budget_ms"),
    ("unknown item feature", lambda: _with("candidates.2.features.colour", 1.0),
     "candidates[2].features.colour"),
    ("unknown user feature", lambda: _with("user.features.age", 30.0), "user.features.age"),
    ("categorical not an integer", lambda: _with("candidates.1.features.category", 2.5),
     "candidates[1].features.category"),
    ("negative item id", lambda: _with("candidates.6.item_id", -3), "candidates[6].item_id"),
    ("item id beyond int64", lambda: _with("candidates.6.item_id", 1 << 64),
     "candidates[6].item_id"),
    ("score beyond float32", lambda: _with("candidates.0.score", 1e39), "candidates[0].score"),
    ("dense feature beyond float32", lambda: _with("candidates.2.features.quality", 1e39),
     "candidates[2].features.quality"),
    ("huge integer dense feature", lambda: _with("candidates.2.features.duration", 10**400),
     "candidates[2].features.duration"),
    ("user feature beyond float32", lambda: _with("user.features.pref_1", -1e300),
     "user.features.pref_1"),
    ("unknown top-level field", lambda: _with("colour", "red"), "colour"),
    ("candidates not a list", lambda: _with("candidates", {"a": 1}), "candidates"),
    ("not JSON", lambda: b"{not json", None),
    ("empty body", lambda: b"", None),
    ("JSON array", lambda: b"[1, 2]", None),
    ("request id too long", lambda: _with("request_id", "x" * 200), "request_id"),
    # echoed in the X-Request-ID header: CR/LF or non-Latin-1 there would break the answer
    ("request id with CR LF", lambda: _with("request_id", "a\r\nX-Evil: 1"), "request_id"),
    ("request id not ASCII", lambda: _with("request_id", "r\u00e9\u65e5"), "request_id"),
    ("request id with a space", lambda: _with("request_id", "a b"), "request_id"),
    ("item feature a string", lambda: _with("candidates.1.features.quality", "x"),
     "candidates[1].features.quality"),
    ("categorical a bool", lambda: _with("candidates.1.features.category", True),
     "candidates[1].features.category"),
]  # fmt: skip
