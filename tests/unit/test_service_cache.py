"""service/cache.py and service/redis_l2.py without Redis: the bytes-bounded LRU and the
breaker's states."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest

from service.cache import L1Cache
from service.redis_l2 import CircuitBreaker


def test_l1_is_bounded_in_bytes_and_evicts_the_least_recent() -> None:
    l1 = L1Cache(max_bytes=3 * 4 * 4, dim=4)  # room for 3 rows of 4 float32
    rows = np.arange(16, dtype=np.float32).reshape(4, 4)
    l1.put_many([1, 2, 3], rows[:3])
    out = np.zeros((2, 4), np.float32)
    missing = l1.get_many([1, 9], out)  # 1 becomes the most recent
    assert missing.tolist() == [False, True] and out[0].tolist() == rows[0].tolist()
    l1.put_many([4], rows[3:])  # evicts 2, the least recently used
    assert len(l1) == 3 and l1.nbytes <= l1.max_bytes
    out = np.zeros((4, 4), np.float32)
    assert l1.get_many([1, 2, 3, 4], out).tolist() == [False, True, False, False]
    assert (l1.hits, l1.misses) == (4, 2)


def test_l1_keeps_its_own_copy_and_zero_bytes_is_off() -> None:
    l1 = L1Cache(max_bytes=1024, dim=2)
    row = np.ones((1, 2), np.float32)
    l1.put_many([7], row)
    row[:] = 5
    out = np.zeros((1, 2), np.float32)
    l1.get_many([7], out)
    assert out.tolist() == [[1.0, 1.0]]
    off = L1Cache(max_bytes=0, dim=2)
    off.put_many([7], row)
    assert len(off) == 0


def _get(l1: L1Cache, ids: list[int], fill: float = -1.0) -> tuple[list[bool], np.ndarray]:
    out = np.full((len(ids), l1.dim), fill, np.float32)
    return l1.get_many(ids, out).tolist(), out


def test_l1_an_evicted_slot_is_reused_without_leaking_its_row() -> None:
    l1 = L1Cache(max_bytes=2 * 3 * 4, dim=3)  # 2 rows
    a, b, c, e = (np.full((1, 3), v, np.float32) for v in (1, 2, 3, 4))
    l1.put_many([1], a)
    l1.put_many([2], b)
    l1.put_many([3], c)  # evicts 1: its slot is 3's now
    missing, out = _get(l1, [1, 2, 3])
    assert missing == [True, False, False]
    assert out.tolist() == [[-1] * 3, [2] * 3, [3] * 3]  # the miss's row is left as it was
    l1.put_many([1], e)  # evicts 2 (3 was touched after it)
    missing, out = _get(l1, [3, 2, 1])
    assert missing == [False, True, False] and out.tolist() == [[3] * 3, [-1] * 3, [4] * 3]
    # more new ids in one call than the cache holds: the last ones stay, each with its row
    rows = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    l1.put_many([10, 11, 12, 13, 14], rows)
    missing, out = _get(l1, [10, 11, 12, 13, 14, 1, 3])
    assert missing == [True, True, True, False, False, True, True]
    assert out[3:5].tolist() == rows[3:5].tolist() and len(l1) == 2 and l1.nbytes == 24


def test_l1_overwrites_and_touches_an_id_put_again() -> None:
    l1 = L1Cache(max_bytes=2 * 2 * 4, dim=2)
    l1.put_many([1, 2], np.array([[1, 1], [2, 2]], np.float32))
    l1.put_many([1], np.array([[5, 5]], np.float32))  # new row; 1 is now the most recent
    assert len(l1) == 2
    l1.put_many([3], np.array([[3, 3]], np.float32))  # evicts 2, not 1
    missing, out = _get(l1, [1, 2, 3])
    assert missing == [False, True, False] and out.tolist() == [[5, 5], [-1, -1], [3, 3]]


def test_l1_equal_ids_in_one_put_the_last_wins() -> None:
    l1 = L1Cache(max_bytes=2 * 2 * 4, dim=2)
    l1.put_many([5, 6, 5], np.array([[1, 1], [2, 2], [3, 3]], np.float32))
    assert len(l1) == 2 and l1.nbytes == 16
    missing, out = _get(l1, [5, 6])
    assert missing == [False, False] and out.tolist() == [[3, 3], [2, 2]]
    l1.put_many([6, 5, 6, 6], np.array([[4, 4], [5, 5], [6, 6], [7, 7]], np.float32))
    l1.put_many([7], np.array([[8, 8]], np.float32))  # 6 was put last: 5 goes
    missing, out = _get(l1, [5, 6, 7])
    assert missing == [True, False, False] and out.tolist() == [[-1, -1], [7, 7], [8, 8]]


def test_l1_with_room_for_no_row_caches_nothing() -> None:
    l1 = L1Cache(max_bytes=7, dim=2)  # less than one row
    assert l1.capacity == 0
    l1.put_many([1, 2], np.ones((2, 2), np.float32))
    missing, out = _get(l1, [1, 2])
    assert missing == [True, True] and (out == -1).all()
    assert (len(l1), l1.nbytes, l1.hits, l1.misses) == (0, 0, 0, 2)


def test_l1_get_writes_only_the_hits_rows_and_takes_no_ids() -> None:
    l1 = L1Cache(max_bytes=1 << 10, dim=2)
    l1.put_many([1, 2], np.array([[1, 1], [2, 2]], np.float32))
    for ids, want in (
        ([2, 1], [[2, 2], [1, 1]]),  # all hits
        ([9, 1, 8], [[-1, -1], [1, 1], [-1, -1]]),
        ([9, 8], [[-1, -1], [-1, -1]]),  # no hit
        ([], []),
    ):
        missing, out = _get(l1, ids)
        assert missing == [w == [-1, -1] for w in want] and out.tolist() == want


def test_l1_refuses_rows_that_do_not_match_and_changes_nothing() -> None:
    l1 = L1Cache(max_bytes=1 << 10, dim=2)
    with pytest.raises(ValueError):
        l1.put_many([1, 2], np.ones((1, 2), np.float32))
    with pytest.raises(ValueError):
        l1.put_many([1], np.ones((1, 3), np.float32))
    assert len(l1) == 0


def test_l1_grows_its_table_keeping_the_rows() -> None:
    l1 = L1Cache(max_bytes=3000 * 2 * 4, dim=2)  # 3000 rows: grown 1024, 2048, 3000
    ids = list(range(3500))
    rows = np.stack([np.arange(3500), -np.arange(3500)], axis=1).astype(np.float32)
    for at in range(0, 3500, 700):
        l1.put_many(ids[at : at + 700], rows[at : at + 700])
    out = np.zeros((3500, 2), np.float32)
    missing = l1.get_many(ids, out)
    assert missing.tolist() == [True] * 500 + [False] * 3000
    assert (out[500:] == rows[500:]).all() and l1.nbytes == l1.max_bytes


def test_l1_matches_a_reference_lru() -> None:
    rnd = random.Random(7)
    dim, capacity = 3, 6
    l1 = L1Cache(max_bytes=capacity * dim * 4 + 5, dim=dim)
    ref: OrderedDict[int, list[float]] = OrderedDict()
    for step in range(2000):
        ids = [rnd.randrange(15) for _ in range(rnd.randrange(12))]  # equal ids too
        if rnd.random() < 0.5:
            rows = np.array([[step, j, item] for j, item in enumerate(ids)], np.float32)
            l1.put_many(ids, rows.reshape(len(ids), dim))
            for item, row in zip(ids, rows.tolist(), strict=True):
                ref[item] = row
                ref.move_to_end(item)
            while len(ref) > capacity:
                ref.popitem(last=False)
        else:
            missing, out = _get(l1, ids, fill=-1 - step)
            assert missing == [item not in ref for item in ids]
            want = [ref.get(item, [-1 - step] * dim) for item in ids]
            assert out.tolist() == want
            for item in ids:
                if item in ref:
                    ref.move_to_end(item)
        assert len(l1) == len(ref) and l1.nbytes == len(ref) * dim * 4
    missing, out = _get(l1, list(ref))
    assert not any(missing) and out.tolist() == list(ref.values())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, cooldown_s=1.0, clock=clock)
    b.failure()
    b.success()  # not consecutive: still closed
    b.failure()
    b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.now = 0.5
    assert not b.allow()
    clock.now = 1.0
    assert b.allow() and b.state == "half_open"  # one probe
    assert not b.allow()  # the others wait for it
    b.failure()  # the probe failed: open for another cool-down
    assert b.state == "open" and not b.allow()
    clock.now = 2.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.opened_count == 2


def test_a_lost_probe_does_not_hold_the_breaker_forever() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
    b.failure()
    clock.now = 1.0
    assert b.allow()  # the probe never reports back (cancelled)
    clock.now = 2.0
    assert b.allow() and b.state == "half_open"


def test_the_read_gate_reads_until_measured_then_only_when_a_read_pays() -> None:
    """found share x misses x tower time per row against the read's own time: a read that
    finds little, for few misses, of a cheap tower, is skipped, bar one probe in
    probe_every; many misses, or reads that find rows, open it again."""
    from service.cache import ReadGate

    gate = ReadGate(probe_every=4, weight=1.0)  # weight 1: each measurement replaces
    assert gate.ask(1)  # nothing measured: read
    gate.read(0.001, asked=10, found=0)  # 1 ms, nothing found
    assert gate.ask(1)  # the tower's cost not measured yet: read
    gate.tower(0.0001, rows=4)  # 25 us per row
    assert gate.found_share == 0.0
    assert [gate.ask(10) for _ in range(8)] == [False, False, False, True] * 2  # probes
    gate.read(0.001, asked=10, found=10)  # a probe found every row (a cold L1, say)
    assert gate.ask(41)  # 40 rows x 25 us = 1 ms: the line
    assert not gate.ask(39)
    gate.read(0.0001, asked=10, found=5)  # Redis answers in 0.1 ms, finds half
    assert gate.ask(9) and not gate.ask(7)  # 0.5 x 8 x 25 us = 0.1 ms: the line
