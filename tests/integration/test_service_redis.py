"""The service with a real Redis as L2: published embeddings are hits, computed ones are
written back, and a Redis stopped mid-run costs no request (the breaker opens; on restart
a half-open probe closes it)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from export.publish import emb_key, publish_bundle
from model.network import GenReranker
from service.settings import Settings
from tests.support.bodies import make_request
from tests.support.redis_server import (
    RedisProcess,
)
from tests.support.server import ServerThread, wait_ready

pytestmark = pytest.mark.integration

COOLDOWN_S = 0.3


@pytest.fixture
def served(
    tiny_bundle: tuple[Path, GenReranker],
    redis_process: RedisProcess,
) -> Iterator[tuple[httpx.Client, RedisProcess, Path]]:
    path = tiny_bundle[0]
    publish_bundle(path, redis_process.url, prefix="t")
    settings = Settings(
        bundle=path,
        redis_url=redis_process.url,
        redis_prefix="t",
        redis_timeout_ms=100,
        breaker_failures=2,
        breaker_cooldown_s=COOLDOWN_S,
        warmup=False,
        default_budget_ms=30_000,  # a busy test machine must not degrade the lists
        decode_policy="fixed",
        # every lookup with misses reads Redis: these tests count its hits and its errors
        # (whether a read pays is measured, and tested, on its own below)
        redis_read="always",
    )
    srv = ServerThread(settings).start()
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        yield client, redis_process, path
    srv.stop()


def lookups(client: httpx.Client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rerank_embedding_lookups_total{"):
            labels, value = line.split("} ")
            tier = labels.split('tier="')[1].split('"')[0]
            result = labels.split('result="')[1].split('"')[0]
            out[f"{tier}/{result}"] = float(value)
    return out


def writebacks(client: httpx.Client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rerank_embedding_writebacks_total{"):
            labels, value = line.split("} ")
            out[labels.split('result="')[1].split('"')[0]] = float(value)
    return out


def rerank_ok(client: httpx.Client, body: dict[str, object]) -> dict[str, object]:
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    items = out["items"]
    assert isinstance(items, list) and len(items) == body["k"]
    return out


def test_published_hits_write_back_and_an_outage(
    served: tuple[httpx.Client, RedisProcess, Path],
) -> None:
    client, server, path = served
    rng = np.random.default_rng(0)
    table = np.load(path / "item_ids.npy")
    version = path.name

    # published items: L2 hits
    out = rerank_ok(client, make_request(rng, 30, 10, item_ids=table[:30]))
    assert not out["degraded"]
    assert lookups(client)["l2/hit"] == 30

    # new items: L2 misses, computed by the item tower and written back (float16)
    fresh = rng.choice(np.setdiff1d(np.arange(20_000), table), 20, replace=False)
    rerank_ok(client, make_request(rng, 20, 5, item_ids=fresh))
    assert lookups(client)["l3/hit"] == 20
    r = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    while r.get(emb_key("t", version, int(fresh[0]))) is None:
        assert time.monotonic() < deadline, "no write-back"
        time.sleep(0.02)
    assert len(r.get(emb_key("t", version, int(fresh[-1]))) or b"") in (32, 64)  # d=16: f2/f4
    r.close()

    # Redis stopped: every request still answers, from the item tower
    server.stop()
    errors_before = lookups(client)["l2/error"]
    for _ in range(5):
        ids = rng.choice(np.arange(100_000, 200_000), 30, replace=False)
        out = rerank_ok(client, make_request(rng, 30, 10, item_ids=ids))
        assert not out["degraded"], out  # L3 covers a dead cache: not degraded
    assert lookups(client)["l2/error"] > errors_before
    assert client.get("/readyz").json()["redis"] in ("open", "half_open")
    assert "rerank_redis_breaker_open 1.0" in client.get("/metrics").text

    # Redis back: after the cool-down, a probe closes the breaker; hits again
    server.start()
    time.sleep(COOLDOWN_S * 1.5)
    hits_before = lookups(client)["l2/hit"]
    deadline = time.monotonic() + 10
    while client.get("/readyz").json()["redis"] != "closed":
        assert time.monotonic() < deadline, "breaker did not close"
        publish_bundle(path, server.url, prefix="t")  # the restarted Redis is empty
        ids = rng.choice(table, 30, replace=False)
        rerank_ok(client, make_request(rng, 30, 10, item_ids=ids))
        time.sleep(COOLDOWN_S / 3)
    assert lookups(client)["l2/hit"] > hits_before


def test_a_hung_redis_costs_a_bounded_time(
    served: tuple[httpx.Client, RedisProcess, Path],
) -> None:
    client, server, _ = served
    rng = np.random.default_rng(1)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        for _ in range(4):
            ids = rng.choice(np.arange(300_000, 400_000), 30, replace=False)
            out = rerank_ok(client, make_request(rng, 30, 10, item_ids=ids, budget_ms=10_000))
            assert not out["degraded"]
            timings = out["timings"]
            assert isinstance(timings, dict)
            # the 100 ms timeout (+ the item tower on a busy machine), not a hang
            assert timings["cache_ms"] < 1_000
        assert client.get("/readyz").json()["redis"] == "open"
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_a_hung_redis_opens_the_breaker_for_short_budgets_too(
    served: tuple[httpx.Client, RedisProcess, Path],
) -> None:
    """Budgets below the per-call timeout (100 ms here): the Redis read gets at most half
    of the budget left, and its timeout still counts against the breaker, so a hung Redis
    stops costing every short-budget request its wait once the breaker opens."""
    client, server, _ = served
    rng = np.random.default_rng(2)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        waits = []
        for _ in range(6):
            ids = rng.choice(np.arange(400_000, 500_000), 30, replace=False)
            out = rerank_ok(client, make_request(rng, 30, 10, item_ids=ids, budget_ms=60))
            timings = out["timings"]
            assert isinstance(timings, dict)
            waits.append(timings["cache_ms"])
        assert client.get("/readyz").json()["redis"] == "open"
        assert "rerank_redis_breaker_open 1.0" in client.get("/metrics").text
        assert max(waits[:2]) >= 20  # ~30 ms: half of the 60 ms budget, on Redis
        assert max(waits[2:]) < 20, waits  # then the breaker: no wait on Redis
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_a_redis_cluster_url_works(
    tiny_bundle: tuple[Path, GenReranker],
    cluster_node: str,
) -> None:
    path = tiny_bundle[0]
    version = path.name
    table = np.load(path / "item_ids.npy")[:30]
    emb = np.load(path / "item_embeddings.npy")[:30].astype("<f2")
    cluster = redis.RedisCluster.from_url(cluster_node)
    cluster.mset_nonatomic({emb_key("c", version, int(i)): e.tobytes() for i, e in
                            zip(table, emb, strict=True)})  # fmt: skip
    settings = Settings(bundle=path, redis_url=cluster_node, redis_cluster=True,
                        redis_prefix="c", redis_timeout_ms=500, warmup=False,
                        default_budget_ms=30_000)  # fmt: skip
    srv = ServerThread(settings).start()
    rng = np.random.default_rng(3)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            wait_ready(client)
            out = rerank_ok(client, make_request(rng, 30, 10, item_ids=table))
            assert not out["degraded"] and lookups(client)["l2/hit"] == 30
            fresh = rng.choice(np.arange(500_000, 600_000), 20, replace=False)
            rerank_ok(client, make_request(rng, 20, 5, item_ids=fresh))
            deadline = time.monotonic() + 10
            keys = [emb_key("c", version, int(i)) for i in fresh]
            while None in cluster.mget_nonatomic(keys):
                assert time.monotonic() < deadline, "no write-back to the cluster"
                time.sleep(0.05)
            assert client.get("/readyz").json()["redis"] == "closed"
            # only 30 vectors were put there by hand: no publish, no meta key
            assert client.get("/readyz").json()["redis_published"] is False
    finally:
        srv.stop()
        cluster.close()


def test_readyz_says_whether_the_bundle_was_published(
    served: tuple[httpx.Client, RedisProcess, Path],
) -> None:
    client, _, _ = served
    deadline = time.monotonic() + 10
    while client.get("/readyz").json()["redis_published"] is None:  # checked in the background
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get("/readyz").json()["redis_published"] is True


def test_readyz_sees_a_redis_that_lost_the_published_embeddings(
    served: tuple[httpx.Client, RedisProcess, Path],
) -> None:
    """Redis restarted empty (here: flushed): redis_published turns false within the
    meta key's re-check, and true again once the bundle is published again."""
    from service.redis_l2 import META_CHECK_S

    client, server, path = served

    def wait_for(value: bool) -> None:
        deadline = time.monotonic() + 3 * META_CHECK_S + 5
        while client.get("/readyz").json()["redis_published"] is not value:
            assert time.monotonic() < deadline, f"redis_published never became {value}"
            time.sleep(0.1)

    wait_for(True)
    r = redis.Redis.from_url(server.url)
    r.flushall()
    r.close()
    wait_for(False)
    publish_bundle(path, server.url, prefix="t")
    wait_for(True)


