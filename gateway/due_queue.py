"""Entries that come due in the order they were added, served by one task.

When every entry of a queue waits the same time (one heartbeat interval, one ack timeout),
due times are appended in increasing order, so a FIFO is already sorted: a deque popped
from the front, with no heap and no task per entry. The task sleeps until the head is
due, hands every due entry to the queue's handler, a burst at a time, and sleeps again;
with nothing queued it waits for the next `add`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")

# Entries handled between two checkpoints, so that a burst of entries due together (many
# connections that joined together) never holds the event loop for long.
BURST = 500


class DueQueue(Generic[T]):
    """A FIFO of (due time, entry); `run` hands each entry to `handle` once it is due.

    Args:
        handle: Called with the current time and one due entry. It returns True if it
            handled the entry, which counts towards the `BURST` handled between two
            checkpoints, or False if it skipped it (what the entry stood for is gone).
            It may `add` entries, the same one again included.
    """

    def __init__(self, handle: Callable[[float, T], bool]) -> None:
        self._handle = handle
        self._due: deque[tuple[float, T]] = deque()
        self._wakeup = trio.Event()

    def add(self, when: float, entry: T) -> None:
        """Queue `entry` to be handled at Trio time `when`.

        Entries are handled in the order they were added: one comes due no earlier than
        the entries before it, so `when` should be no earlier than theirs.
        """
        self._due.append((when, entry))
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handle entries as they come due, until cancelled."""
        task_status.started()
        due, handle = self._due, self._handle
        while True:
            if not due:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            await trio.sleep_until(due[0][0])
            now = trio.current_time()
            handled = 0
            while due and due[0][0] <= now and handled < BURST:
                _, entry = due.popleft()
                if handle(now, entry):
                    handled += 1
            await trio.lowlevel.checkpoint()
