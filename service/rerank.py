"""One rerank request from checked arrays to a response: budget, cache, engine, fallback.

    arrival ── L1 ── L2 (one MGET, bounded by the budget left) ── queue for the engine
           ── [engine thread] L3 item tower for the misses ── encode ── decode (deadline)
           ── response; computed embeddings back to L1 / the Redis write-back queue

The engine runs in one worker thread, fed by one owned batcher task: whatever requests
queued while the engine was busy go in together (at most max_batch; no waiting when the
engine is idle), one item-tower run for all their cache misses, one encode, one decode
loop. The event loop keeps accepting, parsing and looking up meanwhile. A batch of at
most `inline_batch` requests (low load) runs on the event loop's thread instead: on the
one core a worker has, the hand-over to the engine thread and back costs more than it
saves (Reranker._batches). Each request
keeps its own deadline inside the batch (the engine completes only the rows that would
overrun). Whatever goes wrong after validation, the client gets
the upstream order, marked degraded with the reason, never an error.

One idea, kept in one module at its size: a request's way from its checked arrays to its
outcome, with the micro-batcher and the engine thread that carry it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.api import Parsed, finite
from service.cache import EmbeddingCache, Lookup
from service.engine import Engine, RerankRequest, RerankResult
from service.logs import RateLimit
from service.metrics import Metrics
from service.policy import DecodePolicy
from service.request_reader import RequestReader
from service.tasks import stop

log = logging.getLogger(__name__)
# one line per request that went wrong, rate-limited (a flood does not flood the log)
problem_log = logging.getLogger(__name__ + ".problems")
problem_log.addFilter(RateLimit())

WATCH_AFTER_S = 0.002  # a queued request's client is watched for hang-ups after this


@dataclass(frozen=True)
class BatchConfig:
    """How requests share the engine."""

    max_batch: int  # requests per engine call
    max_queue: int  # requests waiting beyond this: answered at once, "overload"
    # when the engine was busy until just now (a batch ended less than this ago), wait
    # up to this long for more requests before the next call; an idle engine never waits
    max_wait_s: float = 0.0
    # a batch of at most this many requests runs on the event loop's own thread, not the
    # engine thread (0: never): see Reranker._batches
    inline_batch: int = 0
    # nice increment of the engine thread (0: the process's): see EngineThread
    engine_nice: int = 0


@dataclass
class Outcome:
    """What the handler sends back (before JSON)."""

    item_ids: list[int | str]  # as the caller sent them
    scores: list[float]
    passes: int
    reason: str | None  # None: the model's list
    queue_s: float = 0.0
    cache_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    # the stages it reached (a shed request's are not observed as 0 s in the histograms)
    looked_up: bool = False
    queued: bool = False

    @property
    def degraded(self) -> bool:
        return self.reason is not None


def upstream(p: Parsed, reason: str) -> Outcome:
    """The candidates' given order, top k: what a request gets when the model cannot run."""
    return Outcome(
        item_ids=p.answer_ids(slice(0, p.k)),
        scores=p.upstream_score[: p.k].tolist(),
        passes=0,
        reason=reason,
    )


@dataclass
class _Job:
    """One request waiting for the engine."""

    parsed: Parsed
    static: np.ndarray  # (m, d) float32, cache rows filled
    missing: np.ndarray  # (m,) bool: rows for the item tower
    deadline: float
    submitted: float
    done: asyncio.Future[_Done]
    request_id: str
    started: bool = False  # the engine thread took it (its own deadline rules from here)
    expired: bool = False  # its deadline passed while it queued: answered upstream
    gone: bool = False  # its client hung up while it queued: dropped


@dataclass
class _Done:
    result: RerankResult | None
    reason: str | None  # why result is None
    queue_s: float
    embed_s: float
    embedded: np.ndarray | None  # (missing rows, d)


