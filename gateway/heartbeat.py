"""One heartbeat task for every connection of the process.

Every connection is pinged `interval` seconds after it joined and after each ping; one
that has not answered the previous ping by then is closed instead (protocol v1: "a
connection that sends no pong before the next ping is closed"). All connections share
one interval, so the due times are appended in increasing order and a FIFO of due times
is already sorted: the timer queue is a deque, popped from the front, with no heap and
no task per connection. A connection that ends is forgotten at once (`discard`); its
entry in the queue is skipped when it comes up.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import trio

# Due connections handled between two checkpoints, so that a burst of heartbeats (many
# connections that joined together) never holds the event loop for long.
BURST = 500


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
        self._due: deque[tuple[float, int]] = deque()
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self._members)

    def add(self, key: int, conn: Beating) -> None:
        """Start pinging `conn` (known by `key`) every `interval` seconds."""
        self._members[key] = conn
        self._due.append((trio.current_time() + self.interval, key))
        self._wakeup.set()

    def discard(self, key: int) -> None:
        """Stop pinging the connection known by `key`."""
        self._members.pop(key, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping and time out connections until cancelled."""
        task_status.started()
        due, members = self._due, self._members
        while True:
            if not due:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            await trio.sleep_until(due[0][0])
            now = trio.current_time()
            handled = 0
            while due and due[0][0] <= now and handled < BURST:
                _, key = due.popleft()
                conn = members.get(key)
                if conn is None:
                    continue
                handled += 1
                if conn.heartbeat():
                    due.append((now + self.interval, key))
                else:
                    del members[key]
            await trio.lowlevel.checkpoint()
