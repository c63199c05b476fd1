"""The service end to end: a real uvicorn with its lifespan, the tiny exported bundle.
Served lists equal the torch reference decode; bad input is refused with the field named;
a tiny budget degrades to valid lists; /readyz waits for warm-up; /metrics holds §9."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from model.network import GenReranker
from service.engine import Engine
from service.settings import Settings
from tests.support.bodies import BAD, MAX_CANDIDATES, MAX_K, good_body, make_request
from tests.support.reference import reference
from tests.support.server import ServerThread, metric_samples, wait_ready
from tests.support.tiny import TINY_SCHEMA as SCHEMA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny_bundle: tuple[Path, GenReranker]) -> Iterator[ServerThread]:
    settings = Settings(
        bundle=tiny_bundle[0],
        max_candidates=MAX_CANDIDATES,
        max_k=MAX_K,
        max_body_bytes=64_000,
        default_budget_ms=30_000,  # lists, not latency: a busy test machine must not degrade
        decode_policy="fixed",  # every head per pass, as the torch reference decode
    )
    srv = ServerThread(settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        wait_ready(c)
        yield c


def test_served_lists_equal_the_torch_reference(
    client: httpx.Client, tiny_bundle: tuple[Path, GenReranker]
) -> None:
    model = tiny_bundle[1]
    rng = np.random.default_rng(1)
    # a pool of items with fixed features: repeats hit L1, as an item's features are its own
    pool = make_request(rng, 200, 1)["candidates"]
    for c in pool[::7]:
        del c["features"]["quality"]  # a known item feature left out: it counts as 0
    torch.set_num_threads(1)
    for i in range(36):
        m = int(rng.integers(1, MAX_CANDIDATES + 1))
        k = int(rng.integers(1, min(m, MAX_K) + 1))
        body = make_request(rng, m, k)
        body["candidates"] = [
            {
                **pool[j],
                "score": float(rng.standard_normal()),
                "features": dict(pool[j]["features"]),
            }
            for j in rng.choice(len(pool), m, replace=False)
        ]
        if i % 3 == 0:  # a known user feature left out: it counts as 0
            body["user"]["features"].pop("diversity")
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert not out["degraded"], out
        served = [it["item_id"] for it in out["items"]]
        assert served == reference(model, body), i
        assert r.headers["X-Request-ID"] == out["request_id"]
        assert "decode;dur=" in r.headers["Server-Timing"]


def _as_sent(item_id: int, how: int) -> int | str:
    """One integer id in the forms a request may mix: itself, its decimal string (the same
    id), or a catalog's string id (another one)."""
    return [item_id, str(item_id), f"sku-{item_id}"][how % 3]


def test_string_and_mixed_ids_serve_the_torch_reference_and_echo_as_sent(
    client: httpx.Client, tiny_bundle: tuple[Path, GenReranker]
) -> None:
    model = tiny_bundle[1]
    rng = np.random.default_rng(6)
    torch.set_num_threads(1)
    for i in range(12):
        m = int(rng.integers(1, MAX_CANDIDATES + 1))
        body = make_request(rng, m, int(rng.integers(1, min(m, MAX_K) + 1)))
        for j, c in enumerate(body["candidates"]):
            c["item_id"] = _as_sent(c["item_id"], j + i)
        body["user"]["id"] = [f"u-{i}", body["user"]["id"], str(i)][i % 3]
        out = client.post("/v1/rerank", json=body)
        assert out.status_code == 200, out.text
        served = [it["item_id"] for it in out.json()["items"]]
        assert served == reference(model, body), i  # the very values sent: "12" stays "12"
        assert not out.json()["degraded"]
        # the same items as integers where they spell one: the same cache entries, same list
        for c in body["candidates"]:
            if isinstance(c["item_id"], str) and c["item_id"].isdigit():
                c["item_id"] = int(c["item_id"])
        again = client.post("/v1/rerank", json=body).json()["items"]
        assert [str(it["item_id"]) for it in again] == [str(x) for x in served]


