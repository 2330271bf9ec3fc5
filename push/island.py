"""An asyncio event loop on its own thread, for the asyncio-only push libraries.

aioapns and firebase-admin only run on asyncio, and firebase-admin refreshes its OAuth
token with blocking `requests` calls inside that loop. Each provider therefore gets its own
`AsyncioIsland`: a thread running an asyncio loop, owned by a Trio task. Trio
code awaits coroutines on it with `call`, which never blocks the Trio thread: the result
comes back through `TrioToken.run_sync_soon`, and cancelling the Trio side cancels the
asyncio task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncioIsland:
    """A service hosting one asyncio loop on a dedicated thread.

    Start it with ``await nursery.start(island.run)``; it stops the loop and joins the
    thread when cancelled. `call` may be used between those two points.
    """

    def __init__(
        self, name: str, *, on_close: Callable[[], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        self.name = name
        self._on_close = on_close  # run on the loop before it stops (closing clients)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._calls: collections.deque[_Call] = collections.deque()  # to start, on the loop
        self._results: collections.deque[_Call] = collections.deque()  # finished, for Trio
        self._start_scheduled = False
        self._deliver_scheduled = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (only while the service runs)."""
        if self._loop is None:
            raise RuntimeError(f"{self.name}: the asyncio island is not running")
        return self._loop

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the loop thread until cancelled, then stop it and wait for the thread.

        Raises:
            RuntimeError: The island is already running.
        """
        if self._loop is not None:
            raise RuntimeError(f"{self.name}: the asyncio island is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=main, name=f"asyncio-{self.name}", daemon=True)
        thread.start()
        await trio.to_thread.run_sync(ready.wait)
        self._loop = loop
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                if self._on_close is not None:
                    try:
                        await self.call(self._on_close)
                    except Exception as exc:
                        log.warning("%s: closing the asyncio clients failed: %s", self.name, exc)
            self._loop = None
            loop.call_soon_threadsafe(loop.stop)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await trio.to_thread.run_sync(thread.join)

    async def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``factory()`` on the loop and wait for its result without blocking Trio.

        Calls and results cross between the threads in batches: under load, one wake-up of
        the asyncio loop starts every call queued since the last one, and one Trio callback
        delivers every result that completed in between.

        Raises:
            Whatever the coroutine raised; `trio.Cancelled` cancels the asyncio task.
        """
        loop = self.loop
        call = _Call(factory, trio.Event())
        if self._trio_token is None:
            self._trio_token = trio.lowlevel.current_trio_token()
        self._calls.append(call)
        if not self._start_scheduled:
            self._start_scheduled = True
            loop.call_soon_threadsafe(self._start_calls)
        try:
            await call.done.wait()
        except BaseException:
            call.cancelled = True
            task = call.task
            if task is not None:
                with contextlib.suppress(RuntimeError):  # the loop already closed: nothing runs
                    loop.call_soon_threadsafe(task.cancel)
            raise
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    def _start_calls(self) -> None:
        """On the loop: start every queued call."""
        self._start_scheduled = False
        calls = self._calls
        while calls:
            call = calls.popleft()
            if call.cancelled:
                continue
            task = asyncio.ensure_future(call.factory())
            call.task = task
            task.add_done_callback(partial(self._finished, call))

    def _finished(self, call: _Call, task: asyncio.Future[Any]) -> None:
        """On the loop: hand a result back to Trio (batched with its neighbours)."""
        if task.cancelled():
            call.error = None  # the Trio side was cancelled and is not waiting any more
        elif (error := task.exception()) is not None:
            call.error = error
        else:
            call.result = task.result()
        self._results.append(call)
        if not self._deliver_scheduled and self._trio_token is not None:
            self._deliver_scheduled = True
            with contextlib.suppress(trio.RunFinishedError):
                self._trio_token.run_sync_soon(self._deliver)

    def _deliver(self) -> None:
        """In Trio: wake the callers whose calls finished."""
        self._deliver_scheduled = False
        results = self._results
        while results:
            results.popleft().done.set()


class _Call:
    """One coroutine call crossing from Trio to the island and back."""

    __slots__ = ("cancelled", "done", "error", "factory", "result", "task")

    def __init__(self, factory: Callable[[], Coroutine[Any, Any, Any]], done: trio.Event) -> None:
        self.factory = factory
        self.done = done
        self.cancelled = False
        self.task: asyncio.Future[Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
