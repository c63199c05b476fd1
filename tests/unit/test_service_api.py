"""service/api.py without a server: the parse from bytes, the checks against the feature
schema, and the arrays handed to the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.features import hash_ids, hash_items
from service.api import ApiError, Limits, RequestReader, RerankIn, parse_body
from tests.e2e.server import make_request
from tests.unit.test_export import SCHEMA

READER = RequestReader(SCHEMA, Limits(max_candidates=64, max_k=20))


def test_a_good_body_becomes_the_arrays_training_would_see() -> None:
    body = make_request(np.random.default_rng(0), 12, 4, budget_ms=7.5, request_id="r1")
    del body["candidates"][3]["features"]["quality"]  # a known feature left out: 0
    p = READER.read(parse_body(json.dumps(body).encode()))
    cands = body["candidates"]
    assert p.request_id == "r1" and p.k == 4 and p.budget_ms == 7.5 and p.m == 12
    assert p.item_ids.tolist() == [c["item_id"] for c in cands]
    assert p.upstream_score.dtype == np.float32 and p.item_dense.dtype == np.float32
    assert p.item_dense[3, SCHEMA.item_dense.index("quality")] == 0.0
    assert p.item_cat[:, 0].tolist() == [c["features"]["category"] for c in cands]
    assert p.user_id == int(hash_ids(np.array([body["user"]["id"]]), SCHEMA.user_id_buckets,
                                     SCHEMA.hash_salt)[0])  # fmt: skip
    rows = np.array([0, 5])
    h = hash_items(SCHEMA, p.item_ids[rows], p.item_cat[rows], p.item_dense[rows])
    got = READER.hashed(p, rows)
    for a, b in zip(got, (h.item_id, h.item_cat, h.item_dense), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": NaN}], "k": 1}',
         "candidates[0].score"),
        (b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1}], "k": 2}', "k"),
        (b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1, "features": '
         b'{"creator": 1.0}}], "k": 1}', "candidates[0].features.creator"),
        (b'{"user": {"id": 1.0}, "candidates": [{"item_id": 1, "score": 1}], "k": 1}',
         "user.id"),
        (b"\xff\xfe", None),
    ],
)  # fmt: skip
def test_refusals_name_the_field(raw: bytes, field: str | None) -> None:
    with pytest.raises(ApiError) as e:
        READER.read(parse_body(raw))
    assert e.value.status == 422 and e.value.field == field
    assert e.value.body()["error"]["field"] == field


def test_integers_are_numbers_and_the_schema_says_what_is_optional() -> None:
    raw = b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 2}], "k": 1}'
    p = READER.read(parse_body(raw))
    assert p.upstream_score.tolist() == [2.0] and p.user_dense.tolist() == [0.0] * 3
    schema = RerankIn.model_json_schema()
    assert set(schema["required"]) == {"user", "candidates", "k"}
    assert "counts as 0" in schema["$defs"]["Candidate"]["properties"]["features"]["description"]


def test_the_fast_and_the_checked_paths_agree() -> None:
    rng = np.random.default_rng(5)
    for m in (1, 7, 30, 64):
        body = make_request(rng, m, 1)
        for c in body["candidates"][::3]:
            c["features"].pop("creator")  # some features left out
        cands = parse_body(json.dumps(body).encode()).candidates
        fast = READER._candidates_fast(cands)
        assert fast is not None
        for a, b in zip(fast, READER._candidates_checked(cands), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
