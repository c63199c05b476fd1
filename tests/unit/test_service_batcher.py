"""The micro-batcher (service/rerank.py's Reranker) around a fake engine, in one event loop:
requests that queue while the engine is busy run together in one call, each gets its own
list back; an idle engine takes a request alone at once; past max_queue a request is
answered at once in upstream order ("overload"); a request whose deadline passes in the
queue gets the upstream order ("budget"); an engine failure degrades the whole batch
("model"), never an exception."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from service.api import Limits, Parsed
from service.cache import EmbeddingCache, L1Cache
from service.engine import RerankRequest, RerankResult, StageTimings
from service.metrics import Metrics
from service.policy import DecodeLevel, fixed
from service.request_reader import RequestReader
from service.rerank import BatchConfig, Outcome, Reranker
from tests.support.tiny import TINY_SCHEMA

D = 8  # the fake model's embedding width


class FakeEngine:
    """Ranks candidates by upstream score, best first (so every list is checkable), and
    records each call's batch size. While `hold` is set, a call waits for `release`."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.threads: list[str] = []  # the thread each call ran in
        self.hold = False
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail = False

    def rerank(
        self, requests: Sequence[RerankRequest], items_per_pass: int = 1, beam: int = 1
    ) -> list[RerankResult]:
        self.sizes.append(len(requests))
        self.threads.append(threading.current_thread().name)
        if self.hold:
            self.entered.set()
            assert self.release.wait(30)
        if self.fail:
            raise RuntimeError("engine down")
        out = []
        for r in requests:
            assert r.static is not None and r.static.shape == (len(r.upstream_score), D)
            order = np.argsort(-r.upstream_score, kind="stable")[: r.k]
            out.append(RerankResult(order=order, scores=r.upstream_score[order], passes=1,
                                    completed_early=False,
                                    timings=StageTimings(0.0, 0.0, 0.0)))  # fmt: skip
        return out

    def embed_items(self, item_id: np.ndarray, *_: np.ndarray) -> np.ndarray:
        return np.ones((len(item_id), D), np.float32)

    def bucket(self, m: int) -> int:
        """The engine's candidate buckets: 8, 16, 32."""
        return max(8, 1 << (m - 1).bit_length())


def parsed(seed: int, m: int = 6, k: int = 3) -> Parsed:
    rng = np.random.default_rng(seed)
    return Parsed(
        request_id=f"r{seed}",
        item_ids=rng.choice(10_000, m, replace=False).astype(np.int64),
        upstream_score=rng.standard_normal(m).astype(np.float32),
        item_cat=rng.integers(0, 5, (m, len(TINY_SCHEMA.item_categorical))),
        item_dense=rng.standard_normal((m, len(TINY_SCHEMA.item_dense))).astype(np.float32),
        user_id=1,
        user_dense=np.zeros(len(TINY_SCHEMA.user_dense), np.float32),
        k=k,
        budget_ms=None,
    )


def best_first(p: Parsed) -> list[int]:
    return p.item_ids[np.argsort(-p.upstream_score, kind="stable")[: p.k]].tolist()


def make_reranker(
    engine: FakeEngine, max_batch: int = 8, max_queue: int = 16, inline_batch: int = 0
) -> Reranker:
    metrics = Metrics()
    return Reranker(
        engine,  # type: ignore[arg-type]  # the fake has the methods the batcher calls
        RequestReader(TINY_SCHEMA, Limits(max_candidates=32, max_k=8)),
        EmbeddingCache(L1Cache(1 << 20, D), None, metrics),
        metrics,
        BatchConfig(max_batch=max_batch, max_queue=max_queue, inline_batch=inline_batch),
        fixed(DecodeLevel(1), budget_s=1.0),
    )


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_an_idle_engine_takes_a_request_alone_and_each_gets_its_own_list() -> None:
    async def main() -> list[Outcome | None]:
        engine = FakeEngine()
        reranker = make_reranker(engine)
        reranker.start()
        try:
            far = time.perf_counter() + 30
            return [await reranker.rerank(parsed(i), far) for i in range(3)]
        finally:
            await reranker.close()
            assert engine.sizes == [1, 1, 1]  # one at a time: never a wait for company

    for i, out in enumerate(run(main())):
        assert out is not None and not out.degraded and out.item_ids == best_first(parsed(i))


