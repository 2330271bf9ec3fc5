"""Zombie sockets: connected devices that stopped answering, found by one task.

A phone whose app was suspended with its socket still open looks connected, so it gets
no wake-up; it would sit there until the heartbeat gives up on it, up to two heartbeat
intervals later. When a connection is handed an urgent message while it owes no other,
it notes the time (`urgent_since`) and is watched: anything received from the device
clears the note. If the note is unchanged `[push] ack_timeout` seconds later (no ack,
no frame, no pong, nothing), the waker is asked to rescue the device: an alert wake-up
as though it were offline.

Every connection shares one timeout, so the checks are queued in time order in a FIFO
(`DueQueue`); one task serves the whole process, and a connection that ends is skipped.
"""

from __future__ import annotations

from typing import Protocol

import trio

from gateway.due_queue import DueQueue
from gateway.wake import Waker


class Watched(Protocol):
    """What the watch reads of a connection."""

    @property
    def user(self) -> str:
        """The device's user."""
        ...

    @property
    def device(self) -> str:
        """The device."""
        ...

    @property
    def urgent_since(self) -> float | None:
        """When an urgent message was handed to it with nothing received since, if so
        (None once the connection has ended)."""
        ...


class AckWatch:
    """The process-wide watch: `watch` a connection when it notes `urgent_since`."""

    def __init__(self, timeout: float, waker: Waker) -> None:
        self.timeout = timeout
        self.waker = waker
        self.rescues = 0
        self._due: DueQueue[tuple[float, Watched]] = DueQueue(self._check)

    def watch(self, conn: Watched) -> None:
        """Check `conn` `timeout` seconds after the `urgent_since` it just noted."""
        since = conn.urgent_since
        if since is not None:
            self._due.add(since + self.timeout, (since, conn))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check connections as they come due, until cancelled."""
        await self._due.run(task_status=task_status)

    def _check(self, now: float, watched: tuple[float, Watched]) -> bool:
        """Rescue the device if nothing was received since the note it was watched for."""
        since, conn = watched
        if conn.urgent_since == since:
            self.rescues += 1
            self.waker.rescue(conn.user, conn.device)
        return True
