"""service/api.py without a server: the parse from bytes, the checks against the feature
schema, and the arrays handed to the engine."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from contract.features import hash_ids, hash_items
from contract.ids import id_key
from service.api import ApiError, Limits, Parsed, RerankIn, parse_body
from service.request_reader import RequestReader
from tests.support.bodies import make_request
from tests.support.tiny import TINY_SCHEMA as SCHEMA

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
         b'{"creator": 1.5}}], "k": 1}', "candidates[0].features.creator"),
        (b'{"user": {"id": 1.5}, "candidates": [{"item_id": 1, "score": 1}], "k": 1}',
         "user.id"),
        (b"\xff\xfe", None),
    ],
)  # fmt: skip
def test_refusals_name_the_field(raw: bytes, field: str | None) -> None:
    with pytest.raises(ApiError) as e:
        READER.read(parse_body(raw))
    assert e.value.status == 422 and e.value.field == field
    assert e.value.body()["error"]["field"] == field


def test_refusal_messages_say_what_is_wanted_not_pydantics_union_members() -> None:
    base = b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1%s}], "k": 1%s}'
    cases = {
        (b', "features": {"category": true}', b""): "candidates[0].features.category",
        (b', "features": {"quality": "x"}', b""): "candidates[0].features.quality",
        (b"", b', "request_id": "a\\r\\nb"'): "request_id",
    }
    for (feat, top), field in cases.items():
        with pytest.raises(ApiError) as e:
            READER.read_json(base % (feat, top))
        assert e.value.field == field
        message = e.value.message
        assert ("number" in message) if "features" in field else ("ASCII" in message), message
    assert READER.read_json(base % (b"", b', "request_id": "req-1:a_b/c"')).request_id == (
        "req-1:a_b/c"
    )


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
        raw = json.dumps(body).encode()
        fast = READER._fast(raw)
        assert fast is not None
        checked = READER.read(parse_body(raw))
        for name in ("item_ids", "upstream_score", "item_cat", "item_dense"):
            a, b = getattr(fast, name), getattr(checked, name)
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def _slow(raw: bytes) -> Parsed | ApiError:
    try:
        return READER.read(parse_body(raw))
    except ApiError as e:
        return e


def _same(a: Parsed | ApiError, b: Parsed | ApiError) -> None:
    if isinstance(a, ApiError) or isinstance(b, ApiError):
        assert isinstance(a, ApiError) and isinstance(b, ApiError), (a, b)
        assert (a.status, a.field, a.message) == (b.status, b.field, b.message)
        return
    for name in ("request_id", "user_id", "k", "budget_ms", "sent_ids"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("item_ids", "upstream_score", "item_cat", "item_dense", "user_dense"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y)


def _read_json(raw: bytes) -> Parsed | ApiError:
    try:
        return READER.read_json(raw)
    except ApiError as e:
        return e


def test_read_json_takes_the_fast_path_for_good_bodies_and_agrees_with_the_checked_one() -> None:
    rng = np.random.default_rng(9)
    bodies = []
    for m in (1, 2, 30, 64):
        body = make_request(rng, m, min(m, 5), request_id=f"id-{m}", budget_ms=12)
        for c in body["candidates"][::4]:
            c["features"].pop("quality")  # a known feature left out
        body["candidates"][0]["features"]["duration"] = 3  # an integer dense feature
        body["candidates"][-1].pop("features")  # no features at all
        bodies.append(body)
    bodies.append({"user": {"id": -5}, "candidates": [{"item_id": 0, "score": 1}], "k": 1})
    mixed = make_request(rng, 30, 10)  # string ids: a catalog's, integers as strings, mixed
    for j, c in enumerate(mixed["candidates"]):
        c["item_id"] = [f"sku-{c['item_id']}", str(c["item_id"]), c["item_id"]][j % 3]
    bodies += [mixed, {**mixed, "user": {"id": "u-7"}}, {**mixed, "user": {"id": "-7"}}]
    bodies.append({"user": {"id": "~" * 128}, "candidates": [{"item_id": "!", "score": 1},
                   {"item_id": "9223372036854775808", "score": 2}], "k": 2})  # fmt: skip
    for body in bodies:
        raw = json.dumps(body).encode()
        assert READER._fast(raw) is not None, body  # taken fast ...
        _same(_read_json(raw), _slow(raw))  # ... and the same arrays as the checked way
        sent = [c["item_id"] for c in body["candidates"]]
        got = READER.read_json(raw)
        assert got.answer_ids(np.arange(len(sent))[::-1]) == sent[::-1]  # echoed as sent
        assert got.answer_ids(slice(0, 2)) == sent[:2]
    keys = READER.read_json(json.dumps(mixed).encode()).item_ids
    assert keys.tolist() == [id_key(c["item_id"]) for c in mixed["candidates"]]
    assert (keys[::3] < -1).all() and (keys[1::3] >= 0).all()  # "sku-": negative, "12": 12


def test_read_json_sends_every_bad_body_the_checked_way_with_the_same_error() -> None:
    from tests.support.bodies import BAD, MAX_CANDIDATES, MAX_K

    assert (READER.limits.max_candidates, READER.limits.max_k) == (MAX_CANDIDATES, MAX_K)
    for name, make, field in BAD:
        raw = make()
        assert READER._fast(raw) is None, name
        got = _read_json(raw)
        assert isinstance(got, ApiError) and got.field == field, name
        _same(got, _slow(raw))
    edge = [  # valid for the models, but the fast path leaves them to the checked way
        b'{"user": {"id": 1, "features": {}}, "candidates": [{"item_id": 1, "score": 1.5,'
        b' "features": {"category": 1}}], "k": 1, "budget_ms": null, "request_id": null}',
        b'{"user": {"id": true}, "candidates": [{"item_id": 1, "score": 1}], "k": 1}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1}], "k": 1.0}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": false}], "k": 1}',
    ]
    for raw in edge:
        _same(_read_json(raw), _slow(raw))


@pytest.mark.parametrize(
    "raw",
    [  # where a typed decoder could differ from the models: each read as the models read it
        b'{"user": {"id": 1}, "candidates": [{"item_id": 9223372036854775808, "score": 1}], '
        b'"k": 1}',  # beyond int64, within uint64
        b'{"user": {"id": 1}, "candidates": [{"item_id": 18446744073709551616, "score": 1}], '
        b'"k": 1}',  # beyond uint64
        b'{"user": {"id": 9223372036854775808}, "candidates": [{"item_id": 1, "score": 1}], '
        b'"k": 1}',
        b'{"user": {"id": -9223372036854775809}, "candidates": [{"item_id": 1, "score": 1}], '
        b'"k": 1}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1e39}], "k": 1}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1e400}], "k": 1}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1, "features": '
        b'{"category": 9223372036854775808}}], "k": 1}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1, "features": '
        b'{"qualit\\u0079": 0.5, "category": -3}}], "k": 1}',  # an escaped key, a negative id
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1}], "k": 1, "k": 2}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1}], "k": 2, "k": 1}',
        b'{"user": {"id": 1, "features": {"pref_0": 1e38}}, "candidates": [{"item_id": 1, '
        b'"score": -0.0}], "k": 1, "budget_ms": 60000}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1}], "k": 1, '
        b'"budget_ms": 60000.5}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1}], "k": 1, '
        b'"budget_ms": -0.0}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1, "features": null}], '
        b'"k": 1}',
        b'{"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1}], "k": 1, '
        b'"request_id": ""}',
        b' {"user": {"id": 1}, "candidates": [{"item_id": 1, "score": 1}], "k": 1} ',
    ],
)
def test_the_typed_decode_agrees_with_the_models_at_the_edges(raw: bytes) -> None:
    _same(_read_json(raw), _slow(raw))


def test_hash_id_is_hash_ids_of_one() -> None:
    from contract.features import hash_id

    rng = np.random.default_rng(3)
    ids = [0, 1, -1, -(1 << 63), (1 << 63) - 1, *rng.integers(-(1 << 62), 1 << 62, 200).tolist()]
    for buckets in (2, 1024, 1 << 20):
        want = hash_ids(np.array(ids, np.int64), buckets, SCHEMA.hash_salt).tolist()
        assert [hash_id(i, buckets, SCHEMA.hash_salt) for i in ids] == want


def test_a_client_gone_before_its_body_arrived_is_a_499_not_a_500() -> None:
    """starlette raises ClientDisconnect from the body stream; the handler must not turn
    it into a 500 with a traceback in the log."""
    from starlette.requests import Request

    from service.app import read_body

    messages = iter([{"type": "http.request", "body": b'{"k": ', "more_body": True},
                     {"type": "http.disconnect"}])  # fmt: skip

    async def receive() -> dict[str, object]:
        return next(messages)

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(ApiError) as caught:
        asyncio.run(read_body(request, 1 << 20, 10.0))
    assert caught.value.status == 499 and caught.value.field == "body"


def test_an_integral_json_number_is_an_integer_as_the_schema_says() -> None:
    """JSON (and JSON Schema's "integer") has one number type: 7.0 is the integer 7, read
    exactly as 7; 7.5 stays refused."""
    ints = b'{"user": {"id": 3}, "candidates": [{"item_id": 7, "score": 1, "features": ' \
           b'{"category": 2}}, {"item_id": 8, "score": 0}], "k": 2}'  # fmt: skip
    floats = ints.replace(b": 3}", b": 3.0}").replace(b": 7,", b": 7.0,").replace(
        b'"category": 2', b'"category": 2.0').replace(b'"k": 2', b'"k": 2.0')  # fmt: skip
    assert floats.count(b".0") == 4
    a, b = READER.read_json(ints), READER.read_json(floats)
    for name in ("item_ids", "item_cat", "upstream_score", "item_dense", "user_dense"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.user_id, a.k) == (b.user_id, b.k)
    with pytest.raises(ApiError) as e:
        READER.read_json(ints.replace(b": 7,", b": 7.5,"))
    assert e.value.field == "candidates[0].item_id"


def test_a_long_string_id_is_refused_before_the_memoised_keys_see_it() -> None:
    """The key functions keep each id they were asked about: only bounded ones reach them,
    so bodies of long junk ids cannot fill memory."""
    from service.request_reader import _item_key, _string_user_key

    long_id = "x" * 100_000
    for body in (
        {"user": {"id": 1}, "candidates": [{"item_id": long_id, "score": 1}], "k": 1},
        {"user": {"id": long_id}, "candidates": [{"item_id": 1, "score": 1}], "k": 1},
    ):
        before = _item_key.cache_info().currsize + _string_user_key.cache_info().currsize
        with pytest.raises(ApiError) as e:
            READER.read_json(json.dumps(body).encode())
        assert e.value.message == "100000 characters, at most 128"
        after = _item_key.cache_info().currsize + _string_user_key.cache_info().currsize
        assert after == before