def _published(r: redis.Redis, version: str, ids: np.ndarray) -> list[bytes | None]:
    return list(r.mget([emb_key("t", version, int(i)) for i in ids]))


def test_a_write_back_never_replaces_a_published_embedding(
    served: tuple[httpx.Client, RedisProcess, Path],
) -> None:
    """A Redis read that times out (Redis hung, the breaker still closed) sends published
    items to the item tower with the request's own features; those rows must not be
    written over the item table's vectors when Redis answers again."""
    client, server, path = served
    version, table = path.name, np.load(path / "item_ids.npy")[:30]
    r = redis.Redis.from_url(server.url)
    before = _published(r, version, table)
    assert None not in before
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:  # one timeout: the breaker (2 failures) stays closed, write-backs would go out
        out = rerank_ok(client, make_request(np.random.default_rng(5), 30, 10,
                                             item_ids=table, budget_ms=10_000))  # fmt: skip
        assert lookups(client)["l2/error"] == 30 and lookups(client)["l3/hit"] == 30
        assert not out["degraded"]
    finally:
        server.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)  # past the write-back's own timeout: anything queued has been sent
    assert _published(r, version, table) == before
    # not even tried (a write-back that failed on the hung Redis would count as an error)
    assert writebacks(client) == {"ok": 0.0, "error": 0.0, "dropped": 0.0}
    r.close()