class Reranker:
    """Budget, cache and the batched engine; `start` / `close` own the batcher task."""

    def __init__(
        self,
        engine: Engine,
        reader: RequestReader,
        cache: EmbeddingCache,
        metrics: Metrics,
        config: BatchConfig,
        policy: DecodePolicy,
    ) -> None:
        self.engine, self.reader, self.cache, self.metrics = engine, reader, cache, metrics
        self.config, self.policy = config, policy
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()  # bounded by max_queue below
        self.pending = 0  # requests queued or in the engine (event loop only)
        self.active = 0  # requests anywhere in rerank(), Redis included: a retired
        # reranker (bundle swap) is closed only once this is 0
        self.closed = False
        self._task: asyncio.Task[None] | None = None
        self._l3 = {r: metrics.lookups.labels("l3", r) for r in ("hit", "error")}

    def start(self) -> None:
        self._thread = EngineThread(self.config.engine_nice)
        self._task = asyncio.create_task(self._batches(), name="engine-batcher")
        self._task.add_done_callback(_log_crash)

    async def close(self) -> None:
        """Stop the batcher and the engine thread. Requests still queued (a retire that
        timed out waiting for them) are answered in upstream order, reason `model`, at
        once, not left to wait out their budgets on a queue nobody reads."""
        self.closed = True
        if self._task is not None:
            if not await stop(self._task):
                log.error("the engine batcher did not stop")
            self._thread.stop()  # it ends after the batch it may be running
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.done.done():
                job.done.set_result(_Done(None, "model", 0.0, 0.0, None))

    async def rerank(
        self,
        p: Parsed,
        deadline: float,
        request_id: str = "",
        gone: Callable[[], Awaitable[Any]] | None = None,
    ) -> Outcome | None:
        """The outcome of one request; None when its client went away (`gone`, the ASGI
        receive: it returns once the client disconnects) before the engine ran it."""
        self.active += 1
        try:
            return await self._rerank(p, deadline, request_id, gone)
        finally:
            self.active -= 1

    async def _rerank(
        self,
        p: Parsed,
        deadline: float,
        request_id: str,
        gone: Callable[[], Awaitable[Any]] | None,
    ) -> Outcome | None:
        """Shed before the lookup, look the candidates up (L1, L2), shed again when the
        lookup spent the budget or the queue grew meanwhile, wait for the engine, answer."""
        if self.closed:  # retired under a request that outlived the retire's wait
            return upstream(p, "model")
        if time.perf_counter() >= deadline:
            return upstream(p, "budget")
        if self.pending > self.config.max_queue:  # shed before spending a cache lookup on it
            self.policy.pressure()
            return upstream(p, "overload")
        ids = p.item_ids.tolist()
        t0 = time.perf_counter()
        lookup = await self.cache.lookup(ids, deadline - t0, request_id)
        cache_s = time.perf_counter() - t0
        if time.perf_counter() >= deadline or self.pending > self.config.max_queue:
            return self._shed_after_lookup(p, deadline, cache_s)
        done = await self._engine_answer(p, lookup, deadline, request_id, gone, cache_s)
        if not isinstance(done, _Done):  # answered while it queued, or its client went away
            return done
        return self._answer(p, ids, lookup, done, cache_s)

    def _shed_after_lookup(self, p: Parsed, deadline: float, cache_s: float) -> Outcome:
        """The upstream order for a request whose lookup ran past its deadline ("budget")
        or left it behind too long a queue ("overload"); the policy hears which."""
        expired = time.perf_counter() >= deadline
        out = upstream(p, "budget" if expired else "overload")
        out.cache_s, out.looked_up = cache_s, True
        if expired:
            self.policy.late(cache_s)
        else:
            self.policy.pressure()
        return out

    async def _engine_answer(
        self,
        p: Parsed,
        lookup: Lookup,
        deadline: float,
        request_id: str,
        gone: Callable[[], Awaitable[Any]] | None,
        cache_s: float,
    ) -> _Done | Outcome | None:
        """Queue the request for the batcher and wait for its engine answer (_Done); the
        upstream order (an Outcome) when its deadline passes while it queues, None when
        its client hangs up first."""
        job = _Job(p, lookup.static, lookup.missing, deadline, time.perf_counter(),
                   asyncio.get_running_loop().create_future(), request_id)  # fmt: skip
        self.pending += 1
        loop = asyncio.get_running_loop()
        # the budget bounds the wait too: a request still queued at its deadline is
        # answered at once in upstream order (once the engine has it, the engine's own
        # per-request deadline completes its list early instead)
        timer = loop.call_later(max(deadline - time.perf_counter(), 0.0), _expire, job)
        # a hang-up is watched for only once the request has queued a while: a task per
        # request costs more CPU than the engine work it could save on a short wait
        watch: list[asyncio.Future[None]] = []
        starter = None if gone is None else loop.call_later(WATCH_AFTER_S, _start_watch,
                                                            gone, job, watch)  # fmt: skip
        try:
            self.queue.put_nowait(job)
            try:
                return await job.done
            except asyncio.CancelledError:
                if not job.done.cancelled() or _cancelling():
                    raise  # this task itself is being cancelled
                if job.gone:
                    return None
                out = upstream(p, "budget")
                out.queue_s, out.cache_s = time.perf_counter() - job.submitted, cache_s
                self.policy.late(out.queue_s + cache_s)
                out.queued = out.looked_up = True
                return out
        finally:
            self.pending -= 1
            timer.cancel()
            if starter is not None:
                starter.cancel()
            for w in watch:
                w.cancel()

    def _answer(
        self, p: Parsed, ids: list[int], lookup: Lookup, done: _Done, cache_s: float
    ) -> Outcome:
        """The engine's answer as an Outcome; the rows the item tower computed go to the
        cache (L1, and Redis unless the lookup's Redis read failed)."""
        if done.embedded is not None:
            rows = np.flatnonzero(lookup.missing)
            # after a failed Redis read these items may well be in Redis (published from
            # the item table): only L1 gets the request-made rows then, never an overwrite
            self.cache.store([ids[i] for i in rows], done.embedded, not lookup.l2_error)
            self._l3["hit"].inc(len(rows))
        elif done.reason == "cache":
            self._l3["error"].inc(int(lookup.missing.sum()))
        if done.result is None:
            out = upstream(p, done.reason or "model")
        else:
            r = done.result
            out = Outcome(
                item_ids=p.answer_ids(r.order),
                scores=[finite(s) for s in r.scores.tolist()],
                passes=r.passes,
                reason="budget" if r.completed_early else None,
                encode_s=r.timings.encode_s,
                decode_s=r.timings.decode_s,
            )
        out.queue_s, out.cache_s = done.queue_s, cache_s + done.embed_s
        out.queued = out.looked_up = True
        return out

    async def _batches(self) -> None:
        """The owned loop: take what is queued (>= 1 job), run it in the engine thread
        (or inline, `_run_batch`), hand each job its result."""
        loop, last_end = asyncio.get_running_loop(), -1e9
        while True:
            jobs = await self._next_batch(loop, last_end)
            if not jobs:
                continue
            results = await self._run_batch(jobs, self.queue.qsize())
            last_end = loop.time()
            for job, done in zip(jobs, results, strict=True):
                if not job.done.done():
                    job.done.set_result(done)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop, last_end: float) -> list[_Job]:
        """The next batch's live jobs (not expired, client not gone; the gone ones
        counted): at least one taken, then whatever queued, at most max_batch. When the
        engine was busy until just now (its last batch ended at `last_end`, loop time, less
        than max_wait_s ago), it waits max_wait_s first for more: a bigger batch costs less
        CPU per request."""
        wait = self.config.max_wait_s
        jobs = [await self.queue.get()]
        busy = loop.time() - last_end < wait
        if wait > 0 and busy and self.queue.qsize() + 1 < self.config.max_batch:
            await asyncio.sleep(wait)
        while len(jobs) < self.config.max_batch and not self.queue.empty():
            jobs.append(self.queue.get_nowait())
        live = [j for j in jobs if not j.done.done()]
        if len(live) < len(jobs):
            gone = sum(j.gone for j in jobs)
            if gone:
                self.metrics.dropped.inc(gone)
        return live

    async def _run_batch(self, jobs: list[_Job], waiting: int) -> list[_Done]:
        """One batch's results; a failed batch answers each job "model" (never a request
        left waiting); a cancelled one (the reranker closed) answers them, then raises."""
        try:
            # inline only while no request waits on Redis: a loop held by the engine
            # does not read the reply, and the read's deadline would fire first
            if len(jobs) <= self.config.inline_batch and self.active == self.pending:
                # A small batch runs right here, on the event loop's thread. The
                # service has one core: the engine thread never runs beside the loop,
                # only in turn with it, and each batch handed over costs two thread
                # wake-ups (the engine thread's, then the loop's for the result) and a
                # GIL hand-off each way; on a busy core each wake-up can wait out
                # another process's time slice, longer than a small batch's engine
                # call. The loop's other work waits for it, as it would for the core.
                # Bigger batches (load) still go to the thread, so that the loop keeps
                # reading, and shedding at the door, while they run, and so does any
                # batch while a request's Redis read is in flight.
                return self._run(jobs, waiting)
            return await self._thread.run(self._run, jobs, waiting)
        except asyncio.CancelledError:  # closed mid-batch: nobody will read its result
            for job in jobs:
                if not job.done.done():
                    job.done.set_result(_Done(None, "model", 0.0, 0.0, None))
            raise
        except Exception:  # never leave a request waiting forever
            log.exception("engine batch failed: requests %s", [j.request_id for j in jobs])
            return [_Done(None, "model", 0.0, 0.0, None) for _ in jobs]

    def _run(self, jobs: list[_Job], waiting: int) -> list[_Done]:
        """In the engine thread (or the loop's, for a small batch): one item-tower run for
        every miss, then one engine call per candidate bucket (`_groups`, `_decode`)."""
        start = time.perf_counter()
        queue_s = [start - j.submitted for j in jobs]
        out: list[_Done | None] = [None] * len(jobs)
        for i, j in enumerate(jobs):
            j.started = True
            if start >= j.deadline or j.done.done():  # expired (or gone) on the way here
                out[i] = _Done(None, "budget", queue_s[i], 0.0, None)
        embedded = self._embed([j for i, j in enumerate(jobs) if out[i] is None])
        embed_s = time.perf_counter() - start
        for i, j in enumerate(jobs):
            if out[i] is None and j.missing.any() and id(j) not in embedded:
                out[i] = _Done(None, "cache", queue_s[i], embed_s, None)
        run = [i for i in range(len(jobs)) if out[i] is None]
        for group in self._groups(jobs, run):
            results, reason = self._decode(jobs, group, waiting, queue_s)
            for i, result in zip(group, results, strict=True):
                if result is not None and not result.valid:
                    problem_log.warning(
                        "request %s: the model's scores were not finite (extreme feature "
                        "values?): upstream order",
                        jobs[i].request_id,
                    )
                    out[i] = _Done(None, "model", queue_s[i], embed_s, None)  # nothing cached
                    continue
                out[i] = _Done(result, reason, queue_s[i], embed_s, embedded.get(id(jobs[i])))
        return [o if o is not None else _Done(None, "model", 0.0, 0.0, None) for o in out]

    def _groups(self, jobs: list[_Job], run: list[int]) -> list[list[int]]:
        """The jobs `run` as engine calls, one per candidate bucket, earliest deadline
        first: a batch pads every list to its longest one's bucket, and the encoder's cost
        grows with B x M (its attention with M^2), so three lists of 30 riding with one of
        200 would each cost as much as that one."""
        groups: dict[int, list[int]] = {}
        for i in run:
            try:
                bucket = self.engine.bucket(len(jobs[i].parsed.upstream_score))
            except ValueError:  # more than the model takes: its call fails alone
                bucket = -1
            groups.setdefault(bucket, []).append(i)
        return sorted(groups.values(), key=lambda g: min(jobs[i].deadline for i in g))

    def _decode(
        self, jobs: list[_Job], group: list[int], waiting: int, queue_s: list[float]
    ) -> tuple[list[RerankResult | None], str | None]:
        """One engine call over `group`, at the level the policy picks for the load, the
        call's tightest budget and its list size; None results and reason `model` when the
        engine fails (a degraded answer, never a 500)."""
        requests = [
            RerankRequest(
                upstream_score=jobs[i].parsed.upstream_score,
                user_id=jobs[i].parsed.user_id,
                user_dense=jobs[i].parsed.user_dense,
                k=jobs[i].parsed.k,
                static=jobs[i].static,
                deadline=jobs[i].deadline,
            )
            for i in group
        ]
        tightest = min(r.deadline for r in requests if r.deadline is not None)
        longest = max(r.m for r in requests)
        level = self.policy.choose(waiting, tightest - time.perf_counter(), longest)
        t0 = time.perf_counter()
        try:
            results = self.engine.rerank(
                requests, items_per_pass=level.items_per_pass, beam=level.beam
            )
        except Exception:
            log.exception("engine failed: requests %s", [jobs[i].request_id for i in group])
            return [None] * len(group), "model"
        self.metrics.batch_size.observe(len(group))
        self.policy.observe(max(queue_s[i] for i in group), time.perf_counter() - t0, level,
                            longest)  # fmt: skip
        self.metrics.decode_level.labels(level.name).inc(len(group))
        return list(results), None

    def _embed(self, jobs: list[_Job]) -> dict[int, np.ndarray]:
        """L3: the item tower over every job's missing rows in one run; fills job.static.
        -> id(job) -> its computed rows (absent for every job when the tower failed)."""
        todo = [(j, np.flatnonzero(j.missing)) for j in jobs if j.missing.any()]
        if not todo:
            return {}
        try:
            t0 = time.perf_counter()
            parts = [self.reader.hashed(j.parsed, rows) for j, rows in todo]
            emb = self.engine.embed_items(*(np.concatenate(x) for x in zip(*parts, strict=True)))
            self.cache.tower(time.perf_counter() - t0, len(emb))
        except Exception:  # an item-tower failure degrades these requests, never a 500
            log.exception("item tower failed: requests %s", [j.request_id for j, _ in todo])
            return {}
        out, at = {}, 0
        finite_rows = np.isfinite(emb).all(axis=1)
        for j, rows in todo:
            part = slice(at, at + len(rows))
            at += len(rows)
            if not finite_rows[part].all():  # never cached; the job degrades ("cache")
                problem_log.warning("request %s: the item tower gave non-finite embeddings "
                                    "(extreme feature values?)", j.request_id)  # fmt: skip
                continue
            j.static[rows] = emb[part]
            out[id(j)] = emb[part]
        return out


