"""The asyncio island: coroutines on their own thread, awaited from Trio without blocking it."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from push.island import AsyncioIsland


async def test_results_errors_and_threads() -> None:
    island = AsyncioIsland("test")
    async with trio.open_nursery() as nursery:
        await nursery.start(island.run)

        async def where() -> str:
            await asyncio.sleep(0)
            return threading.current_thread().name

        async def fails() -> None:
            raise ValueError("from asyncio")

        assert await island.call(where) == "asyncio-test"
        with pytest.raises(ValueError, match="from asyncio"):
            await island.call(fails)
        results = []

        async def many(i: int) -> None:
            async def square() -> int:
                await asyncio.sleep(0.001)
                return i * i

            results.append(await island.call(square))

        async with trio.open_nursery() as inner:
            for i in range(200):
                inner.start_soon(many, i)
        assert sorted(results) == sorted(i * i for i in range(200))
        nursery.cancel_scope.cancel()


async def test_cancelling_the_trio_side_cancels_the_asyncio_task() -> None:
    island = AsyncioIsland("test")
    cancelled = threading.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(island.run)

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with trio.move_on_after(0.2):
            await island.call(forever)
        await trio.to_thread.run_sync(cancelled.wait, 5)
        assert cancelled.is_set()
        nursery.cancel_scope.cancel()


async def test_the_trio_loop_keeps_running_while_asyncio_blocks() -> None:
    island = AsyncioIsland("test")
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(island.run)

        async def blocking() -> str:
            release.wait(5)  # a blocking call, as google-auth's token refresh is
            return "done"

        answered = trio.Event()

        async def caller() -> None:
            assert await island.call(blocking) == "done"
            answered.set()

        nursery.start_soon(caller)
        ticks = 0
        for _ in range(10):
            await trio.sleep(0.01)
            ticks += 1
        assert ticks == 10
        assert not answered.is_set()  # the asyncio side is still blocked
        release.set()
        await answered.wait()
        nursery.cancel_scope.cancel()


async def test_an_island_cannot_run_twice() -> None:
    island = AsyncioIsland("test")
    async with trio.open_nursery() as nursery:
        await nursery.start(island.run)
        with pytest.raises(RuntimeError, match="already running"):
            await island.run()
        nursery.cancel_scope.cancel()