def test_write_backs_set_only_new_keys_and_expire(redis_process: RedisProcess) -> None:
    from service.metrics import Metrics
    from service.redis_l2 import CircuitBreaker, RedisConfig, RedisL2

    r = redis.Redis.from_url(redis_process.url)
    r.set("nx:emb:v1:1", b"published")
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)

    async def write() -> None:
        config = RedisConfig(redis_process.url, "nx", 0.5, 16, writeback_ttl_s=60)
        l2 = RedisL2(config, "v1", 4, CircuitBreaker(3, 1.0), Metrics())
        l2.start()
        l2.enqueue([1, 2], rows)
        deadline = time.monotonic() + 10
        while r.get("nx:emb:v1:2") is None:
            assert time.monotonic() < deadline, "no write-back"
            await asyncio.sleep(0.02)
        await l2.close()

    asyncio.run(write())
    assert r.get("nx:emb:v1:1") == b"published" and r.ttl("nx:emb:v1:1") == -1  # untouched
    assert np.array_equal(np.frombuffer(r.get("nx:emb:v1:2") or b"", "<f2"), rows[1])
    assert 0 < r.ttl("nx:emb:v1:2") <= 60
    r.close()


def test_a_redis_value_that_is_not_finite_or_not_this_size_is_a_miss(
    served: tuple[httpx.Client, RedisProcess, Path],
) -> None:
    client, server, path = served
    version, table = path.name, np.load(path / "item_ids.npy")[:30]
    r = redis.Redis.from_url(server.url)
    d = len(r.get(emb_key("t", version, int(table[0]))) or b"") // 2  # published as float16
    r.set(emb_key("t", version, int(table[0])), np.full(d, np.nan, "<f2").tobytes())
    r.set(emb_key("t", version, int(table[1])), b"\x00" * (3 * d))  # neither f2 nor f4
    r.close()
    out = rerank_ok(client, make_request(np.random.default_rng(6), 30, 10, item_ids=table))
    assert not out["degraded"], out
    counts = lookups(client)
    assert counts["l2/hit"] == 28 and counts["l3/hit"] == 2, counts


