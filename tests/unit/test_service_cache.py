"""service/cache.py without Redis: the bytes-bounded LRU and the breaker's states."""

from __future__ import annotations

import numpy as np

from service.cache import CircuitBreaker, L1Cache


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
