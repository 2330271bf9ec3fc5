"""Deliveries are written once the commit that made them has rung every doorbell.

A commit rings the doorbell of each item it stored, one after another, inside the store's
writer task. A device handed several items by one commit would get one WebSocket message,
one write and then one ack per item if each were written on the spot: the sending devices
of a group message, when its members' acks come back, get a receipt per member device in
each commit. Instead each connection handed items is noted here once, and one task of
the process writes them, each connection's output as one message, as soon as the
writer task yields: right after the commit's doorbells, with no time added.
"""

from __future__ import annotations

from typing import Protocol

import trio


class Flushable(Protocol):
    """A connection with deliveries queued and not yet written."""

    def flush_deliveries(self) -> None:
        """Write what is queued (or leave it to the connection's own writer)."""
        ...


class DeliveryFlush:
    """The process's one writer of deliveries handed over by commits."""

    def __init__(self) -> None:
        self._due: list[Flushable] = []
        self._wakeup = trio.Event()

    def add(self, conn: Flushable) -> None:
        """Have `conn` write its queued output once the current task yields; a connection
        is added at most once until then (it keeps the flag)."""
        if not self._due:
            self._wakeup.set()
        self._due.append(conn)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write for the connections added, batch after batch, until cancelled."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            due, self._due = self._due, []
            for conn in due:
                conn.flush_deliveries()