def test_published_embeddings_of_another_dim_switch_l2_off(
    tiny_bundle: tuple[Path, GenReranker],
    redis_process: RedisProcess,
) -> None:
    """A meta key naming another dimension: values of another width could still decode
    (float16 at 2d reads as float32 at d) into garbage, so no L2 reads and no write-backs."""
    path = tiny_bundle[0]
    version, table = path.name, np.load(path / "item_ids.npy")[:30]
    publish_bundle(path, redis_process.url, prefix="w")
    r = redis.Redis.from_url(redis_process.url)
    meta = json.loads(r.get(emb_key("w", version, "__meta__")) or b"{}")
    r.set(emb_key("w", version, "__meta__"), json.dumps({**meta, "dim": meta["dim"] * 2}))
    settings = Settings(bundle=path, redis_url=redis_process.url, redis_prefix="w",
                        redis_timeout_ms=100, warmup=False, default_budget_ms=30_000,
                        decode_policy="fixed")  # fmt: skip
    srv = ServerThread(settings).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            wait_ready(client)
            deadline = time.monotonic() + 10
            while not srv.app.state.runtime.cache.l2.refused:  # checked in the background
                assert time.monotonic() < deadline, "meta mismatch not noticed"
                time.sleep(0.02)
            assert client.get("/readyz").json()["redis_published"] is False
            fresh = np.arange(700_000, 700_020)
            for ids in (table, fresh):
                out = rerank_ok(client, make_request(np.random.default_rng(7), 20, 5,
                                                     item_ids=ids))  # fmt: skip
                assert not out["degraded"]
            counts = lookups(client)
            assert counts["l2/hit"] == 0 and counts["l2/error"] == 40, counts
            time.sleep(0.3)
            assert r.get(emb_key("w", version, int(fresh[0]))) is None  # no write-back
    finally:
        srv.stop()
        r.close()


def test_the_l2_client_parses_replies_in_c(redis_process: RedisProcess) -> None:
    """hiredis is a dependency and redis-py picks it: an MGET's reply is parsed in C, not
    in Python on the event loop (which made Redis slower than no Redis at all)."""
    from service.metrics import Metrics
    from service.redis_l2 import CircuitBreaker, RedisConfig, RedisL2

    async def parser_of_a_read() -> str:
        l2 = RedisL2(RedisConfig(redis_process.url, "hp", 0.5, 16), "v1", 4,
                     CircuitBreaker(3, 1.0), Metrics())  # fmt: skip
        try:
            assert await l2.mget([1, 2], 1.0) == [None, None]
            connection = await l2.client.connection_pool.get_connection()
            name = type(connection._parser).__name__
            await l2.client.connection_pool.release(connection)
            return name
        finally:
            await l2.client.aclose()

    assert asyncio.run(parser_of_a_read()) == "_AsyncHiredisParser"


# ---------------------------------------------------------------- the packed commands


def _l2(url: str, prefix: str, dim: int, ttl_s: int = 0) -> Any:
    from service.metrics import Metrics
    from service.redis_l2 import CircuitBreaker, RedisConfig, RedisL2

    config = RedisConfig(url, prefix, 0.5, 64, writeback_ttl_s=ttl_s)
    return RedisL2(config, "v1", dim, CircuitBreaker(100, 1.0), Metrics())


