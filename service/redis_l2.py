"""L2 of the embedding cache (service/cache.py): Redis, read with one MGET per request
(short timeout, circuit breaker) and written from a bounded write-back queue drained by one
owned background task.

Redis is used through the asyncio client, on the event loop: a request waiting on Redis
holds no thread and no engine slot, and an asyncio deadline bounds the whole call even when
a socket hangs.

    {prefix}:emb:{version}:{key} -> raw little-endian float16 or float32 bytes (d,)

where key is the item id's 64-bit key in decimal (contract/ids.py: an integer id is
itself, a string id its hashed key); the L1 holds the same keys.

The value's length tells its dtype (2d or 4d bytes), so vectors published as float16 and
written back as float32 (or the reverse) read alike.

The request path's Redis work runs on the event loop, where every microsecond delays every
other request, so the hot calls skip redis-py's generic command layer (argument
normalisation and per-argument encoding, a Task per timeout, per-reply parsing callbacks):
the MGET and the write-backs' SET NX pipelines are packed here as RESP bytes in one pass
and sent on a connection of redis-py's own pool (its connect, AUTH, TLS, timeouts, error
types and hiredis parser are kept; a connection whose exchange did not finish is closed,
never reused); an MGET's values are decoded in one numpy call for the request, not one per
value. A Redis Cluster goes through redis-py's cluster client (a request's keys span hash
slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from service.logs import RateLimit
from service.metrics import Metrics
from service.tasks import stop

log = logging.getLogger(__name__)
# one warning per failed Redis read, with the request id; rate-limited (a dead Redis
# fails every request until the breaker opens, then the breaker's own warnings say so)
problem_log = logging.getLogger(__name__ + ".problems")
problem_log.addFilter(RateLimit())

# what a failed Redis call raises: redis-py's errors, the socket's, and the cluster
# client's own when no node answers (RedisClusterException is not a RedisError)
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)
BUDGET_SHARE = 0.5  # of a request's budget left, at most, for its Redis read
BREAKER_FLOOR_S = 0.002  # a timeout after a wait this long counts as a Redis failure

WRITE_DTYPE = "<f2"  # publish's default: half the bytes; the model's inputs are float32
_WRITE_BATCH = 256  # embeddings per MSET of the write-back task
META_CHECK_S = 5.0  # how often the version's meta key (published or not) is read again


if sys.version_info >= (3, 11):
    _deadline = asyncio.timeout  # cancels the awaiting task itself: no Task per call
else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def _deadline(delay: float) -> AsyncIterator[None]:
        """asyncio.timeout for 3.10: TimeoutError when the block outlasts `delay`."""
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def fire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        try:
            yield
        except asyncio.CancelledError as e:
            if fired:
                raise TimeoutError from e
            raise
        finally:
            handle.cancel()


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def pack_mget(base: bytes, ids: Sequence[int]) -> bytes:
    """MGET base+id for every id, as RESP (what redis-py would send, in one pass)."""
    keys = [b"%b%d" % (base, i) for i in ids]
    return b"*%d\r\n$4\r\nMGET\r\n%b" % (len(keys) + 1, b"".join(map(_bulk, keys)))


def pack_set_nx(base: bytes, ids: Sequence[int], values: np.ndarray, ttl_s: int | None) -> bytes:
    """One SET base+id value NX [EX ttl] per row of values (n, w), as a RESP pipeline."""
    if ttl_s:
        tail = b"$2\r\nNX\r\n$2\r\nEX\r\n" + _bulk(b"%d" % ttl_s)
        head = b"*6\r\n$3\r\nSET\r\n"
    else:
        tail, head = b"$2\r\nNX\r\n", b"*4\r\n$3\r\nSET\r\n"
    rows = values.tobytes()
    width = values.shape[1] * values.itemsize if values.ndim == 2 else 0
    value_head = b"$%d\r\n" % width
    out = []
    for j, i in enumerate(ids):
        key = b"%b%d" % (base, i)
        value = rows[j * width : (j + 1) * width]
        out.append(b"%b$%d\r\n%b\r\n%b%b\r\n%b" % (head, len(key), key, value_head, value, tail))
    return b"".join(out)


class CircuitBreaker:
    """closed -> open after `failures` consecutive failures -> after `cooldown_s` one call
    is let through (half-open) -> closed on its success, open again on its failure."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        """on_change(state): called on every change of state (the metrics gauge: each
        worker sets its own when its breaker moves, so /metrics from any worker is right)."""
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.on_change = on_change
        self.state = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self.opened_count = 0

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(state)

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        # half-open: one probe per cool-down (a probe that never answers is not waited on)
        if self.clock() - self._opened_at >= self.cooldown_s:
            self._set("half_open")
            self._opened_at = self.clock()
            return True
        return False

    def success(self) -> None:
        if self.state != "closed":
            log.warning("redis circuit breaker closed (probe succeeded)")
        self._set("closed")
        self._consecutive = 0

    def failure(self) -> None:
        self._consecutive += 1
        if self.state == "half_open" or (
            self.state == "closed" and self._consecutive >= self.failures
        ):
            if self.state == "closed":
                log.warning("redis circuit breaker open after %d failures", self._consecutive)
            self._set("open")
            self._opened_at = self.clock()
            self.opened_count += 1


@dataclass(frozen=True)
class RedisConfig:
    url: str
    prefix: str
    timeout_s: float  # per call: connect, read, the whole MGET
    queue_size: int  # write-back queue bound
    cluster: bool = False
    writeback_ttl_s: int = 0  # expiry of a written-back embedding (0: none)


class RedisL2:
    """MGET reads and the write-back queue of one model version."""

    def __init__(
        self,
        config: RedisConfig,
        version: str,
        dim: int,
        breaker: CircuitBreaker,
        metrics: Metrics,
    ) -> None:
        t = config.timeout_s
        self.client: aioredis.Redis | RedisCluster
        # cluster: one MGET / MSET per slot, pipelined; otherwise one round trip
        self._mget: Callable[[list[str]], Awaitable[list[Any]]]
        if config.cluster:
            self.client = RedisCluster.from_url(
                config.url,
                socket_timeout=t,
                socket_connect_timeout=t,
                retry=Retry(NoBackoff(), 0),  # also the cluster's own retries (redis-py >= 6)
            )
            self._mget = self.client.mget_nonatomic
        else:
            # no socket_timeout: every call on this client is bounded by an asyncio deadline
            # around it (an MGET by its budget share, a write-back or meta read by 5 x t),
            # and a per-socket one would add, per call, a Task to bound each send (an
            # extra turn of the event loop before the command leaves) and a timeout
            # context per reply read
            self.client = aioredis.Redis.from_url(
                config.url,
                socket_timeout=None,  # explicitly: left out, redis-py sets 5 s
                socket_connect_timeout=t,
                retry=Retry(NoBackoff(), 0),  # one try: the breaker, not retries, handles outages
                retry_on_timeout=False,
                health_check_interval=0,
            )
            self._mget = self.client.mget
        self.base = f"{config.prefix}:emb:{version}:"
        self._base = self.base.encode()  # redis-py encodes str keys as utf-8 too
        self.dim, self.timeout_s, self.ttl_s = dim, t, config.writeback_ttl_s or None
        self.refused = False  # the published embeddings do not fit this model: L2 is off
        self.breaker, self.metrics = breaker, metrics
        self.queue: asyncio.Queue[tuple[list[int], np.ndarray]] = asyncio.Queue(config.queue_size)
        self._writer: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self.published: bool | None = None  # this version's embeddings are in Redis

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_back(), name="redis-write-back")
        self._writer.add_done_callback(_log_crash)
        self._checker = asyncio.create_task(self._check_published(), name="redis-meta")
        self._checker.add_done_callback(_log_crash)

    async def _check_published(self) -> None:
        """Read the version's meta key (written last by `python -m export publish`) now and
        every META_CHECK_S: whether this bundle's embeddings are in Redis (a Redis that
        restarted empty, or was flushed, says so within that time), and refuse a dimension
        that is not the model's. Each change is logged once. `published`: True, False, or
        None (Redis did not answer)."""
        while True:
            await self._read_meta()
            await asyncio.sleep(META_CHECK_S)

    async def _read_meta(self) -> None:
        was = self.published
        try:
            raw = await asyncio.wait_for(
                self.client.get(f"{self.base}__meta__"), 5 * self.timeout_s
            )
        except (*REDIS_ERRORS, TimeoutError) as e:
            if was is not None:
                log.warning("redis: could not read the embeddings' meta key %s__meta__: %r",
                            self.base, e)  # fmt: skip
            self.published = None
            return
        if raw is None:
            self.published = self.refused = False
            if was is not False:
                log.warning("redis: no embeddings published for this version (%s__meta__ is "
                            "missing; run `python -m export publish`): L2 misses until the "
                            "item tower's write-backs fill it", self.base)  # fmt: skip
            return
        try:
            meta = json.loads(raw)
            dim = int(meta["dim"])
        except (ValueError, KeyError, TypeError):
            if was is not False:
                log.error("redis: meta key %s__meta__ is not publish's JSON: %r", self.base,
                          raw[:200])  # fmt: skip
            self.published = False
            return
        if dim != self.dim:
            # values of another width could still decode (float16 at 2d reads as float32
            # at d): garbage. No reads, no write-backs into that key space
            if not self.refused:
                log.error("redis: published embeddings have dim %d, the model %d: L2 reads "
                          "and write-backs are off (every item from L1 or the item tower)",
                          dim, self.dim)  # fmt: skip
            self.refused, self.published = True, False
            return
        self.refused, self.published = False, True
        if not was:
            log.info("redis: %s embeddings of this version published (%s)",
                     meta.get("count"), meta.get("dtype"))  # fmt: skip

    async def _set_new(self, mapping: dict[str, bytes]) -> None:
        """SET NX (with the write-back expiry) per key, pipelined: a key that exists is
        left alone, so a published embedding (the item table's, no expiry) is never
        replaced by one made from a request's features, and concurrent write-backs of
        one item keep the first. (Redis Cluster only: the single-node client sends
        pack_set_nx's pipeline through _exchange.)"""
        pipe = self.client.pipeline(transaction=False)
        for key, value in mapping.items():
            pipe.set(key, value, nx=True, ex=self.ttl_s)
        await pipe.execute()

    async def _exchange(self, packed: bytes, replies: int) -> list[Any]:
        """Send RESP bytes on a pooled connection and read `replies` replies (a Redis error
        reply raises, ResponseError). A connection whose exchange did not complete (an
        error reply mid-pipeline, a timeout, a cancellation) is closed before it goes back
        to the pool, so no later call reads its leftover replies."""
        client = self.client
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        conn = await pool.get_connection()
        done = False
        try:
            await conn.send_packed_command(packed, check_health=False)
            out = [await conn.read_response() for _ in range(replies)]
            done = True
            return out
        finally:
            if not done:
                await conn.disconnect(nowait=True)
            await pool.release(conn)

    async def close(self) -> None:
        for task in (self._writer, self._checker):
            if not await stop(task):
                log.error("redis: %s did not stop", task.get_name() if task else "")
        await self.client.aclose()

    async def mget(
        self, ids: Sequence[int], budget_left_s: float, request_id: str = ""
    ) -> list[bytes | None] | None:
        """One MGET, bounded by min(the per-call timeout, BUDGET_SHARE of the request's
        budget left: the model keeps the rest); None on any failure or while the breaker is
        open. A timeout counts against the breaker once the wait reached BREAKER_FLOOR_S (a
        healthy local Redis answers in well under a millisecond), so clients with budgets
        below the per-call timeout still open it when Redis hangs."""
        if self.refused or not self.breaker.allow():
            return None
        wait = max(min(budget_left_s * BUDGET_SHARE, self.timeout_s), 1e-4)
        try:
            async with _deadline(wait):
                if isinstance(self.client, RedisCluster):
                    got = await self._mget([f"{self.base}{i}" for i in ids])
                else:
                    got = (await self._exchange(pack_mget(self._base, ids), 1))[0]
        except TimeoutError:
            if wait >= min(self.timeout_s, BREAKER_FLOOR_S):
                self.breaker.failure()
            problem_log.warning("request %s: redis mget timed out after %.1f ms",
                                request_id, wait * 1e3)  # fmt: skip
            return None
        except REDIS_ERRORS as e:
            self.breaker.failure()
            problem_log.warning("request %s: redis mget failed: %r", request_id, e)
            return None
        self.breaker.success()
        return [v if isinstance(v, bytes | None) else v.encode() for v in got]

    def decode(self, value: bytes) -> np.ndarray | None:
        """A stored value -> (d,) float32; None (a miss) for a value of another size. (A
        value that is not finite is a miss too: EmbeddingCache.lookup checks the request's
        values at once.)"""
        if len(value) == 2 * self.dim:
            return np.frombuffer(value, "<f2").astype(np.float32)
        if len(value) == 4 * self.dim:
            return np.frombuffer(value, "<f4")
        return None

    def decode_many(self, values: Sequence[bytes | None]) -> tuple[list[int], np.ndarray]:
        """An MGET's values -> (positions of the usable ones, their rows (n, d) float32),
        one numpy conversion per dtype for the whole request: float16 values (2d bytes)
        first, then float32 (4d bytes); None and values of another size are left out."""
        d, half = self.dim, 2 * self.dim
        sizes = [0 if v is None else len(v) for v in values]
        if sizes.count(half) == len(values):  # the published case: every value float16
            block = np.frombuffer(b"".join(values), "<f2")  # type: ignore[arg-type]
            return list(range(len(values))), block.reshape(-1, d).astype(np.float32)
        at16 = [j for j, n in enumerate(sizes) if n == half]
        at32 = [j for j, n in enumerate(sizes) if n == 2 * half]
        block = np.empty((len(at16) + len(at32), d), np.float32)
        if at16:
            raw = b"".join([values[j] for j in at16])  # type: ignore[misc]
            block[: len(at16)] = np.frombuffer(raw, "<f2").reshape(-1, d)
        if at32:
            raw = b"".join([values[j] for j in at32])  # type: ignore[misc]
            block[len(at16) :] = np.frombuffer(raw, "<f4").reshape(-1, d)
        return at16 + at32, block

    def enqueue(self, ids: list[int], rows: np.ndarray) -> None:
        """Queue computed embeddings for Redis; a full queue drops them (counted)."""
        try:
            self.queue.put_nowait((ids, rows))
        except asyncio.QueueFull:
            self.metrics.writebacks.labels("dropped").inc(len(ids))

    async def _write_back(self) -> None:
        while True:
            ids, rows = await self.queue.get()
            while len(ids) < _WRITE_BATCH and not self.queue.empty():
                more_ids, more_rows = self.queue.get_nowait()
                ids, rows = ids + more_ids, np.concatenate([rows, more_rows])
            # The breaker belongs to the reads (the request path): write-backs follow it but
            # never move it, so a slow background MSET cannot switch L2 reads off, and an
            # open breaker's one half-open probe is left to a read.
            if self.breaker.state != "closed" or self.refused:
                self.metrics.writebacks.labels("error").inc(len(ids))
                continue
            values = np.ascontiguousarray(rows.astype(WRITE_DTYPE))
            try:
                async with _deadline(self.timeout_s * 5):
                    if isinstance(self.client, RedisCluster):
                        await self._set_new({f"{self.base}{i}": values[j].tobytes()
                                             for j, i in enumerate(ids)})  # fmt: skip
                    else:
                        packed = pack_set_nx(self._base, ids, values, self.ttl_s)
                        await self._exchange(packed, len(ids))
            except (*REDIS_ERRORS, TimeoutError) as e:
                self.metrics.writebacks.labels("error").inc(len(ids))
                log.warning("redis write-back of %d embeddings failed: %r", len(ids), e)
                continue
            self.metrics.writebacks.labels("ok").inc(len(ids))


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s died", task.get_name(), exc_info=task.exception())
