"""loadtest/: the pure parts (server percentiles from two /metrics scrapes, the answer check,
the traffic, the shapes) and one short `python -m loadtest.run` end to end against a tiny
bundle (real redis-server, real service, real locust in their own processes).

Nothing here imports locust: it monkey-patches the process with gevent at import."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from contract.features import FeatureSchema
from loadtest import report, scrapes
from loadtest.breakdown import Breakdown, culprit, markdown
from loadtest.run import LoadTestError, check_loopback, placement
from loadtest.shapes import SHAPES, STEPS
from loadtest.traffic import (
    RERANK,
    FeatureSpec,
    RerankCall,
    Traffic,
    TrafficConfig,
    check_response,
)
from model.network import GenReranker
from service.api import ApiError, Limits, parse_body
from service.metrics import Metrics
from service.request_reader import RequestReader

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- /metrics -> percentiles

_HEAD = """# HELP rerank_request_duration_seconds Arrival to response of POST /v1/rerank.
# TYPE rerank_request_duration_seconds histogram
"""


def _histogram(outcome: str, counts: dict[str, int], total_s: float) -> str:
    """Cumulative buckets 1, 2, 4, 8 ms, +Inf from per-bucket counts."""
    lines, cum = [], 0
    for le in ("0.001", "0.002", "0.004", "0.008", "+Inf"):
        cum += counts.get(le, 0)
        lines.append(f'rerank_request_duration_seconds_bucket{{le="{le}",outcome="{outcome}"}} '
                     f"{cum}.0")  # fmt: skip
    lines.append(f'rerank_request_duration_seconds_count{{outcome="{outcome}"}} {cum}.0')
    lines.append(f'rerank_request_duration_seconds_sum{{outcome="{outcome}"}} {total_s}')
    return "\n".join(lines) + "\n"


def _lookups(values: dict[tuple[str, str], int]) -> str:
    return "# TYPE rerank_embedding_lookups_total counter\n" + "".join(
        f'rerank_embedding_lookups_total{{result="{r}",tier="{t}"}} {v}.0\n'
        for (t, r), v in values.items()
    )


BEFORE = (
    _HEAD
    # 1000 fast answers before the run: ignoring the delta would put p50 at <= 1 ms
    + _histogram("ok", {"0.001": 1000}, 0.5)
    + _histogram("degraded", {}, 0.0)
    + _histogram("rejected", {"0.001": 7}, 0.001)
    + _lookups({("l1", "hit"): 500, ("l1", "miss"): 500, ("l2", "hit"): 400, ("l2", "miss"): 100})
)
AFTER = (
    _HEAD
    # the run: ok 50 in (1, 2] ms and 30 in (2, 4]; degraded 10 in (2, 4] and 10 in (4, 8]
    + _histogram("ok", {"0.001": 1000, "0.002": 50, "0.004": 30}, 0.5 + 0.2)
    + _histogram("degraded", {"0.004": 10, "0.008": 10}, 0.1)
    # rejected answers are refused bodies, not served ones: never in the percentiles
    + _histogram("rejected", {"0.001": 7, "+Inf": 500}, 50.0)
    + _lookups({("l1", "hit"): 1400, ("l1", "miss"): 600, ("l2", "hit"): 450, ("l2", "miss"): 150})
)


def test_server_percentiles_from_the_histogram_deltas() -> None:
    server = report.server_metrics(BEFORE, AFTER)
    served = server["latency_ms"]["served"]
    # 100 served in the window: rank 50 ends the (1, 2] bucket; rank 90 ends (2, 4];
    # rank 95 is half-way into (4, 8] (5 of its 10): 4 + 4 * 5 / 10 = 6 ms; rank 99: 7.6 ms
    assert served["count"] == 100
    assert served["p50"] == pytest.approx(2.0)
    assert served["p95"] == pytest.approx(6.0)
    assert served["p99"] == pytest.approx(7.6)
    assert served["mean"] == pytest.approx((0.2 + 0.1) / 100 * 1e3)
    assert server["latency_ms"]["ok"]["p50"] == pytest.approx(1.0 + 1.0 * 40 / 50)
    assert server["requests"] == {"ok": 80, "degraded": 20, "rejected": 500}
    # l1: 1000 lookups, 900 hits; l2: 100 reached it, 50 hits
    assert server["lookups"]["l1"] == {"hit": 900, "miss": 100}
    assert server["hit_ratio"] == {"l1": pytest.approx(0.9), "l2": pytest.approx(0.5)}
    assert server["served_from"] == {"l1": pytest.approx(0.9), "l2": pytest.approx(0.05)}


def test_histogram_quantile_edges() -> None:
    assert math.isnan(scrapes.histogram_quantile(0.5, {}))
    assert math.isnan(scrapes.histogram_quantile(0.5, {0.001: 0.0, math.inf: 0.0}))
    # the rank in +Inf: the largest finite bound, as Prometheus answers
    assert scrapes.histogram_quantile(0.99, {0.001: 1.0, math.inf: 10.0}) == 0.001


def test_server_metrics_read_the_services_own_exposition() -> None:
    metrics = Metrics()
    before, _ = metrics.render()
    for seconds in (0.0004, 0.0011, 0.0012, 0.0013, 0.05):
        metrics.request_duration.labels("ok").observe(seconds)
    metrics.lookups.labels("l1", "hit").inc(30)
    metrics.lookups.labels("l1", "miss").inc(10)
    metrics.lookups.labels("l3", "hit").inc(10)
    metrics.fallback.labels("overload").inc(2)
    after, _ = metrics.render()
    server = report.server_metrics(before.decode(), after.decode())
    assert server["requests"]["ok"] == 5
    # the median (rank 2.5) lies in the bucket holding 1.1..1.3 ms
    assert 1.0 <= server["latency_ms"]["served"]["p50"] <= 1.6
    assert server["hit_ratio"]["l1"] == pytest.approx(0.75)
    assert server["served_from"]["l3"] == pytest.approx(0.25)
    assert server["fallback"]["overload"] == 2
    json.dumps(server)  # what run.py writes to server_metrics.json


# ---------------------------------------------------------------- the answer check


def _call(ids: tuple[int, ...] = (11, 12, 13, 14, 15), k: int = 3) -> RerankCall:
    return RerankCall(RERANK, b"{}", "lt-1", ids, k, 200)


def _answer(items: list[int], degraded: bool = False, reason: str | None = None,
            passes: int = 1, request_id: str = "lt-1") -> bytes:  # fmt: skip
    return json.dumps({"request_id": request_id, "model_version": "v", "degraded": degraded,
                       "items": [{"item_id": i, "score": 0.5} for i in items],
                       "reason": reason, "passes": passes, "timings": {}}).encode()  # fmt: skip


def test_check_accepts_a_good_answer_and_reports_degraded() -> None:
    assert check_response(_call(), 200, _answer([14, 11, 15])).error is None
    budget = check_response(_call(), 200, _answer([14, 11, 15], True, "budget", passes=1))
    assert budget.error is None and budget.degraded == "budget"  # completed early
    upstream = check_response(_call(), 200, _answer([11, 12, 13], True, "overload", passes=0))
    assert upstream.error is None and upstream.degraded == "overload"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (_answer([14, 14, 15]), "duplicate"),
        (_answer([14, 11, 99]), "not in the request"),
        (_answer([14, 11]), "2 items"),
        (_answer([14, 11, 15, 12]), "4 items"),
        (_answer([14, 11, 15], request_id="other"), "request_id"),
        (_answer([14, 11, 15], True, "tired"), "reason"),
        (_answer([14, 11, 15], True, "overload", passes=0), "upstream top k"),
        (_answer([14, 11, 15], False, None, passes=0), "passes"),
        (b'{"items": 3}', "malformed"),
        (b"not json", "malformed"),
    ],
)
def test_check_rejects_wrong_answers(body: bytes, why: str) -> None:
    error = check_response(_call(), 200, body).error
    assert error is not None and why in error


def test_check_of_a_bad_request_wants_422() -> None:
    bad = RerankCall("invalid:nan_score", b"{}", "lt-2", (1, 2), 2, 422)
    refused = json.dumps({"error": {"type": "invalid_request", "message": "x", "field": "k"}})
    assert check_response(bad, 422, refused.encode()).error is None
    assert "want 422" in (check_response(bad, 200, _answer([1, 2])).error or "")
    assert "error body" in (check_response(bad, 422, b"oops").error or "")
    assert "HTTP 503" in (check_response(_call(), 503, b"busy").error or "")


# ---------------------------------------------------------------- the traffic

MANIFEST = {
    "version": "test-0000",
    "model_config": {
        "max_candidates": 256,
        "schema": {
            "item_id_buckets": 97,
            "user_id_buckets": 13,
            "item_categorical": [["category", 7], ["creator", 11]],
            "item_dense": ["quality", "duration", "freshness"],
            "user_dense": ["pref_0", "pref_1", "diversity"],
        },
    },
}


@pytest.fixture(scope="module")
def calls() -> list[RerankCall]:
    traffic = Traffic(FeatureSpec.from_manifest(MANIFEST), TrafficConfig(catalogue=50_000))
    return [traffic.next() for _ in range(3000)]


def test_traffic_is_valid_for_the_bundle_and_bad_ones_are_refused(
    calls: list[RerankCall],
) -> None:
    """Every body through the service's own parse and checks: valid ones pass, the
    deliberately bad ones (about 1%, each kind) are refused."""
    schema = FeatureSchema.from_dict(MANIFEST["model_config"]["schema"])
    reader = RequestReader(schema, Limits(max_candidates=256, max_k=50))
    refused: Counter[str] = Counter()
    # the first 800 (the parse costs ~1 ms a body) and every bad one
    checked = calls[:800] + [c for c in calls[800:] if c.expect == 422]
    for call in checked:
        try:
            parsed = reader.read(parse_body(call.body))
        except ApiError as e:
            assert call.expect == 422, (call.name, e.field, e.message)
            refused[call.name] += 1
            continue
        assert call.expect == 200, call.name
        assert parsed.k == call.k <= parsed.m == len(call.item_ids)
        assert parsed.item_ids.tolist() == list(call.item_ids)
    names = Counter(c.name for c in checked)
    assert refused == {n: c for n, c in names.items() if n != RERANK}
    assert set(refused) == {"invalid:duplicate_id", "invalid:k_too_large", "invalid:nan_score"}
    assert 0.005 < sum(refused.values()) / len(calls) < 0.02


def test_traffic_mix_and_popularity(calls: list[RerankCall]) -> None:
    valid = [c for c in calls if c.expect == 200]
    m = Counter(len(c.item_ids) for c in valid)
    k = Counter(c.k for c in valid)
    assert set(m) == {30, 100, 200} and set(k) == {4, 10}
    n = len(valid)
    assert m[30] / n == pytest.approx(0.6, abs=0.05) and m[200] / n == pytest.approx(0.1, abs=0.03)
    assert k[10] / n == pytest.approx(0.7, abs=0.05)
    budgets = Counter(json.loads(c.body).get("budget_ms") for c in valid[:500])
    assert budgets[None] / 500 == pytest.approx(0.7, abs=0.08) and len(budgets) == 4
    ids = np.concatenate([np.array(c.item_ids) for c in valid])
    catalogue = ids[ids < 50_000]
    # Zipf: the top 1% of the catalogue is far more than 1% of the candidates
    assert (catalogue < 500).mean() > 0.3
    assert len(np.unique(catalogue)) > 5_000  # and the long tail is there
    new = ids[ids >= 50_000]  # never-seen items: ~0.5% of candidates, each id once
    assert 0.002 < len(new) / len(ids) < 0.01
    assert len(np.unique(new)) == len(new)
    for c in valid[:200]:  # the same item carries the same features in every request
        body = json.loads(c.body)
        assert len({cand["item_id"] for cand in body["candidates"]}) == len(c.item_ids)
        scores = [cand["score"] for cand in body["candidates"]]
        assert scores == sorted(scores, reverse=True)  # upstream order


def test_an_item_keeps_its_features() -> None:
    traffic = Traffic(FeatureSpec.from_manifest(MANIFEST), TrafficConfig(catalogue=1_000))
    seen: dict[int, dict[str, float]] = {}
    for _ in range(50):
        for cand in json.loads(traffic.next().body)["candidates"]:
            assert seen.setdefault(cand["item_id"], cand["features"]) == cand["features"]


def _catalogue_part(call: RerankCall, catalogue: int) -> tuple[object, ...]:
    """A request without its never-seen ids (those carry the run's start time)."""
    return (call.name, call.k, tuple(i for i in call.item_ids if i < catalogue),
            json.loads(call.body).get("budget_ms"))  # fmt: skip


def test_one_process_repeats_its_traffic_and_each_worker_draws_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One locust process: the same requests every run (the seed's own stream, as before
    streams existed). Distributed workers (stream = worker index): different requests, and
    never-seen ids of their own even when started in the same microsecond; otherwise every
    worker sends the same candidates in step and the caches report inflated hit rates."""
    spec, n = FeatureSpec.from_manifest(MANIFEST), 50_000

    def run(stream: int | None, seed: int = 0) -> list[RerankCall]:
        traffic = Traffic(spec, TrafficConfig(catalogue=n, seed=seed, stream=stream))
        return [traffic.next() for _ in range(300)]

    monkeypatch.setattr("loadtest.traffic.time.time_ns", lambda: 1_700_000_000_000_000_000)
    one, again = run(None), run(None)
    assert [_catalogue_part(c, n) for c in one] == [_catalogue_part(c, n) for c in again]
    # the seed's own stream is numpy's default_rng(seed): single-process traffic as before
    ranks = Traffic(spec, TrafficConfig(catalogue=n)).ranks[:1000]
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64)
    cdf = np.cumsum(weights)
    expect = np.searchsorted(cdf / cdf[-1], np.random.default_rng(0).random(Traffic.RANKS))
    assert ranks.tolist() == expect[:1000].tolist()
    workers = [run(0), run(1), run(2)]
    assert [_catalogue_part(c, n) for c in run(1)] == [_catalogue_part(c, n) for c in workers[1]]
    parts = [{_catalogue_part(c, n)[2] for c in calls} for calls in (one, *workers)]
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            assert not a & b  # no request's candidates repeated by another stream
    new = [{i for c in calls for i in c.item_ids if i >= n} for calls in workers]
    assert all(new) and not (new[0] & new[1]) and not (new[1] & new[2]) and not (new[0] & new[2])
    assert max(max(ids) for ids in new) < 1 << 63  # the service's int64
    assert [_catalogue_part(c, n) for c in run(None, seed=1)] != [
        _catalogue_part(c, n) for c in one
    ]


def test_locustfile_gives_each_worker_its_own_stream() -> None:
    """loadtest/locustfile.py's traffic_stream: None for a local (or master) runner, the
    worker index for a worker, its pid when the master sent no index. In a subprocess:
    importing locust monkey-patches the process with gevent."""
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed: make venv installs the loadtest extra")
    code = (
        "import os, types\n"
        "from locust.runners import LocalRunner, MasterRunner, WorkerRunner\n"
        "from loadtest.locustfile import traffic_stream\n"
        "def env(cls, **attrs):\n"
        "    runner = cls.__new__(cls)\n"
        "    runner.__dict__.update(attrs)\n"
        "    return types.SimpleNamespace(runner=runner)\n"
        "print(traffic_stream(env(LocalRunner, worker_index=0)),"
        " traffic_stream(env(MasterRunner)), traffic_stream(types.SimpleNamespace(runner=None)),"
        " traffic_stream(env(WorkerRunner, worker_index=0)),"
        " traffic_stream(env(WorkerRunner, worker_index=3)),"
        " traffic_stream(env(WorkerRunner)) == os.getpid())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["None", "None", "None", "0", "3", "True"]


# ---------------------------------------------------------------- shapes, the target


def test_shapes() -> None:
    steady, step, spike = SHAPES["steady"], SHAPES["step"], SHAPES["spike"]
    assert steady(0.0, 16, 4.0, 60.0) == (16, 4.0) and steady(60.0, 16, 4.0, 60.0) is None
    users = [step(t, 20, 4.0, 50.0)[0] for t in (0.0, 9.9, 10.0, 25.0, 49.9)]
    assert users == [4, 4, 8, 12, 20] and STEPS == 5
    assert step(50.0, 20, 4.0, 50.0) is None
    assert [spike(t, 16, 4.0, 100.0)[0] for t in (0, 39, 40, 59, 60, 99)] == [
        4, 4, 16, 16, 4, 4,
    ]  # fmt: skip


def test_only_loopback_targets() -> None:
    for url in (
        "http://127.0.0.1:8000/",
        "http://localhost:1",
        "http://[::1]:80",
        "http://127.3.2.1",
    ):
        assert check_loopback(url) == url.rstrip("/")
    for url in ("http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1", "127.0.0.1:80"):
        with pytest.raises(LoadTestError):
            check_loopback(url)


# ---------------------------------------------------------------- end to end


@pytest.mark.integration
@pytest.mark.slow
def test_loadtest_run_end_to_end(
    tiny_bundle: tuple[Path, GenReranker],
    tmp_path: Path,
) -> None:
    """Redis + service + locust for 10 s with 4 users; the whole report, no failures."""
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed: make venv installs the loadtest extra")
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "PROMETHEUS_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--bundle", str(tiny_bundle[0]), "--users", "4",
         "--duration", "10", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    logs = "\n".join((out / n).read_text()[-2000:] for n in ("locust.log", "service.log")
                     if (out / n).is_file())  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv",
                 "locust.html", "latency.png", "summary.md", "server_metrics.json"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = report.client_stats(out / "locust_stats.csv")
    assert stats[RERANK].requests > 50
    assert sum(s.failures for s in stats.values()) == 0
    server = json.loads((out / "server_metrics.json").read_text())
    # the client's and the server's counts agree: the run ends gracefully (requests in flight
    # finish and are counted), and every answer was checked
    requests = server["requests"]
    assert requests["ok"] + requests["degraded"] == stats[RERANK].requests
    assert requests["rejected"] == sum(s.requests for n, s in stats.items() if "invalid:" in n)
    degraded = sum(s.requests for s in stats.values() if s.type == "DEGRADED")
    assert requests["degraded"] == degraded == sum(server["fallback"].values())
    assert server["lookups"]["l2"]["hit"] > 0  # the published embeddings were read
    assert 0 < server["latency_ms"]["served"]["p50"] <= server["latency_ms"]["served"]["p99"]
    text = (out / "summary.md").read_text()
    assert "| failures (wrong answers, errors) | 0 |" in text
    assert "server p50 / p95 / p99" in text and "| l1 |" in text
    assert "- placement: " in text and "Why degraded" in text and "By list size m" in text
    # every checked answer is in the breakdown, with its stage times
    answers = json.loads((out / "breakdown.json").read_text())
    assert answers["answers"] == stats[RERANK].requests
    assert sum(d["count"] for d in answers["degraded"].values()) == degraded
    assert all(d["stages_ms"]["total"]["p50"] is not None for d in answers["by_m"].values())


# ---------------------------------------------------------------- placement, breakdown


def test_placement_pins_the_service_to_one_core_and_the_rest_to_the_others() -> None:
    two = placement(True, [2, 5])
    assert two.service == {2} and two.load == {5}
    assert "service on cpu 2" in two.text and "cpu 5" in two.text
    many = placement(True, [0, 1, 2, 3])
    assert many.service == {0} and many.load == {1, 2, 3}
    for unpinned in (placement(False, [0, 1]), placement(True, [0])):
        assert unpinned.service is None and unpinned.load is None
        assert unpinned.text.startswith("not pinned")


def _timings(queue: float, cache: float, model: float, total: float) -> dict[str, float]:
    return {"queue_ms": queue, "cache_ms": cache, "encode_ms": model / 2,
            "decode_ms": model / 2, "total_ms": total}  # fmt: skip


def test_a_budget_miss_is_put_down_to_the_stage_that_took_most_of_it() -> None:
    assert culprit(_timings(8, 1, 1, 12)) == "queue"
    assert culprit(_timings(1, 8, 1, 12)) == "cache"
    assert culprit(_timings(1, 1, 8, 12)) == "model"
    assert culprit(_timings(1, 1, 1, 12)) == "other"  # parsing, the event loop, the answer


def test_the_breakdown_counts_reasons_stages_sizes_and_budgets() -> None:
    b = Breakdown()
    b.add(30, None, _timings(1, 1, 2, 5))
    b.add(30, "budget", _timings(1, 9, 1, 12), 10.0)
    b.add(200, "budget", _timings(1, 1, 9, 12), 10.0)
    b.add(200, "cache", _timings(1, 3, 0, 4), 20.0)
    b.add(200, None, {"queue_ms": "?"}, 100.0)  # malformed timings: counted, no times
    data = json.loads(json.dumps(b.to_json()))  # plain JSON
    assert data["answers"] == 5
    assert data["degraded"] == {"budget": {"count": 2, "by_culprit": {"cache": 1, "model": 1}},
                                "cache": {"count": 1, "by_culprit": {}}}  # fmt: skip
    assert data["by_m"]["30"]["answers"] == 2 and data["by_m"]["200"]["answers"] == 3
    assert data["by_m"]["200"]["degraded"] == {"budget": 1, "cache": 1}
    assert data["by_m"]["30"]["stages_ms"]["cache"]["p50"] == 5.0
    assert list(data["by_budget"]) == ["default", "10", "20", "100"]
    assert data["by_budget"]["10"]["degraded"] == 2
    assert data["by_budget"]["100"]["total_ms"]["p50"] is None
    text = "\n".join(markdown(data))
    assert "| budget | 2 | 40.00% | 0 / 1 / 1 / 0 |" in text
    assert "| 200 | 3 | 2 (66.7%) | 0 / 0 / 1 / 0 |" in text
    assert "| 10 | 2 | 2 (100.0%) |" in text
    assert markdown(Breakdown().to_json()) == []


# ---------------------------------------------------------------- what the benchmarks share


def test_counter_increases_and_batch_totals_read_the_services_own_exposition() -> None:
    from loadtest.driver import batch_totals

    metrics = Metrics()
    before, _ = metrics.render()
    metrics.decode_level.labels("n4").inc(3)
    metrics.decode_level.labels("beam3").inc()
    metrics.fallback_of["overload"].inc(2)
    for size in (4, 8):
        metrics.batch_size.observe(size)
    after, _ = metrics.render()
    b, a = before.decode(), after.decode()
    assert scrapes.increase(b, a, "rerank_decode_level_total", "level") == {"n4": 3, "beam3": 1}
    fallbacks = scrapes.increase(b, a, "rerank_fallback_total", "reason")
    assert fallbacks == {"budget": 0, "overload": 2, "cache": 0, "model": 0}
    assert batch_totals(b, a) == (12.0, 2.0)  # (requests, engine calls)
    assert batch_totals("", "") == (0.0, 0.0)


def test_placement_can_keep_the_load_to_some_of_the_other_cores() -> None:
    one = placement(True, [0, 1, 2, 3], load_cores=1, service="servers", load="load generator")
    assert one.service == {0} and one.load == {1}
    assert one.text == "servers on cpu 0; load generator on cpu 1"


def test_a_child_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    from loadtest.servers import Child, python_env, wait_ready

    argv = [sys.executable, "-c", "print('no bundle here'); raise SystemExit(3)"]
    child = Child("service", argv, python_env(), tmp_path / "service.log")
    child.proc.wait(30)
    with pytest.raises(LoadTestError, match=r"service exited \(3\):\nno bundle here"):
        child.check_alive()
    with pytest.raises(LoadTestError, match="no bundle here"):  # not a wait for the timeout
        wait_ready("http://127.0.0.1:9", child, timeout_s=60)
    child.stop()  # already gone: nothing to do


def test_skipped_redis_reads_are_not_l2_lookups() -> None:
    """L1 misses whose Redis read was skipped (not worth its round trip) went to the item
    tower: L2's hit ratio is over the reads made, and the report counts the skips."""
    skipped = AFTER + _lookups({("l2", "skipped"): 40}).split("\n", 1)[1]
    server = report.server_metrics(BEFORE, skipped)
    assert server["lookups"]["l2"] == {"hit": 50, "miss": 50, "skipped": 40}
    assert server["hit_ratio"]["l2"] == pytest.approx(0.5)
    assert server["served_from"]["l2"] == pytest.approx(0.05)