def test_packed_mget_and_set_nx_are_the_commands_redis_py_sends(
    redis_process: RedisProcess,
) -> None:
    """The hand-packed MGET reads what redis-py's mget reads (any int64 id, a non-ASCII
    prefix, missing keys), and the packed SET NX pipeline writes what redis-py's
    set(nx=True, ex=ttl) would: new keys with the expiry, existing ones untouched."""
    from service.redis_l2 import pack_mget, pack_set_nx

    assert pack_mget(b"p:", [1, -2]) == b"*3\r\n$4\r\nMGET\r\n$3\r\np:1\r\n$4\r\np:-2\r\n"
    one = np.array([[1.0, 2.0]], "<f2")
    assert pack_set_nx(b"p:", [7], one, 60) == (
        b"*6\r\n$3\r\nSET\r\n$3\r\np:7\r\n$4\r\n" + one.tobytes() + b"\r\n$2\r\nNX\r\n"
        b"$2\r\nEX\r\n$2\r\n60\r\n"
    )
    r = redis.Redis.from_url(redis_process.url)
    prefix, dim = "pé", 4
    ids = [0, 1, -5, 2**63 - 1, 123_456_789_012]
    rows = np.arange(len(ids) * dim, dtype=np.float32).reshape(len(ids), dim)
    r.set(f"{prefix}:emb:v1:{ids[0]}", b"published")

    async def roundtrip() -> tuple[list[bytes | None] | None, list[bytes | None] | None]:
        l2 = _l2(redis_process.url, prefix, dim, ttl_s=60)
        l2.start()
        try:
            before = await l2.mget(ids, 1.0)
            l2.enqueue(ids, rows)
            deadline = time.monotonic() + 10
            while r.get(f"{prefix}:emb:v1:{ids[-1]}") is None:
                assert time.monotonic() < deadline, "no write-back"
                await asyncio.sleep(0.02)
            return before, await l2.mget([*ids, 999], 1.0)
        finally:
            await l2.close()

    before, after = asyncio.run(roundtrip())
    assert before == [b"published", None, None, None, None]
    assert after == r.mget([f"{prefix}:emb:v1:{i}" for i in [*ids, 999]])
    assert after is not None and after[0] == b"published" and after[-1] is None
    assert r.ttl(f"{prefix}:emb:v1:{ids[0]}") == -1  # NX: the published key is untouched
    for i, row in zip(ids[1:], rows[1:], strict=True):
        assert np.array_equal(np.frombuffer(r.get(f"{prefix}:emb:v1:{i}") or b"", "<f2"), row)
        assert 0 < r.ttl(f"{prefix}:emb:v1:{i}") <= 60
    r.close()


def test_decode_many_reads_float16_and_float32_and_skips_the_rest(
    redis_process: RedisProcess,
) -> None:
    dim = 3
    l2 = _l2(redis_process.url, "dm", dim)
    a, b, c = (np.array([1.5, -2.0, 3.25], "<f4") * k for k in (1, 2, 3))
    values = [a.astype("<f2").tobytes(), None, b.tobytes(), b"\x00" * 5,
              c.astype("<f2").tobytes()]  # fmt: skip
    at, block = l2.decode_many(values)
    assert at == [0, 4, 2] and block.dtype == np.float32
    assert np.array_equal(block, np.stack([a, c, b]))
    at, block = l2.decode_many([a.astype("<f2").tobytes()] * 2)  # all float16: one join
    assert at == [0, 1] and np.array_equal(block, np.stack([a, a]))
    at, block = l2.decode_many([None, None])
    assert at == [] and block.shape == (0, dim)


