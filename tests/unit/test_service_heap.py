"""A retired engine's memory goes back to the OS: the C heap trimmed after each retire."""

from __future__ import annotations

import asyncio
import ctypes
import os
from typing import Any

import pytest

from service import lifecycle

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _fragmented_free(mb: int) -> list[Any]:
    """`mb` MB of C-heap blocks (below malloc's mmap threshold, so in its arenas), all
    freed but every 64th, which pins the pages around it: what a retired engine's
    allocations look like beside the ones that stay. Returns the survivors."""
    size = 16 << 10
    blocks = [ctypes.create_string_buffer(size) for _ in range((mb << 20) // size)]
    for b in blocks:
        ctypes.memset(b, 1, size)  # touched: resident
    keep = blocks[::64]
    del blocks
    return keep


@pytest.mark.skipif(lifecycle.trim_heap() is False, reason="no glibc malloc_trim")
def test_trim_heap_returns_freed_fragmented_pages_to_the_os() -> None:
    base = rss_mb()
    keep = _fragmented_free(128)
    held = rss_mb() - base
    assert held > 64, f"the freed blocks should still be resident before the trim: {held}"
    assert lifecycle.trim_heap()
    after = rss_mb() - base
    assert after < held / 3, f"{held:.0f} MB held before the trim, {after:.0f} MB after"
    del keep


def test_a_retire_trims_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(lifecycle, "trim_heap", lambda: calls.append(1) or True)

    class Old:
        active = 0
        closed = False
        cache = type("Cache", (), {"l2": None})()

        async def close(self) -> None:
            self.closed = True

    old = Old()
    asyncio.run(lifecycle._retire(old, timeout_s=1))  # type: ignore[arg-type]
    assert old.closed and calls == [1]
