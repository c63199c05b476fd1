"""Stopping the service's background tasks for sure.

`task.cancel()` asks once, and a task can miss the request: on Python 3.11,
`asyncio.wait_for` returns the inner result, and drops the cancellation, when the inner
call finished in the same loop turn as the cancel arrived (python/cpython#86296, fixed in
3.12's rewrite of `wait_for`). A Redis write-back loop under load sits in `wait_for` most
of the time, so `cancel(); await task` could wait forever, and with it whatever awaited
the close (a bundle swap's retire, and before it the reload watch)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

RETRY_S = 0.1  # how long one cancellation is given before it is asked again


async def stop(task: asyncio.Task[Any] | None, timeout_s: float = 10.0) -> bool:
    """Cancel `task` until it is done, at most `timeout_s`; True when it is done. A task
    that ends with an exception has that exception retrieved here (its done-callback
    logs it)."""
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=min(RETRY_S, max(deadline - loop.time(), 0.0)))
    if task.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
        return True
    return False