def test_an_exchange_cut_short_leaves_no_reply_behind(redis_process: RedisProcess) -> None:
    """A pipeline answered with an error halfway (Redis out of memory) and an MGET that
    timed out (Redis hung) close their connection: the next call on the pool reads its
    own replies, not the ones left on the wire."""
    from service.redis_l2 import pack_set_nx

    r = redis.Redis.from_url(redis_process.url)
    dim = 2
    for i in range(10):
        r.set(f"cs:emb:v1:{i}", np.full(dim, i, "<f2").tobytes())
    rows = np.ones((40, dim), np.float32)

    async def run() -> None:
        l2 = _l2(redis_process.url, "cs", dim)
        l2.start()
        try:
            r.config_set("maxmemory", 1)  # every SET: an OOM error reply
            l2.enqueue(list(range(100, 140)), rows)
            deadline = time.monotonic() + 10
            while l2.metrics.writebacks.labels("error")._value.get() < 40:
                assert time.monotonic() < deadline, "the write-back did not fail"
                await asyncio.sleep(0.02)
            # the connection of an exchange cut short is closed before it is pooled again
            # (redis-py's pool also drops one with data waiting, but not one whose
            # replies are still on the way)
            with pytest.raises(redis.exceptions.ResponseError):
                await l2._exchange(pack_set_nx(l2._base, [200, 201], rows[:2], None), 2)
            assert not l2.client.connection_pool._available_connections[-1].is_connected
            r.config_set("maxmemory", 0)
            got = await l2.mget([3, 4], 1.0)
            assert got == [np.full(dim, 3, "<f2").tobytes(), np.full(dim, 4, "<f2").tobytes()]
            assert redis_process.proc is not None
            redis_process.proc.send_signal(signal.SIGSTOP)
            try:
                assert await l2.mget([1], 0.01) is None  # timed out, its reply still due
            finally:
                redis_process.proc.send_signal(signal.SIGCONT)
            for i in (7, 8, 9):
                assert await l2.mget([i], 1.0) == [np.full(dim, i, "<f2").tobytes()]
        finally:
            await l2.close()

    asyncio.run(run())
    r.close()


def test_an_mget_starts_no_task(redis_process: RedisProcess) -> None:
    """A request's MGET runs in the request's own task: no Task to bound the send or the
    wait (each is one more turn of a busy event loop before the command even leaves)."""

    async def tasks_per_mget() -> int:
        l2 = _l2(redis_process.url, "nt", 2)
        loop = asyncio.get_running_loop()
        started = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            started.append(coro)
            return asyncio.Task(coro, loop=loop, **kw)

        try:
            await l2.mget([1, 2], 1.0)  # connected
            loop.set_task_factory(factory)
            for _ in range(5):
                assert await l2.mget([1, 2], 1.0) == [None, None]
            return len(started)
        finally:
            loop.set_task_factory(None)
            await l2.client.aclose()

    assert asyncio.run(tasks_per_mget()) == 0


def test_a_read_that_does_not_pay_is_skipped_and_one_that_does_is_made(
    redis_process: RedisProcess,
) -> None:
    """The cache with its read gate, on a real Redis: while reads find nothing and the
    item tower is cheap, a lookup with misses sends no MGET (counted `skipped`, the rows
    left to the tower, no Redis error); published rows, found by a probe, open the gate
    again and are read."""
    from service.cache import EmbeddingCache, L1Cache, ReadGate
    from service.metrics import Metrics

    dim, r = 4, redis.Redis.from_url(redis_process.url)
    calls = lambda: int(r.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))  # noqa: E731

    async def main() -> tuple[list[int], list[bool]]:
        l2 = _l2(redis_process.url, "gate", dim)
        gate = ReadGate(probe_every=4)
        cache = EmbeddingCache(L1Cache(0, dim), l2, Metrics(), gate)  # L1 off: every id misses
        try:
            sent, missing = [], []
            lookup = await cache.lookup([1, 2, 3], 1.0)  # nothing measured: read, nothing found
            sent.append(calls())
            cache.tower(1e-6, rows=3)  # a tower far cheaper than any round trip
            for _ in range(3):
                lookup = await cache.lookup([1, 2, 3], 1.0)  # skipped
                sent.append(calls())
            for i in (1, 2, 3):  # now published
                r.set(f"gate:emb:v1:{i}", np.full(dim, i, "<f2").tobytes())
            lookup = await cache.lookup([1, 2, 3], 1.0)  # the probe: found, read
            sent.append(calls())
            missing.append(bool(lookup.missing.any()))
            gate.tower(1.0, rows=1)  # the tower is dear after all: every read pays
            lookup = await cache.lookup([1, 2, 3], 1.0)
            sent.append(calls())
            missing.append(bool(lookup.missing.any()))
            return sent, missing
        finally:
            await l2.close()

    base = calls()
    sent, missing = asyncio.run(main())
    assert [n - base for n in sent] == [1, 1, 1, 1, 2, 3]
    assert missing == [False, False]
    r.close()
