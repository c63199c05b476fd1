"""Batching and overload, made deterministic by holding the engine at a gate: requests that
queue while the engine is busy run together in one batch (same lists as alone), and beyond
max_queue a request is answered at once in upstream order, degraded "overload"."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from model.network import GenReranker
from service.engine import Engine, RerankRequest, RerankResult
from service.settings import Settings
from tests.support.bodies import make_request
from tests.support.server import ServerThread, wait_ready

pytestmark = pytest.mark.integration


class Gate:
    """Engine.rerank waits here while armed; counts batch sizes it saw."""

    def __init__(self) -> None:
        self.armed = False
        self.open = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate()
    rerank = Engine.rerank

    def held(self: Engine, requests: Sequence[RerankRequest], **kw: Any) -> list[RerankResult]:
        if g.armed:
            g.sizes.append(len(requests))
            g.entered.set()
            g.open.wait(60)
        return rerank(self, requests, **kw)

    monkeypatch.setattr(Engine, "rerank", held)
    yield g
    g.open.set()


def start(bundle: Path, **overrides: Any) -> ServerThread:
    overrides.setdefault("decode_policy", "fixed")
    # every engine call in the engine thread: a call held at the gate on the event loop's
    # thread (a small batch's, RERANK_INLINE_BATCH) would hold the loop too, and nothing
    # could queue behind it
    overrides.setdefault("inline_batch", 0)
    settings = Settings(bundle=bundle, default_budget_ms=60_000, warmup=False, **overrides)
    return ServerThread(settings).start()


def pending(srv: ServerThread) -> int:
    return int(srv.app.state.runtime.reranker.pending)


def wait_for(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_queued_requests_run_batched_by_candidate_bucket_with_the_same_lists(
    tiny_bundle: tuple[Path, GenReranker], gate: Gate
) -> None:
    srv = start(tiny_bundle[0], max_batch=4, max_queue=16)
    rng = np.random.default_rng(0)
    bodies = [make_request(rng, m, min(m, 5)) for m in (30, 8, 17, 64, 3)]
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c, ThreadPoolExecutor(5) as pool:
            wait_ready(c)
            gate.armed = True
            first = pool.submit(c.post, "/v1/rerank", json=bodies[0])
            assert gate.entered.wait(30)  # the engine holds request 0
            rest = [pool.submit(c.post, "/v1/rerank", json=b) for b in bodies[1:]]
            wait_for(lambda: pending(srv) == 5)
            gate.open.set()
            batched = [f.result().json() for f in [first, *rest]]
            gate.armed = False
            alone = [c.post("/v1/rerank", json=b).json() for b in bodies]
            metrics = c.get("/metrics").text
    finally:
        srv.stop()
    # m = 8 and 3 share bucket 8 (one call); 17 and 64 each have their own bucket. The
    # four queued requests are sent from threads, so their order (and with it which call
    # runs first, earliest deadline first) is not fixed
    assert gate.sizes[0] == 1 and sorted(gate.sizes[1:]) == [1, 1, 2]
    for b, a in zip(batched, alone, strict=True):
        assert not b["degraded"]
        assert [i["item_id"] for i in b["items"]] == [i["item_id"] for i in a["items"]]
        np.testing.assert_allclose(
            [i["score"] for i in b["items"]], [i["score"] for i in a["items"]], atol=1e-4
        )
    sums = [line for line in metrics.splitlines() if line.startswith("rerank_batch_size_")]
    assert "rerank_batch_size_sum 10.0" in sums and "rerank_batch_size_count 9.0" in sums, sums


def test_beyond_max_queue_is_overload_in_upstream_order(
    tiny_bundle: tuple[Path, GenReranker], gate: Gate
) -> None:
    srv = start(tiny_bundle[0], max_batch=4, max_queue=1)
    rng = np.random.default_rng(1)
    bodies = [make_request(rng, 20, 5) for _ in range(8)]
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c, ThreadPoolExecutor(8) as pool:
            wait_ready(c)
            gate.armed = True
            held: list[Future[httpx.Response]] = [pool.submit(c.post, "/v1/rerank", json=bodies[0])]
            assert gate.entered.wait(30)
            held.append(pool.submit(c.post, "/v1/rerank", json=bodies[1]))
            wait_for(lambda: pending(srv) == 2)
            shed = [pool.submit(c.post, "/v1/rerank", json=b).result().json() for b in bodies[2:]]
            gate.open.set()
            served = [f.result().json() for f in held]
            assert c.get("/readyz").status_code == 200
    finally:
        srv.stop()
    for out, body in zip(shed, bodies[2:], strict=True):
        assert out["degraded"] and out["reason"] == "overload" and out["passes"] == 0
        assert [i["item_id"] for i in out["items"]] == [
            c["item_id"] for c in body["candidates"][:5]
        ]
    assert all(not out["degraded"] for out in served)


def test_model_and_item_tower_failures_degrade_never_500(
    tiny_bundle: tuple[Path, GenReranker], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = start(tiny_bundle[0])
    rng = np.random.default_rng(2)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)

            def broken(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("onnxruntime fell over")

            monkeypatch.setattr(Engine, "rerank", broken)
            body = make_request(rng, 12, 4)
            r = c.post("/v1/rerank", json=body, headers={"X-Request-ID": "mine"})
            out = r.json()
            assert r.status_code == 200 and out["degraded"] and out["reason"] == "model"
            assert out["request_id"] == "mine" == r.headers["X-Request-ID"]
            assert [i["item_id"] for i in out["items"]] == [
                x["item_id"] for x in body["candidates"][:4]
            ]
            monkeypatch.setattr(Engine, "embed_items", broken)
            out = c.post("/v1/rerank", json=make_request(rng, 12, 4)).json()  # new items
            assert out["degraded"] and out["reason"] == "cache"
            monkeypatch.undo()
            out = c.post("/v1/rerank", json=make_request(rng, 12, 4)).json()
            assert not out["degraded"]
            text = c.get("/metrics").text
            assert 'rerank_fallback_total{reason="model"} 1.0' in text
            assert 'rerank_embedding_lookups_total{result="error",tier="l3"} 12.0' in text
    finally:
        srv.stop()


def test_a_bug_on_the_request_path_is_a_500_counted_as_an_error(
    tiny_bundle: tuple[Path, GenReranker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """None is expected (every failure after validation degrades), but one that slips
    through must show in the metrics (outcome="error"), not only in the log."""
    from service.rerank import Reranker

    srv = start(tiny_bundle[0])
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)

            async def broken(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("a bug")

            monkeypatch.setattr(Reranker, "rerank", broken)
            r = c.post("/v1/rerank", json=make_request(np.random.default_rng(3), 12, 4),
                       headers={"X-Request-ID": "bug-1"})  # fmt: skip
            assert r.status_code == 500 and r.headers["X-Request-ID"] == "bug-1"
            assert r.json()["error"]["type"] == "internal_error"
            r = c.post("/v1/rerank", json=make_request(np.random.default_rng(4), 12, 4))
            assert r.status_code == 500  # the connection and the server still answer
            monkeypatch.undo()
            text = c.get("/metrics").text
            assert 'rerank_request_duration_seconds_count{outcome="error"} 2.0' in text
            assert "rerank_inflight_requests 0.0" in text
    finally:
        srv.stop()


def test_a_deadline_hit_inside_the_engine_completes_the_list_degraded(
    tiny_bundle: tuple[Path, GenReranker], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = start(tiny_bundle[0])
    rerank = Engine.rerank

    def late(self: Engine, requests: Sequence[RerankRequest], **kw: Any) -> list[RerankResult]:
        kw["deadline"] = time.perf_counter()  # as if the budget ran out after the encoder
        return rerank(self, requests, **kw)

    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            monkeypatch.setattr(Engine, "rerank", late)
            body = make_request(np.random.default_rng(3), 30, 10)
            out = c.post("/v1/rerank", json=body).json()
    finally:
        srv.stop()
    assert out["degraded"] and out["reason"] == "budget" and out["passes"] == 1
    ids = [i["item_id"] for i in out["items"]]
    assert len(set(ids)) == 10 and set(ids) <= {x["item_id"] for x in body["candidates"]}


def test_adaptive_policy_decodes_with_the_beam_at_low_load(
    tiny_bundle: tuple[Path, GenReranker],
) -> None:
    from tests.support.reference import reference

    srv = start(tiny_bundle[0], decode_policy="adaptive", beam=3)
    rng = np.random.default_rng(5)
    bodies = [make_request(rng, m, 6) for m in (30, 12, 50)]
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            assert c.get("/readyz").json()["decode_level"] == "beam3"
            outs = [c.post("/v1/rerank", json=b).json() for b in bodies]
            metrics = c.get("/metrics").text
    finally:
        srv.stop()
    torch.set_num_threads(1)
    for out, body in zip(outs, bodies, strict=True):
        assert not out["degraded"] and out["passes"] == 6  # beam: one item per pass
        assert [i["item_id"] for i in out["items"]] == reference(tiny_bundle[1], body, beam=3)
    assert 'rerank_decode_level_total{level="beam3"} 3.0' in metrics


def test_a_request_whose_client_went_away_is_dropped_and_counted(
    tiny_bundle: tuple[Path, GenReranker], gate: Gate
) -> None:
    srv = start(tiny_bundle[0], max_batch=4, max_queue=16)
    rng = np.random.default_rng(6)
    bodies = [make_request(rng, 20, 5) for _ in range(3)]
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c, ThreadPoolExecutor(3) as pool:
            wait_ready(c)
            gate.armed = True
            held = pool.submit(c.post, "/v1/rerank", json=bodies[0])
            assert gate.entered.wait(30)  # the engine holds request 0
            # request 1 queues behind it; its client gives up after 0.5 s and hangs up
            impatient = httpx.Client(base_url=srv.url, timeout=0.5)
            with impatient, pytest.raises(httpx.TimeoutException):
                impatient.post("/v1/rerank", json=bodies[1])
            wait_for(lambda: pending(srv) == 1)  # the watcher took it out of the wait
            gate.open.set()
            assert not held.result().json()["degraded"]
            gate.armed = False
            after = c.post("/v1/rerank", json=bodies[2]).json()  # the service goes on
            metrics = c.get("/metrics").text
    finally:
        srv.stop()
    assert not after["degraded"]
    assert gate.sizes == [1]  # request 1 never reached the engine
    assert "rerank_dropped_requests_total 1.0" in metrics


def _copy_version(src: Path, artifacts: Path, version: str) -> Path:
    """Another version of the same bundle: the files copied, the manifest renamed."""
    dst = artifacts / version
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = version
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _serve_v1(source: Path, tmp_path: Path) -> tuple[Path, ServerThread]:
    """An artifacts dir whose `latest` names a copy of `source` as v1, served and watched."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    _copy_version(source, artifacts, "v1")
    (artifacts / "latest").write_text("v1\n")
    return artifacts, start(artifacts, reload_interval_s=0.05, max_batch=4)


