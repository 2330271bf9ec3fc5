"""One heartbeat task for every connection of the process.

Every connection is pinged `interval` seconds after it joined and after each ping; one
that has not answered the previous ping by then is closed instead (protocol v1: "a
connection that sends no pong before the next ping is closed"). All connections share
one interval, so the due times are appended in increasing order and a FIFO of due times
is already sorted: the timer queue is a `DueQueue`, with no heap and no task per
connection. A connection that ends is forgotten at once (`discard`); its entry in the
queue is skipped when it comes up.
"""

from __future__ import annotations

from typing import Protocol

import trio

from gateway.due_queue import DueQueue


class Beating(Protocol):
    """What the heartbeat needs of a connection."""

    def heartbeat(self) -> bool:
        """The connection is due: ping it, or close it if the last ping went unanswered.

        Returns:
            True if it was pinged (and should be again), False if it is closing.
        """
        ...


class Heartbeat:
    """The process-wide heartbeat: `add` a connection once, `discard` it when it ends."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._members: dict[int, Beating] = {}
        self._due: DueQueue[int] = DueQueue(self._beat)

    def __len__(self) -> int:
        return len(self._members)

    def add(self, key: int, conn: Beating) -> None:
        """Start pinging `conn` (known by `key`) every `interval` seconds."""
        self._members[key] = conn
        self._due.add(trio.current_time() + self.interval, key)

    def discard(self, key: int) -> None:
        """Stop pinging the connection known by `key`."""
        self._members.pop(key, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping and time out connections until cancelled."""
        await self._due.run(task_status=task_status)

    def _beat(self, now: float, key: int) -> bool:
        """Ping the connection known by `key` (False if it was forgotten)."""
        conn = self._members.get(key)
        if conn is None:
            return False
        if conn.heartbeat():
            self._due.add(now + self.interval, key)
        else:
            del self._members[key]
        return True
