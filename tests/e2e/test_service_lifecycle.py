"""The bundle lifecycle on a real uvicorn: a swap frees the old engine, rerank_model_info
names the served bundle through any swap, a `latest` that names nothing is a counted
failed reload, and a start with such a `latest` serves the newest bundle that verifies."""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.network import GenReranker
from service.settings import Settings
from tests.support.bodies import make_request
from tests.support.bundle import copy_version, point_latest
from tests.support.server import ServerThread, wait_ready

pytestmark = pytest.mark.integration


def wait_for(condition: Callable[[], Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def serve(artifacts: Path) -> ServerThread:
    settings = Settings(bundle=artifacts, reload_interval_s=0.05, max_batch=4, max_k=10,
                        decode_policy="fixed", warmup=False, default_budget_ms=30_000)  # fmt: skip
    return ServerThread(settings).start()


def reloads(c: httpx.Client, result: str) -> float:
    return sample(c, "rerank_bundle_reloads_total", result=result)


def sample(c: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return float("nan")


def model_info(c: httpx.Client) -> dict[str, float]:
    """rerank_model_info's series: version -> value."""
    return {
        s.labels["version"]: s.value
        for family in text_string_to_metric_families(c.get("/metrics").text)
        for s in family.samples
        if s.name == "rerank_model_info"
    }


def artifacts_with_v1(source: Path, tmp_path: Path) -> Path:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    copy_version(source, artifacts, "v1")
    point_latest(artifacts, "v1")
    return artifacts


def swap_to(c: httpx.Client, artifacts: Path, name: str, ok: float) -> None:
    """Point latest at `name` and wait until the service counted `ok` swaps (the old
    bundle retires in the background)."""
    point_latest(artifacts, name)
    wait_for(lambda: reloads(c, "ok") == ok)


def test_a_swap_leaves_no_engine_behind(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """Neither the start-up's engine (the lifespan's) nor a swapped-out one (the watch's)
    stays referenced once retired: each swap frees the previous engine."""
    artifacts = artifacts_with_v1(tiny_bundle[0], tmp_path)
    srv = serve(artifacts)
    body = make_request(np.random.default_rng(3), 30, 5)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            for n, name in enumerate(("v2", "v3"), start=1):
                engine = weakref.ref(srv.app.state.runtime.engine)
                assert c.post("/v1/rerank", json=body).status_code == 200
                copy_version(tiny_bundle[0], artifacts, name)
                swap_to(c, artifacts, name, ok=n)

                def freed(engine: weakref.ref[Any] = engine) -> bool:
                    gc.collect()
                    return engine() is None

                wait_for(freed, timeout=10)
                assert c.post("/v1/rerank", json=body).json()["model_version"] == name
    finally:
        srv.stop()


def test_model_info_follows_every_swap_also_to_the_same_labels(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """A bundle rebuilt under the same version labels (another directory, same manifest
    version, label and created) keeps rerank_model_info at 1; a new version replaces it."""
    artifacts = artifacts_with_v1(tiny_bundle[0], tmp_path)
    srv = serve(artifacts)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            assert model_info(c) == {"v1": 1.0}
            copy_version(tiny_bundle[0], artifacts, "v1-rebuilt", version="v1")
            swap_to(c, artifacts, "v1-rebuilt", ok=1)
            assert srv.app.state.runtime.engine.bundle.path.name == "v1-rebuilt"
            assert model_info(c) == {"v1": 1.0}
            copy_version(tiny_bundle[0], artifacts, "v2")
            swap_to(c, artifacts, "v2", ok=2)
            assert model_info(c) == {"v2": 1.0}
    finally:
        srv.stop()


def test_a_latest_that_names_no_bundle_is_a_counted_failed_reload(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """latest naming a missing directory, then latest gone: each a failed reload, counted
    once (the reload alert reads the counter), while the served version goes on."""
    artifacts = artifacts_with_v1(tiny_bundle[0], tmp_path)
    srv = serve(artifacts)
    body = make_request(np.random.default_rng(4), 30, 5)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            assert reloads(c, "error") == 0
            point_latest(artifacts, "v-missing")
            wait_for(lambda: reloads(c, "error") == 1)
            time.sleep(0.3)  # several looks: the same problem is counted once
            assert reloads(c, "error") == 1
            (artifacts / "latest").unlink()
            wait_for(lambda: reloads(c, "error") == 2)
            out = c.post("/v1/rerank", json=body)
            assert out.status_code == 200 and out.json()["model_version"] == "v1"
            assert c.get("/readyz").json()["ready"] is True
            copy_version(tiny_bundle[0], artifacts, "v2")
            swap_to(c, artifacts, "v2", ok=1)  # the watch went on
    finally:
        srv.stop()


def test_a_start_with_a_broken_latest_serves_the_newest_bundle_that_verifies(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """latest names a directory that does not exist: the service starts anyway, on the
    newest version whose files verify (the newest one has a corrupt graph: skipped), says
    so in the log, and counts the broken latest as a failed reload."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    copy_version(tiny_bundle[0], artifacts, "v1", created="2026-01-01T00:00:00Z")
    copy_version(tiny_bundle[0], artifacts, "v2", created="2026-02-01T00:00:00Z")
    broken = copy_version(tiny_bundle[0], artifacts, "v3", created="2026-03-01T00:00:00Z")
    (broken / "decoder.onnx").write_bytes(b"not a graph")
    point_latest(artifacts, "v4")  # never written: a rollout that failed half-way
    caplog.set_level(logging.WARNING, logger="service")
    srv = serve(artifacts)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            out = c.post("/v1/rerank", json=make_request(np.random.default_rng(5), 30, 5))
            assert out.status_code == 200 and out.json()["model_version"] == "v2"
            wait_for(lambda: reloads(c, "error") == 1)
    finally:
        srv.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "service"]
    assert any("serving" in m and "v2" in m and "newest" in m for m in said), said
    assert any("v3" in m and "refused" in m for m in said), said


def test_a_retire_waiting_on_a_request_does_not_hold_up_the_next_swap(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """The swapped-out reranker waits (up to RETIRE_S) for its requests before it closes;
    the reload watch goes on meanwhile: the next version is served within seconds, and the
    held reranker closes once its request is done."""
    artifacts = artifacts_with_v1(tiny_bundle[0], tmp_path)
    srv = serve(artifacts)
    body = make_request(np.random.default_rng(5), 30, 5)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_ready(c)
            held = srv.app.state.runtime.reranker
            held.active += 1  # a request still inside v1's reranker (none is in flight now)
            copy_version(tiny_bundle[0], artifacts, "v2")
            swap_to(c, artifacts, "v2", ok=1)
            copy_version(tiny_bundle[0], artifacts, "v3")
            t0 = time.monotonic()
            swap_to(c, artifacts, "v3", ok=2)
            assert time.monotonic() - t0 < 10, "the watch waited for v1's retire"
            assert c.post("/v1/rerank", json=body).json()["model_version"] == "v3"
            assert not held.closed
            held.active -= 1  # it gets no requests now: no race with the loop
            wait_for(lambda: held.closed, timeout=10)
    finally:
        srv.stop()