def test_a_string_id_and_its_integer_are_one_item(client: httpx.Client) -> None:
    body = good_body()
    body["candidates"][2]["item_id"] = 12
    body["candidates"][7]["item_id"] = "12"
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 422
    assert r.json()["error"] == {"type": "invalid_request", "field": "candidates[7].item_id",
                                 "message": 'duplicate of candidates[2] ("12" is 12)'}  # fmt: skip
    body["candidates"][7]["item_id"] = "sku-12"
    body["budget_ms"] = 0.001  # degraded to the upstream order: the ids as sent too
    out = client.post("/v1/rerank", json=body).json()
    assert out["reason"] == "budget"
    assert [it["item_id"] for it in out["items"]] == [c["item_id"] for c in body["candidates"][:10]]


def test_every_list_has_k_distinct_ids_of_the_request(client: httpx.Client) -> None:
    rng = np.random.default_rng(2)
    for m, k in [(1, 1), (2, 2), (8, 8), (9, 3), (30, 10), (33, 20), (64, 20), (64, 1)]:
        body = make_request(rng, m, k, request_id=f"r-{m}-{k}")
        out = client.post("/v1/rerank", json=body).json()
        ids = [it["item_id"] for it in out["items"]]
        assert len(ids) == k and len(set(ids)) == k
        assert set(ids) <= {c["item_id"] for c in body["candidates"]}
        assert out["request_id"] == f"r-{m}-{k}"
        assert out["passes"] >= 1 and set(out["timings"]) == {
            "queue_ms", "cache_ms", "encode_ms", "decode_ms", "total_ms"
        }  # fmt: skip
        scores = [it["score"] for it in out["items"]]
        assert all(np.isfinite(scores))


def test_numbers_are_sent_as_a_person_reads_them(client: httpx.Client) -> None:
    """Scores are float32 values in their shortest form (0.1234567, not the float64
    widening 0.12345670163631439); timings are milliseconds to the microsecond."""
    rng = np.random.default_rng(3)
    for degraded in (False, True):
        body = make_request(rng, 30, 10, budget_ms=0.0 if degraded else None)
        out = client.post("/v1/rerank", json=body).json()
        assert out["degraded"] is degraded, out
        for score in (it["score"] for it in out["items"]):
            assert float(str(np.float32(score))) == score, out["items"]
        for name, ms in out["timings"].items():
            assert ms == round(ms, 3), (name, ms)


