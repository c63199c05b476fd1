"""How a worker's event loop and engine thread share its core: the engine thread's own
nice increment (service/rerank.py's EngineThread) and the GIL switch interval the app
holds while it serves (service/app.py's lifespan)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

import service.app
from service.rerank import EngineThread
from service.settings import Settings

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice")


def own_nice() -> int:
    """The calling thread's nice value (Linux: PRIO_PROCESS with a thread id)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def on_engine_thread(thread: EngineThread) -> tuple[int, int]:
    """(the engine thread's nice, its kernel thread id) as seen from inside it."""
    return await thread.run(lambda: (own_nice(), threading.get_native_id()))


@linux_only
def test_the_engine_thread_lowers_its_own_priority_and_nothing_else() -> None:
    loop_nice = own_nice()

    async def main() -> tuple[tuple[int, int], tuple[int, int]]:
        lowered, plain = EngineThread(nice=5), EngineThread()
        try:
            return await on_engine_thread(lowered), await on_engine_thread(plain)
        finally:
            lowered.stop()
            plain.stop()

    (nice, tid), (plain_nice, _) = asyncio.run(main())
    assert nice == min(loop_nice + 5, 19)
    assert tid != threading.get_native_id()
    assert plain_nice == loop_nice  # nice 0: the thread keeps the process's priority
    assert own_nice() == loop_nice  # the caller's thread (the event loop's) is untouched


@pytest.mark.parametrize("interval_ms", [0.5, 0.0])
def test_the_switch_interval_holds_while_the_app_serves_and_is_restored_after(
    monkeypatch: pytest.MonkeyPatch, tiny_bundle: tuple[Path, Any], interval_ms: float
) -> None:
    seen: list[float] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:  # the bundle's part: not here
        seen.append(sys.getswitchinterval())
        yield

    monkeypatch.setattr(service.app, "lifespan", lifespan)
    before = sys.getswitchinterval()
    app = service.app.create_app(
        Settings(bundle=tiny_bundle[0], admin_port=0, switch_interval_ms=interval_ms)
    )

    async def serve() -> None:
        async with app.router.lifespan_context(app):
            seen.append(sys.getswitchinterval())

    try:
        asyncio.run(serve())
    finally:
        after = sys.getswitchinterval()
        sys.setswitchinterval(before)
    want = interval_ms / 1000 if interval_ms > 0 else before
    assert seen == [pytest.approx(want), pytest.approx(want)]
    assert after == pytest.approx(before)