def test_a_small_batch_runs_on_the_event_loops_thread_a_bigger_one_in_the_engine_thread() -> None:
    """inline_batch 2: a request alone, and two that queued together, run on the loop's
    own thread (no hand-over to the engine thread and back); three together go to the
    engine thread (the loop stays free while a bigger batch runs)."""

    async def main(engine: FakeEngine) -> list[Outcome | None]:
        reranker = make_reranker(engine, inline_batch=2)
        reranker.start()
        try:
            far = time.perf_counter() + 30
            outs: list[Outcome | None] = []
            for n in (1, 2, 3):  # gathered: all queue before the batcher's next turn
                group = [parsed(10 * n + i) for i in range(n)]
                outs += await asyncio.gather(*(reranker.rerank(p, far) for p in group))
            return outs
        finally:
            await reranker.close()

    engine = FakeEngine()
    loop_thread = threading.current_thread().name  # asyncio.run's loop runs in this one
    outs = run(main(engine))
    assert engine.sizes == [1, 2, 3]
    assert engine.threads == [loop_thread, loop_thread, "engine"]
    seeds = [10, 20, 21, 30, 31, 32]
    for seed, out in zip(seeds, outs, strict=True):  # inline or not, each its own list
        assert out is not None and not out.degraded and out.item_ids == best_first(parsed(seed))


def test_no_batch_runs_on_the_loops_thread_while_a_redis_read_is_in_flight() -> None:
    """A request alone would run inline, but another request's cache lookup (its Redis
    read) is still waiting: the batch goes to the engine thread, so the loop stays free
    to read that reply before the read's deadline."""

    async def main(engine: FakeEngine) -> list[Outcome | None]:
        reranker = make_reranker(engine, inline_batch=2)
        lookup, reply = reranker.cache.lookup, asyncio.Event()

        async def slow_for_r99(ids: Any, budget_left_s: float, request_id: str = "") -> Any:
            if request_id == "r99":
                await reply.wait()  # a Redis read in flight
            return await lookup(ids, budget_left_s, request_id)

        reranker.cache.lookup = slow_for_r99  # type: ignore[method-assign]
        reranker.start()
        try:
            far = time.perf_counter() + 30
            waiting = asyncio.ensure_future(reranker.rerank(parsed(99), far, "r99"))
            await asyncio.sleep(0.01)  # r99 is in its lookup
            alone = await reranker.rerank(parsed(1), far, "r1")
            reply.set()
            return [alone, await waiting]
        finally:
            await reranker.close()

    engine = FakeEngine()
    outs = run(main(engine))
    assert engine.threads[0] == "engine"  # r1, while r99's read was in flight
    assert engine.threads[1] == threading.current_thread().name  # r99 then alone: inline
    for seed, out in zip([1, 99], outs, strict=True):
        assert out is not None and not out.degraded and out.item_ids == best_first(parsed(seed))


def queued_behind_a_busy_engine(
    engine: FakeEngine, requests: list[Parsed], deadlines: list[float] | None = None
) -> list[Outcome | None]:
    """requests[0] runs alone while the engine holds it; the rest queue meanwhile, then
    the engine is released. deadlines: seconds from now per request (default 30)."""

    async def main() -> list[Outcome | None]:
        reranker = make_reranker(engine, max_batch=8)
        reranker.start()
        try:
            now = time.perf_counter()
            due = [now + d for d in (deadlines or [30.0] * len(requests))]
            engine.hold = True
            first = asyncio.ensure_future(reranker.rerank(requests[0], due[0]))
            await until(engine.entered.is_set)  # the engine is busy with the first
            engine.hold = False
            rest = [asyncio.ensure_future(reranker.rerank(p, d))
                    for p, d in zip(requests[1:], due[1:], strict=True)]  # fmt: skip
            await until(lambda: reranker.queue.qsize() == len(rest))
            engine.release.set()
            return list(await asyncio.gather(first, *rest))
        finally:
            await reranker.close()

    return run(main())


