"""/openapi.json states the limits the service enforces (k >= 1, the bundle's most
candidates and max_k, id ranges, the bundle's feature names and types, the budget's
bounds), so a schema-driven client gets accepted bodies: schemathesis' generated requests
get no 5xx, no answer outside the schema, and mostly 200s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.network import GenReranker
from service.api import MAX_BUDGET_MS
from service.settings import Settings
from tests.support.fuzz import fuzz_rerank
from tests.support.server import ServerThread, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny_bundle: tuple[Path, GenReranker]) -> Iterator[ServerThread]:
    srv = ServerThread(Settings(bundle=tiny_bundle[0], max_k=10, warmup=False)).start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_ready(c)
    yield srv
    srv.stop()


def test_the_body_schema_states_the_served_limits(server: ServerThread) -> None:
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    body, cand, user = schemas["RerankIn"], schemas["Candidate"], schemas["User"]
    reader = server.app.state.runtime.reranker.reader
    assert body["properties"]["candidates"]["minItems"] == 1
    assert body["properties"]["candidates"]["maxItems"] == reader.limits.max_candidates
    assert body["properties"]["k"]["minimum"] == 1 and body["properties"]["k"]["maximum"] == 10
    assert body["properties"]["candidates"]["uniqueItems"] is True
    assert body["anyOf"] == [  # k <= len(candidates)
        {"properties": {"k": {"maximum": j}, "candidates": {"minItems": j}}} for j in range(1, 11)
    ]
    budget = body["properties"]["budget_ms"]["anyOf"][0]
    assert budget["minimum"] == 0 and budget["maximum"] == MAX_BUDGET_MS
    item_int, item_str = cand["properties"]["item_id"]["anyOf"]
    assert item_int == {"type": "integer", "minimum": 0, "maximum": (1 << 63) - 1}
    assert item_str["type"] == "string" and item_str["minLength"] == 1
    assert item_str["maxLength"] == 128 and item_str["pattern"] == r"^[\x21-\x7e]+$"
    user_int, user_str = user["properties"]["id"]["anyOf"]
    assert user_int["minimum"] == -(1 << 63) and user_str == item_str
    features = cand["properties"]["features"]
    assert features["additionalProperties"] is False
    assert set(features["properties"]) == {*reader.cat_names, *reader.dense_names}
    assert {features["properties"][n]["type"] for n in reader.cat_names} == {"integer"}
    assert {features["properties"][n]["type"] for n in reader.dense_names} == {"number"}
    assert set(user["properties"]["features"]["properties"]) == set(reader.user_index)
    assert user["properties"]["features"]["additionalProperties"] is False


def test_schema_driven_requests_are_answered_within_the_schema(server: ServerThread) -> None:
    """Bodies schemathesis generates from the schema (positive mode). Some are refused
    rightly (duplicate item ids: the schema says only that no two candidates are
    identical), none otherwise (k <= len(candidates) is stated), none with a 5xx or an
    answer the schema does not describe."""
    result = fuzz_rerank(server.url, examples=150)
    assert result.sent == 150
    assert result.server_errors == 0, result.statuses
    assert result.violations == []
    # every refusal is the one no JSON schema can state (a duplicate id in candidates that
    # differ otherwise: "0" and 0, or the same id with another score); enough reach the model
    unstated = [r for r in result.refusals if ": duplicate of candidates[" not in r]
    assert unstated == [], result.refusals
    assert result.statuses[200] >= result.sent / 2, (result.statuses, result.refusals)
