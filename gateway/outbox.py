"""A connection's bounded outbound buffer, drained by its writer task.

Entries are frames ready to send, or a store `Ticket` with a function that renders its
result as a frame once the commit is durable (how `sent` waits for the commit without
blocking the reader). Separately, a *doorbell* flag says the device's queue has new items.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from gateway.errors import Overloaded, StoreError
from gateway.store import Ticket

Frame = dict[str, Any]
Render = Callable[[Any], Frame]
OnError = Callable[[StoreError], Frame]


class Outbox:
    """Frames and pending commits bound for one connection, at most `limit` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: deque[Frame | tuple[Ticket[Any], Render, OnError]] = deque()
        self._queue_dirty = False
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, frame: Frame) -> None:
        """Queue a frame. Raises `Overloaded` if the buffer is full."""
        self._check_room()
        self._entries.append(frame)
        self._wakeup.set()

    def offer(self, frame: Frame) -> bool:
        """Queue an ephemeral frame if there is ample room; return False if it was dropped."""
        if len(self._entries) >= self.limit // 2:
            return False
        self._entries.append(frame)
        self._wakeup.set()
        return True

    def push_pending(self, ticket: Ticket[Any], render: Render, on_error: OnError) -> None:
        """Queue the frame that `render` makes of a ticket's result, once it is durable."""
        self._check_room()
        self._entries.append((ticket, render, on_error))
        self._wakeup.set()

    def ring(self) -> None:
        """The device's stored queue has new items."""
        self._queue_dirty = True
        self._wakeup.set()

    @property
    def rung(self) -> bool:
        """Whether the doorbell has been rung and not yet answered by a store read."""
        return self._queue_dirty

    def take_ring(self) -> bool:
        """Consume the doorbell; True if it had been rung."""
        dirty, self._queue_dirty = self._queue_dirty, False
        return dirty

    async def wait(self) -> None:
        """Wait until there are entries or the doorbell has been rung."""
        if not self._entries and not self._queue_dirty:
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def take_frames(self) -> list[Frame]:
        """Wait for the pending commits in order, then remove every entry and return the
        frames. Nothing is removed while waiting, so a writer cancelled in the wait (the
        connection is closing) leaves every frame for the flush before the close."""
        entries = self._entries
        i = 0
        while i < len(entries):
            entry = entries[i]
            if not isinstance(entry, dict) and not entry[0].done:
                await entry[0].wait()
            i += 1
        out: list[Frame] = []
        while entries:
            entry = entries.popleft()
            if isinstance(entry, dict):
                out.append(entry)
                continue
            ticket, render, on_error = entry
            try:
                out.append(render(ticket.outcome()))
            except StoreError as exc:
                out.append(on_error(exc))
        return out

    def _check_room(self) -> None:
        if len(self._entries) >= self.limit:
            raise Overloaded(f"outbound buffer full ({self.limit} frames)")
