"""The embedding cache of design §7: L1 in-process LRU (bytes-bounded), L2 Redis (one MGET
per request, short timeout, circuit breaker), L3 the item tower (run by the app in the
engine's thread); computed embeddings go back to L1 at once and to Redis from a bounded
queue drained by one owned background task.

Redis is used through the asyncio client, on the event loop: a request waiting on Redis
holds no thread and no engine slot, and `asyncio.wait_for` bounds the whole call even when
a socket hangs. Every L1 access is on the event loop too, so the LRU needs no lock.

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
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
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


class L1Cache:
    """LRU of item_id -> (d,) float32, bounded in bytes (row payloads).

    The rows live in one float32 table of up to `capacity` rows, grown (doubling) as the
    cache fills, so a large bound costs no memory until it is used and the table never
    exceeds `max_bytes`; an OrderedDict item_id -> slot (the id's row in the table) keeps
    the LRU order, and an evicted id's slot is reused by the next new id. A lookup is one
    dict get per id and one gather, a put one scatter. `nbytes` is the payload of the rows
    held (len * row_bytes), the table's allocation about that (up to a doubling ahead).
    """

    def __init__(self, max_bytes: int, dim: int) -> None:
        self.max_bytes, self.dim = max_bytes, dim
        self.row_bytes = dim * 4
        self.capacity = max_bytes // self.row_bytes  # rows: every row has the same size
        self._slots: OrderedDict[int, int] = OrderedDict()  # LRU first
        self._table = np.empty((0, dim), np.float32)  # rows [0, len(self)) are in use
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        return len(self._slots) * self.row_bytes

    def get_many(self, ids: Sequence[int], out: np.ndarray) -> np.ndarray:
        """Fill out[i] (out: (m, d) float32) for every id found, the other rows untouched;
        -> (m,) bool missing. The hits become the most recently used."""
        found = list(map(self._slots.get, ids, repeat(-1)))  # slots, -1 where missing
        n_miss = found.count(-1)
        slots = np.array(found, np.intp)
        touch = self._slots.move_to_end
        if n_miss == 0:  # all hits: one gather straight into out
            # every slot is in range: "clip" changes none, and unlike "raise" writes unbuffered
            np.take(self._table, slots, axis=0, out=out, mode="clip")
            deque(map(touch, ids), maxlen=0)
            missing = np.zeros(len(ids), bool)
        else:
            missing = slots < 0
            hit = ~missing
            out[hit] = self._table[slots[hit]]
            deque(map(touch, compress(ids, hit.tolist())), maxlen=0)
        self.hits += len(ids) - n_miss
        self.misses += n_miss
        return missing

    def put_many(self, ids: Sequence[int], rows: np.ndarray) -> None:
        """rows (n, d): copied in (as float32), the least recently used evicted; an id
        already held gets the new row, and within one call the last of equal ids wins."""
        if self.capacity == 0:
            return
        data = np.asarray(rows, np.float32)
        if data.shape != (len(ids), self.dim):
            raise ValueError(f"rows {data.shape} for {len(ids)} ids of dim {self.dim}")
        if min(self.capacity, len(self._slots) + len(ids)) > len(self._table):
            self._grow(len(self._slots) + len(ids))  # first, so a failure changes nothing
        slots = self._slots
        writes: dict[int, int] = {}  # slot -> its row in data (the last one put there)
        for j, item in enumerate(ids):
            slot = slots.get(item)
            if slot is not None:
                slots.move_to_end(item)
            elif len(slots) < self.capacity:
                slot = slots[item] = len(slots)
            else:  # full: the least recently used item's slot is reused
                slot = slots[item] = slots.popitem(last=False)[1]
            writes[slot] = j
        if len(writes) == len(data):  # every row goes to its own slot, in order
            self._table[list(writes)] = data
        else:  # equal ids, or a slot reused within the call: only the last write per slot
            self._table[list(writes)] = data[list(writes.values())]

    def _grow(self, rows: int) -> None:
        """Room for `rows` rows (at least doubling, at most capacity): a copy."""
        size = min(self.capacity, max(rows, 2 * len(self._table), 1024))
        table = np.empty((size, self.dim), np.float32)
        table[: len(self._table)] = self._table
        self._table = table


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


class ReadGate:
    """Whether a request's Redis read is worth its round trip, measured against what a
    hit saves: the item tower's work. A read pays when the rows it is expected to
    find (its misses x the share of asked rows recent reads found) would cost the item
    tower more than the read costs the request (the recent wall time of one MGET: the
    round trip, the wake-ups of Redis and of the event loop, the decode):

        found_share x misses x tower_s_per_row >= read_s

    With one replica whose L1 holds the catalogue's head, Redis holds little that L1 does
    not (its misses are mostly items nobody computed yet) and the read is skipped; after a
    restart, or beside other replicas that wrote back what L1 lacks, it finds rows and is
    made. A skipped request's misses go to the item tower, whose results are written back
    as ever (SET NX), and one request in `probe_every` that would skip reads anyway, so
    found_share and read_s stay measured. Until both costs are measured, every request
    reads. Event loop only, except `tower` (the item tower's thread; a plain float)."""

    def __init__(self, probe_every: int = 16, weight: float = 0.1) -> None:
        self.probe_every, self.weight = probe_every, weight
        self.found_share = 1.0  # of the rows asked, found (smoothed); 1 until measured
        self.read_s: float | None = None  # wall time of one read (smoothed)
        self.row_s: float | None = None  # item tower time per row (smoothed)
        self._skipped = 0  # reads skipped since the last one made

    def ask(self, misses: int) -> bool:
        """Read Redis for `misses` rows?"""
        if self.read_s is None or self.row_s is None:
            return True
        if self.found_share * misses * self.row_s >= self.read_s:
            return True
        self._skipped += 1
        if self._skipped >= self.probe_every:
            self._skipped = 0
            return True
        return False

    def read(self, seconds: float, asked: int, found: int) -> None:
        """A read that answered: its wall time, rows asked and found."""
        self.read_s = self._smooth(self.read_s, seconds)
        if asked:
            self.found_share = self._smooth(self.found_share, found / asked)

    def tower(self, seconds: float, rows: int) -> None:
        """An item-tower run of `rows` rows that took `seconds`."""
        if rows > 0:
            self.row_s = self._smooth(self.row_s, seconds / rows)

    def _smooth(self, old: float | None, new: float) -> float:
        """The moving average's next value (the first sample as it is)."""
        return new if old is None else old + self.weight * (new - old)


@dataclass
class Lookup:
    """The cache's answer for one request's candidates."""

    static: np.ndarray  # (m, d) float32, zeros where missing
    missing: np.ndarray  # (m,) bool: rows for the item tower
    l2_error: bool  # Redis was asked (or skipped by the breaker) and failed


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


class EmbeddingCache:
    """L1 then L2 for a request's candidates; `store` puts L3's results back."""

    def __init__(
        self, l1: L1Cache, l2: RedisL2 | None, metrics: Metrics, gate: ReadGate | None = None
    ) -> None:
        """gate: when Redis is read (None: for every request with L1 misses)."""
        self.l1, self.l2, self.metrics, self.gate = l1, l2, metrics, gate
        lookups = metrics.lookups
        self._count = {(t, r): lookups.labels(t, r) for t in ("l1", "l2") for r in
                       ("hit", "miss", "error", "skipped")}  # fmt: skip

    @property
    def breaker_state(self) -> str:
        return "disabled" if self.l2 is None else self.l2.breaker.state

    async def lookup(
        self, ids: Sequence[int], budget_left_s: float, request_id: str = ""
    ) -> Lookup:
        """static (m, d) and the rows still missing after L1 and (one MGET) L2."""
        static = np.zeros((len(ids), self.l1.dim), np.float32)
        missing = self.l1.get_many(ids, static)
        n_miss = int(missing.sum())
        self._count["l1", "hit"].inc(len(ids) - n_miss)
        if n_miss:
            self._count["l1", "miss"].inc(n_miss)
        if not n_miss or self.l2 is None:
            return Lookup(static, missing, False)
        gate = self.gate
        if gate is not None and not gate.ask(n_miss):  # not worth its round trip
            self._count["l2", "skipped"].inc(n_miss)
            return Lookup(static, missing, False)
        rows = np.flatnonzero(missing).tolist()
        want = [ids[i] for i in rows]
        t0 = time.perf_counter()
        values = await self.l2.mget(want, budget_left_s, request_id)
        if values is None:
            self._count["l2", "error"].inc(n_miss)
            return Lookup(static, missing, True)
        read_s = time.perf_counter() - t0
        usable, block = self.l2.decode_many(values)  # (found, d) float32
        found_at = [rows[j] for j in usable]
        found_ids = [want[j] for j in usable]
        unfit = len(values) - values.count(None) - len(found_ids)
        if found_ids:
            finite = np.isfinite(block).all(axis=1)  # one check for the request, not per value
            if not finite.all():
                unfit += int((~finite).sum())
                keep = finite.tolist()
                found_at = list(compress(found_at, keep))
                found_ids = list(compress(found_ids, keep))
                block = block[finite]
            static[found_at] = block
            missing[found_at] = False
            if found_ids:
                self.l1.put_many(found_ids, block)
                self._count["l2", "hit"].inc(len(found_ids))
        if unfit:
            problem_log.warning("request %s: %d Redis values of another size or not finite: "
                                "read as misses", request_id, unfit)  # fmt: skip
        if n_miss - len(found_ids):
            self._count["l2", "miss"].inc(n_miss - len(found_ids))
        if gate is not None:
            gate.read(read_s, n_miss, len(found_ids))
        return Lookup(static, missing, False)

    def tower(self, seconds: float, rows: int) -> None:
        """The item tower computed `rows` rows in `seconds` (what a Redis hit saves)."""
        if self.gate is not None:
            self.gate.tower(seconds, rows)

    def store(self, ids: list[int], rows: np.ndarray, write_back: bool = True) -> None:
        """L3 results: into L1 now, into Redis from the write-back queue (`write_back`)."""
        self.l1.put_many(ids, rows)
        if write_back and self.l2 is not None:
            self.l2.enqueue(ids, rows)
