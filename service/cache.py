"""The embedding cache of design §7: L1 in-process LRU (bytes-bounded), L2 Redis (one MGET
per request, short timeout, circuit breaker: service/redis_l2.py), L3 the item tower (run by
the app in the engine's thread); computed embeddings go back to L1 at once and to Redis from
a bounded queue drained by one owned background task.

Every L1 access is on the event loop (as is every Redis call), so the LRU needs no lock.
The L1 holds the same keys as Redis: the item id's 64-bit key (contract/ids.py: an integer
id is itself, a string id its hashed key).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, repeat

import numpy as np

from service.metrics import Metrics
from service.redis_l2 import RedisL2, problem_log


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
        found = self._fill(static, missing, rows, want, values, request_id)
        if n_miss - found:
            self._count["l2", "miss"].inc(n_miss - found)
        if gate is not None:
            gate.read(read_s, n_miss, found)
        return Lookup(static, missing, False)

    def _fill(
        self,
        static: np.ndarray,
        missing: np.ndarray,
        rows: list[int],
        want: list[int],
        values: list[bytes | None],
        request_id: str,
    ) -> int:
        """One MGET's answer for the request's rows `rows` (ids `want`): the values of the
        model's size and finite go into static and L1 and leave `missing`; the others
        read as misses (one rate-limited warning). -> how many were found."""
        assert self.l2 is not None
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
        return len(found_ids)

    def tower(self, seconds: float, rows: int) -> None:
        """The item tower computed `rows` rows in `seconds` (what a Redis hit saves)."""
        if self.gate is not None:
            self.gate.tower(seconds, rows)

    def store(self, ids: list[int], rows: np.ndarray, write_back: bool = True) -> None:
        """L3 results: into L1 now, into Redis from the write-back queue (`write_back`)."""
        self.l1.put_many(ids, rows)
        if write_back and self.l2 is not None:
            self.l2.enqueue(ids, rows)