def _roll_refused(c: httpx.Client, source: Path, artifacts: Path, name: str,
                  edit: Any, errors: int) -> None:  # fmt: skip
    """Roll a copy of `source` whose manifest's model_config `edit` changed, and wait
    until the service has counted `errors` failed reloads."""
    version = _copy_version(source, artifacts, name)
    manifest = json.loads((version / "manifest.json").read_text())
    edit(manifest["model_config"])
    (version / "manifest.json").write_text(json.dumps(manifest))
    (artifacts / "latest").write_text(f"{name}\n")
    want = f'rerank_bundle_reloads_total{{result="error"}} {errors:.1f}'
    wait_for(lambda: want in c.get("/metrics").text)


def test_a_new_bundle_is_swapped_in_and_a_broken_one_keeps_the_old_serving(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    artifacts, srv = _serve_v1(tiny_bundle[0], tmp_path)
    rng = np.random.default_rng(7)
    # a generous budget: the new version's warm-up competes for the CPU (a degraded answer
    # under a busy machine is not what this test is about)
    body = make_request(rng, 30, 5, budget_ms=30_000)

    def version(c: httpx.Client) -> str:
        out = c.post("/v1/rerank", json=body)
        assert out.status_code == 200 and not out.json()["degraded"]
        return str(out.json()["model_version"])

    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            assert version(c) == "v1"
            # a version whose decoder is corrupt: refused (sha256), v1 goes on serving
            broken = _copy_version(tiny_bundle[0], artifacts, "v2-broken")
            (broken / "decoder.onnx").write_bytes(b"not a graph")
            (artifacts / "latest").write_text("v2-broken\n")
            wait_for(
                lambda: 'rerank_bundle_reloads_total{result="error"} 1.0' in c.get("/metrics").text
            )
            assert version(c) == "v1" and c.get("/v1/model").json()["version"] == "v1"
            # a good version: loaded, warmed, swapped in; requests never fail meanwhile
            _copy_version(tiny_bundle[0], artifacts, "v3")
            (artifacts / "latest").write_text("v3\n")
            seen = []
            deadline = time.monotonic() + 60
            while (not seen or seen[-1] != "v3") and time.monotonic() < deadline:
                seen.append(version(c))
            assert seen[-1] == "v3" and set(seen) <= {"v1", "v3"}
            assert c.get("/readyz").json()["model_version"] == "v3"
            metrics = c.get("/metrics").text
    finally:
        srv.stop()
    assert 'rerank_bundle_reloads_total{result="ok"} 1.0' in metrics
    assert 'version="v3"' in metrics and 'version="v1"' not in metrics  # model_info follows


def test_a_bundle_with_smaller_limits_is_refused_and_the_old_keeps_serving(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """A reload must not shrink the API's limits under its clients: requests valid now
    would become 422s (or engine errors)."""
    artifacts, srv = _serve_v1(tiny_bundle[0], tmp_path)
    body = make_request(np.random.default_rng(9), 30, 5, budget_ms=30_000)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            limit = srv.app.state.runtime.reranker.reader.limits.max_candidates

            def smaller(cfg: dict[str, Any]) -> None:
                cfg["max_candidates"] = limit - 1

            _roll_refused(c, tiny_bundle[0], artifacts, "v2-small", smaller, errors=1)
            out = c.post("/v1/rerank", json=body)
            assert out.status_code == 200 and out.json()["model_version"] == "v1"
            assert srv.app.state.runtime.reranker.reader.limits.max_candidates == limit
            # a bundle that drops a feature name: requests sending it would become 422s
            dropped: list[str] = []

            def fewer(cfg: dict[str, Any]) -> None:
                dropped.append(cfg["schema"]["user_dense"].pop())

            _roll_refused(c, tiny_bundle[0], artifacts, "v3-fewer", fewer, errors=2)
            body["user"]["features"][dropped[0]] = 0.5
            out = c.post("/v1/rerank", json=body)
            assert out.status_code == 200 and out.json()["model_version"] == "v1"
    finally:
        srv.stop()


def test_a_malformed_manifest_is_a_failed_reload_and_the_watch_goes_on(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """A version whose manifest lacks a field the limits check reads: counted as a failed
    reload, the old version serves, and the watch is still alive for the next version."""
    artifacts, srv = _serve_v1(tiny_bundle[0], tmp_path)
    body = make_request(np.random.default_rng(10), 30, 5, budget_ms=30_000)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)

            def malformed(cfg: dict[str, Any]) -> None:
                del cfg["max_steps"]

            _roll_refused(c, tiny_bundle[0], artifacts, "v2-malformed", malformed, errors=1)
            out = c.post("/v1/rerank", json=body)
            assert out.status_code == 200 and out.json()["model_version"] == "v1"
            _copy_version(tiny_bundle[0], artifacts, "v3")
            (artifacts / "latest").write_text("v3\n")
            wait_for(lambda: c.get("/readyz").json()["model_version"] == "v3")
            assert c.post("/v1/rerank", json=body).json()["model_version"] == "v3"
    finally:
        srv.stop()


def test_the_budget_bounds_the_wait_for_a_busy_engine(
    tiny_bundle: tuple[Path, GenReranker], gate: Gate
) -> None:
    srv = start(tiny_bundle[0], max_batch=4, max_queue=16)
    rng = np.random.default_rng(8)
    held_body = make_request(rng, 20, 5)
    hurried = make_request(rng, 20, 5, budget_ms=200)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c, ThreadPoolExecutor(2) as pool:
            wait_ready(c)
            gate.armed = True
            held = pool.submit(c.post, "/v1/rerank", json=held_body)
            assert gate.entered.wait(30)  # the engine is busy (held) for as long as we like
            t0 = time.monotonic()
            out = c.post("/v1/rerank", json=hurried).json()
            waited = time.monotonic() - t0
            gate.open.set()
            assert not held.result().json()["degraded"]
            metrics = c.get("/metrics").text
    finally:
        srv.stop()
    assert out["degraded"] and out["reason"] == "budget" and out["passes"] == 0
    assert [i["item_id"] for i in out["items"]] == [c["item_id"] for c in hurried["candidates"][:5]]
    assert 0.19 <= waited < 5, waited  # answered at its deadline, not when the engine freed up
    # it was queued, and answered at its deadline (a pause of the test process before it
    # queued, e.g. a garbage collection, moves time from queue_ms to before it)
    timings = out["timings"]
    assert timings["queue_ms"] > 0 and timings["total_ms"] >= 190, timings
    assert "rerank_dropped_requests_total 0.0" in metrics  # expired is not dropped


def test_a_busy_engine_waits_for_more_an_idle_one_does_not(
    tiny_bundle: tuple[Path, GenReranker], gate: Gate
) -> None:
    srv = start(tiny_bundle[0], max_batch=8, max_queue=16, max_wait_ms=50)
    rng = np.random.default_rng(9)
    bodies = [make_request(rng, 20, 5) for _ in range(4)]
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c, ThreadPoolExecutor(4) as pool:
            wait_ready(c)
            c.post("/v1/rerank", json=bodies[0])  # an idle engine: a batch of its own
            gate.armed = True
            first = pool.submit(c.post, "/v1/rerank", json=bodies[0])
            assert gate.entered.wait(30)
            second = pool.submit(c.post, "/v1/rerank", json=bodies[1])
            wait_for(lambda: pending(srv) == 2)
            gate.armed = False
            gate.open.set()  # the engine frees up with one request queued: it waits ...
            rest = [pool.submit(c.post, "/v1/rerank", json=b) for b in bodies[2:]]  # ... for these
            for f in [first, second, *rest]:
                assert f.result().status_code == 200
            metrics = c.get("/metrics").text
    finally:
        srv.stop()
    # batches: the idle one, the held one, then the request that queued plus the two that
    # came within the wait (without the wait: 1, 1, 1, 2 or 1, 1, 1, 1, 1)
    sums = [line for line in metrics.splitlines() if line.startswith("rerank_batch_size_")]
    assert "rerank_batch_size_sum 5.0" in sums and "rerank_batch_size_count 3.0" in sums, sums
