"""service.tasks.stop: a background task stops even when it missed a cancellation."""

from __future__ import annotations

import asyncio

from service.tasks import stop


async def _missed_cancellation() -> tuple[asyncio.Task[None], asyncio.Future[int]]:
    """A loop like the Redis write-back's: a task in `asyncio.wait_for` whose inner call
    finishes in the same loop turn as the cancel arrives. On Python 3.11 wait_for returns
    the result and the cancellation is lost; the loop then waits on its queue forever."""
    loop = asyncio.get_running_loop()
    inner: asyncio.Future[int] = loop.create_future()
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def body() -> None:
        await asyncio.wait_for(inner, 10)
        while True:
            await queue.get()

    task = asyncio.create_task(body())
    await asyncio.sleep(0)  # in wait_for now
    inner.set_result(1)
    task.cancel()  # same turn as the inner result
    return task, inner


def test_stop_ends_a_task_that_missed_its_first_cancellation() -> None:
    async def main() -> tuple[bool, float]:
        task, _ = await _missed_cancellation()
        t0 = asyncio.get_running_loop().time()
        done = await stop(task, timeout_s=5)
        return done and task.cancelled(), asyncio.get_running_loop().time() - t0

    stopped, took = asyncio.run(main())
    assert stopped
    assert took < 1.0


def test_stop_reports_a_task_that_will_not_stop() -> None:
    async def main() -> tuple[bool, bool]:
        refuse = True

        async def stubborn() -> None:
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if not refuse:
                        raise

        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        refused = await stop(task, timeout_s=0.3)
        ended = await stop(asyncio.create_task(asyncio.sleep(0)), timeout_s=1)
        refuse = False
        await stop(task, timeout_s=1)
        return refused, ended

    refused, ended = asyncio.run(main())
    assert refused is False
    assert ended is True