@pytest.mark.parametrize(("case", "make", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_422_naming_the_field(
    client: httpx.Client, case: str, make: Any, field: str | None
) -> None:
    r = client.post("/v1/rerank", content=make(), headers={"content-type": "application/json"})
    assert r.status_code == 422, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"type", "message", "field"} and err["message"]
    if field is not None:
        assert err["field"] == field, err
    assert "X-Request-ID" in r.headers


def test_oversized_body_is_413_by_length_and_by_bytes(client: httpx.Client) -> None:
    big = json.dumps(good_body() | {"request_id": "x", "pad": "y" * 70_000}).encode()
    r = client.post("/v1/rerank", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(20):
            yield b" " * 4096

    r = client.post("/v1/rerank", content=chunks())
    assert r.status_code == 413, r.text


def test_a_good_request_works_after_the_bad_ones(client: httpx.Client) -> None:
    for _, make, _ in BAD:
        assert client.post("/v1/rerank", content=make()).status_code in (413, 422)
    r = client.post("/v1/rerank", json=good_body())
    assert r.status_code == 200 and not r.json()["degraded"]


def test_a_tiny_budget_degrades_to_valid_lists(client: httpx.Client) -> None:
    rng = np.random.default_rng(4)
    for _ in range(5):
        body = make_request(rng, 30, 10, budget_ms=0.001)
        out = client.post("/v1/rerank", json=body).json()
        assert out["degraded"] and out["reason"] == "budget"
        ids = [it["item_id"] for it in out["items"]]
        assert len(ids) == 10 and len(set(ids)) == 10
        assert ids == [c["item_id"] for c in body["candidates"][:10]]  # upstream order


REQUIRED_SAMPLES = {
    "rerank_request_duration_seconds_bucket",
    "rerank_stage_duration_seconds_bucket",
    "rerank_fallback_total",
    "rerank_embedding_lookups_total",
    "rerank_decode_passes_bucket",
    "rerank_batch_size_bucket",
    "rerank_candidates_bucket",
    "rerank_inflight_requests",
    "rerank_model_info",
    "rerank_late_responses_total",
    "rerank_ready",
}


def test_metrics_parse_and_hold_every_series(client: httpx.Client) -> None:
    client.post("/v1/rerank", json=good_body())
    client.post("/v1/rerank", json=make_request(np.random.default_rng(5), 9, 3, budget_ms=1e-3))
    samples = metric_samples(client)
    names = {name for name, _ in samples}
    assert names >= REQUIRED_SAMPLES, REQUIRED_SAMPLES - names
    labels = {name: {dict(lb).get(key) for n, lb in samples if n == name} for name, key in [
        ("rerank_request_duration_seconds_count", "outcome"),
        ("rerank_stage_duration_seconds_count", "stage"),
        ("rerank_fallback_total", "reason"),
    ]}  # fmt: skip
    assert labels["rerank_request_duration_seconds_count"] >= {"ok", "degraded", "rejected"}
    assert labels["rerank_stage_duration_seconds_count"] >= {
        "queue", "cache", "encode", "decode", "total_model"
    }  # fmt: skip
    assert labels["rerank_fallback_total"] >= {"budget", "overload", "cache", "model"}
    lookups = {dict(lb)["tier"] + "/" + dict(lb)["result"] for n, lb in samples
               if n == "rerank_embedding_lookups_total"}  # fmt: skip
    assert {"l1/hit", "l1/miss", "l3/hit", "l2/error"} <= lookups
    assert samples["rerank_fallback_total", (("reason", "budget"),)] >= 1
    assert samples["rerank_request_duration_seconds_count", (("outcome", "ok"),)] >= 1
    assert any(n == "rerank_model_info" and v == 1 for (n, _), v in samples.items())
    assert samples["rerank_ready", ()] == 1
    # a bucket below a millisecond exists, and one at the default budget (50 ms)
    les = {float(dict(lb)["le"]) for n, lb in samples
           if n == "rerank_request_duration_seconds_bucket"}  # fmt: skip
    assert min(les) <= 1e-4 and len([x for x in les if x < 0.01]) >= 8 and 0.05 in les


def test_metrics_count_what_the_requests_did(client: httpx.Client) -> None:
    """Deltas over two requests: one served, one out of budget on arrival (answered in
    upstream order before any lookup or queue: those stages are not observed for it)."""
    rng = np.random.default_rng(11)
    before = metric_samples(client)
    served = client.post("/v1/rerank", json=make_request(rng, 30, 10, budget_ms=30_000))
    late = client.post("/v1/rerank", json=make_request(rng, 9, 3, budget_ms=1e-3))
    after = metric_samples(client)
    assert served.status_code == late.status_code == 200
    assert not served.json()["degraded"] and late.json()["reason"] == "budget"

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    duration = "rerank_request_duration_seconds_count"
    assert delta(duration, outcome="ok") == 1 and delta(duration, outcome="degraded") == 1
    assert delta("rerank_fallback_total", reason="budget") == 1
    stages = {st: delta("rerank_stage_duration_seconds_count", stage=st)
              for st in ("queue", "cache", "encode", "decode", "total_model")}  # fmt: skip
    assert stages == dict.fromkeys(stages, 1.0), stages  # the served request's only
    l1 = [delta("rerank_embedding_lookups_total", tier="l1", result=r) for r in ("hit", "miss")]
    assert sum(l1) == 30
    assert delta("rerank_embedding_lookups_total", tier="l3", result="hit") == l1[1]
    assert delta("rerank_candidates_count") == 2 and delta("rerank_candidates_sum") == 39
    assert delta("rerank_batch_size_count") == 1 and delta("rerank_decode_passes_count") == 1
    assert delta("rerank_late_responses_total") == 1  # the 1 us budget's, answered after it


@pytest.mark.parametrize("value", ["has space", "x" * 129, "caf\u00e9"])
def test_a_bad_x_request_id_header_is_422_and_not_echoed(client: httpx.Client, value: str) -> None:
    r = client.post(
        "/v1/rerank", json=good_body(), headers={"X-Request-ID": value.encode("latin-1")}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "X-Request-ID" and r.json()["error"]["message"]
    assert r.headers["X-Request-ID"] != value  # a fresh id, not the refused one
    ok = client.post("/v1/rerank", json=good_body(), headers={"X-Request-ID": "trace-1"})
    assert ok.status_code == 200 and ok.headers["X-Request-ID"] == "trace-1"


def test_non_finite_model_output_is_the_upstream_order_and_never_cached(
    client: httpx.Client,
) -> None:
    """Feature values within float32 but so large that the network overflows: NaN scores
    would make the argmax pick one candidate k times (or a padding slot). The answer is the
    upstream order, degraded; nothing the request computed is cached, so the same items
    with sane features are served normally afterwards."""
    rng = np.random.default_rng(21)
    huge_user = make_request(rng, 30, 10)
    huge_user["user"]["features"] = dict.fromkeys(SCHEMA.user_dense, 3e38)
    huge_item = make_request(rng, 30, 10)
    huge_item["candidates"][0]["features"].update(dict.fromkeys(SCHEMA.item_dense, 3e38))
    for body, reason in ((huge_user, "model"), (huge_item, "cache")):
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["degraded"] and out["reason"] == reason, out
        ids = [it["item_id"] for it in out["items"]]
        assert ids == [c["item_id"] for c in body["candidates"][:10]]  # upstream order
    for body in (huge_user, huge_item):
        sane = make_request(rng, 30, 10, item_ids=np.array([c["item_id"] for c in
                                                            body["candidates"]]))  # fmt: skip
        out = client.post("/v1/rerank", json=sane).json()
        assert not out["degraded"], out
        assert len({it["item_id"] for it in out["items"]}) == 10


def test_model_and_health(client: httpx.Client, tiny_bundle: tuple[Path, GenReranker]) -> None:
    manifest = json.loads((tiny_bundle[0] / "manifest.json").read_text())
    assert client.get("/v1/model").json() == manifest
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["redis"] == "disabled"
    assert ready["model_version"] == manifest["version"]
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/rerank"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/RerankIn")
    assert {"RerankIn", "Candidate", "User", "RerankOut"} <= set(spec["components"]["schemas"])


def test_a_failed_warm_up_leaves_the_worker_not_ready_and_says_why(
    tiny_bundle: tuple[Path, GenReranker], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_warmup(self: Engine, *args: Any, **kwargs: Any) -> float:
        raise RuntimeError("out of device memory (simulated)")

    monkeypatch.setattr(Engine, "warmup", broken_warmup)
    srv = ServerThread(Settings(bundle=tiny_bundle[0])).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            deadline = time.monotonic() + 30
            while c.get("/readyz").json()["warmup_error"] is None:
                assert time.monotonic() < deadline, "no warm-up error reported"
                time.sleep(0.02)
            r = c.get("/readyz")
            assert r.status_code == 503 and "out of device memory" in r.json()["warmup_error"]
            assert c.post("/v1/rerank", json=good_body()).status_code == 503
            assert "rerank_ready 0.0" in c.get("/metrics").text
            assert c.get("/healthz").status_code == 200  # alive: the alert, not a restart loop
    finally:
        srv.stop()


def test_readyz_is_503_until_warm_up_is_done(
    tiny_bundle: tuple[Path, GenReranker], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    warmup = Engine.warmup

    def held_warmup(self: Engine, *args: Any, **kwargs: Any) -> float:
        gate.wait(60)
        return warmup(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "warmup", held_warmup)
    srv = ServerThread(Settings(bundle=tiny_bundle[0].parent)).start()  # artifacts dir
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
            r = c.get("/readyz")
            assert r.status_code == 503 and not r.json()["ready"]
            r = c.post("/v1/rerank", json=good_body())
            assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
            assert c.get("/v1/model").status_code == 200  # loaded, not yet warm
            gate.set()
            wait_ready(c)
            assert c.post("/v1/rerank", json=good_body()).status_code == 200
    finally:
        gate.set()
        srv.stop()