def _start_watch(
    gone: Callable[[], Awaitable[Any]], job: _Job, watch: list[asyncio.Future[None]]
) -> None:
    """A job still waiting WATCH_AFTER_S after it queued: watch its client from now on."""
    if not job.started and not job.done.done():
        watch.append(asyncio.ensure_future(_watch(gone, job)))


async def _watch(gone: Callable[[], Awaitable[Any]], job: _Job) -> None:
    """Cancel the job's place in the queue if its client disconnects first."""
    message = await gone()  # after the body, the next ASGI message is the disconnect
    if message.get("type") == "http.disconnect" and not job.started and not job.done.done():
        job.gone = True
        job.done.cancel()


def _expire(job: _Job) -> None:
    """The deadline of a job still waiting for the engine: stop waiting."""
    if not job.started and not job.done.done():
        job.expired = True
        job.done.cancel()


def _cancelling() -> bool:
    """Is the current task itself being cancelled (not just the future it awaited)?"""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return cancelling is not None and cancelling() > 0


class EngineThread:
    """The one thread the engine runs in. A plain queue in, call_soon_threadsafe out: a
    fraction of the CPU of anyio.to_thread.run_sync's hop, which a batch of one pays per
    request.

    `nice` > 0 lowers this thread's own scheduling priority (Linux: a thread's nice is
    its own; raising it needs no privilege). The worker has one core: the event loop and
    this thread share it, and with equal weights a loop that wakes (a connection to shed,
    a result to hand back) may wait out the engine's slice first."""

    def __init__(self, nice: int = 0) -> None:
        self.nice = nice
        self.native_id: int | None = None  # the kernel's id of the thread, once started
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="engine", daemon=True)
        self._thread.start()
        self._started.wait()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        self.native_id = tid = threading.get_native_id()
        if self.nice > 0:
            try:  # PRIO_PROCESS with a thread id: that thread alone (Linux)
                base = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(base + self.nice, 19))
            except OSError as e:  # not Linux, or a sandbox that refuses it: run as is
                log.warning("engine thread priority not lowered (nice %d): %s", self.nice, e)
        self._started.set()
        while (item := self._queue.get()) is not None:
            loop, future, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the awaiting coroutine
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, result, error)

    def stop(self) -> None:
        self._queue.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s died", task.get_name(), exc_info=task.exception())