def test_requests_that_queue_while_the_engine_is_busy_run_as_one_batch() -> None:
    engine = FakeEngine()
    outs = queued_behind_a_busy_engine(engine, [parsed(i) for i in range(4)])
    assert engine.sizes == [1, 3]
    for i, out in enumerate(outs):  # batched, yet each list is its own request's
        assert out is not None and not out.degraded and out.item_ids == best_first(parsed(i))
        assert out.queued and out.passes == 1


def test_a_batch_runs_one_engine_call_per_candidate_bucket_earliest_deadline_first() -> None:
    """Lists of 6 and of 20 candidates queued together: not one call padded to 32 for all,
    but one call per bucket (8 and 32), the bucket holding the earliest deadline first."""
    engine = FakeEngine()
    sizes = [6, 20, 6, 20, 5]
    requests = [parsed(i, m=m) for i, m in enumerate(sizes)]
    outs = queued_behind_a_busy_engine(engine, requests, [30, 30, 30, 29, 30])  # 3: earliest
    assert engine.sizes == [1, 2, 2]  # the 20s (one has the earliest deadline), then 6 and 5
    for i, out in enumerate(outs):
        assert out is not None and not out.degraded
        assert out.item_ids == best_first(parsed(i, m=sizes[i]))


def test_past_max_queue_a_request_is_answered_at_once_in_upstream_order() -> None:
    engine = FakeEngine()

    async def main() -> tuple[list[Outcome | None], Outcome | None]:
        reranker = make_reranker(engine, max_batch=1, max_queue=2)
        reranker.start()
        try:
            far = time.perf_counter() + 30
            engine.hold = True
            held = [asyncio.ensure_future(reranker.rerank(parsed(0), far))]
            await until(engine.entered.is_set)
            held += [asyncio.ensure_future(reranker.rerank(parsed(i), far)) for i in (1, 2)]
            await until(lambda: reranker.pending == 3)
            shed = await reranker.rerank(parsed(9), far)  # pending 3 > max_queue 2
            engine.hold = False
            engine.release.set()
            return list(await asyncio.gather(*held)), shed
        finally:
            await reranker.close()

    served, shed = run(main())
    assert shed is not None and shed.reason == "overload" and not shed.queued
    assert shed.item_ids == parsed(9).item_ids[:3].tolist()  # the upstream order, top k
    assert all(o is not None and not o.degraded for o in served)


def test_a_deadline_that_passes_in_the_queue_gets_the_upstream_order() -> None:
    engine = FakeEngine()

    async def main() -> Outcome | None:
        reranker = make_reranker(engine)
        reranker.start()
        try:
            engine.hold = True
            held = asyncio.ensure_future(reranker.rerank(parsed(0), time.perf_counter() + 30))
            await until(engine.entered.is_set)
            out = await reranker.rerank(parsed(1), time.perf_counter() + 0.05)
            engine.release.set()
            await held
            return out
        finally:
            await reranker.close()

    out = run(main())
    assert out is not None and out.reason == "budget" and out.queued
    assert out.item_ids == parsed(1).item_ids[:3].tolist()
    assert engine.sizes == [1]  # the expired request never reached the engine


@pytest.mark.parametrize("batch", [1, 3])
def test_an_engine_failure_degrades_the_batch_never_raises(batch: int) -> None:
    engine = FakeEngine()
    engine.fail = True

    async def main() -> list[Outcome | None]:
        reranker = make_reranker(engine)
        reranker.start()
        try:
            far = time.perf_counter() + 30
            return list(await asyncio.gather(*(reranker.rerank(parsed(i), far)
                                               for i in range(batch))))  # fmt: skip
        finally:
            await reranker.close()

    for i, out in enumerate(run(main())):
        assert out is not None and out.reason == "model"
        assert out.item_ids == parsed(i).item_ids[:3].tolist()
