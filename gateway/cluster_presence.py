"""Presence across a cluster: keeps this node's `MirrorPresence` in step with the shared
store.

The shared store holds the truth: a user is online while any of their devices is claimed
by a live node (claims have TTLs, see gateway/cluster.py) or while the grace period after
their last disconnect runs. Every node hears of connects, disconnects and hidden changes
as bus events and reads back the users it has in its mirror; a grace period ending is
read back when it ends. A user being read for the first time (a subscription to someone
not in the mirror yet) is read again if an event about them arrives meanwhile: that read
may have been answered before the change. A periodic re-read of every mirrored user
catches what no event announces: a dead node's claims expiring, or an event lost while
the bus reconnected.
"""

from __future__ import annotations

import heapq
import logging

import trio

from gateway.errors import StoreError
from gateway.store.bus import ClusterBus, Event
from presence.service import PresenceService
from presence.state import MirrorPresence, PresenceItem

log = logging.getLogger(__name__)

READ_CHUNK = 1000


class ClusterPresence:
    """Reads presence from the shared store into a mirror, and writes hidden flags to it."""

    def __init__(self, bus: ClusterBus, *, reconcile: float) -> None:
        self.bus = bus
        self.mirror = MirrorPresence(on_hidden=self.on_hidden)  # the service's state
        self.reconcile = reconcile
        self._dirty: set[str] = set()
        self._reading: dict[str, int] = {}  # users in a `refresh` read: how many reads
        self._stirred: set[str] = set()  # of those, the ones an event was about meanwhile
        self._hides: list[tuple[str, bool]] = []
        self._rechecks: list[tuple[float, str]] = []  # heap of grace-period ends
        self._wakeup = trio.Event()

    def on_event(self, event: Event) -> None:
        """A cluster event about a user: read them again if anyone here may care."""
        if event.user in self._reading:
            self._stirred.add(event.user)  # read again once that read is in the mirror
        elif self.mirror.knows(event.user):
            self._dirty.add(event.user)
            self._wakeup.set()

    def on_hidden(self, user: str, hidden: bool) -> None:
        """A user here hid or showed their presence: record it in Redis."""
        self._hides.append((user, hidden))
        self._wakeup.set()

    async def refresh(self, users: tuple[str, ...]) -> list[PresenceItem]:
        """Read `users` from Redis now (before a snapshot of them is answered); return the
        changes to the mirror.

        Raises:
            StoreError: Redis is unavailable.
        """
        for user in users:
            self._reading[user] = self._reading.get(user, 0) + 1
        try:
            return await self._read(list(users))
        finally:
            for user in users:
                left = self._reading.pop(user) - 1
                if left:
                    self._reading[user] = left
                elif user in self._stirred:
                    self._stirred.discard(user)
                    self._dirty.add(user)
                    self._wakeup.set()

    async def run(
        self,
        service: PresenceService,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write hides, read back changed users and due grace periods, and re-read every
        mirrored user each `reconcile` seconds, until cancelled; the changes go to
        `service`'s subscribers."""
        task_status.started()
        next_reconcile = trio.current_time() + self.reconcile
        while True:
            recheck = self._rechecks[0][0] if self._rechecks else next_reconcile
            deadline = min(next_reconcile, recheck)
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            now = trio.current_time()
            users = set(self._dirty)
            self._dirty.clear()
            while self._rechecks and self._rechecks[0][0] <= now:
                users.add(heapq.heappop(self._rechecks)[1])
            if now >= next_reconcile:
                users.update(self.mirror.known())
                next_reconcile = now + self.reconcile
            try:
                await self._write_hides()
                for start in range(0, len(users), READ_CHUNK):
                    chunk = sorted(users)[start : start + READ_CHUNK]
                    changes = await self._read(chunk)
                    if changes:
                        service.apply(changes)
            except StoreError as exc:
                log.warning("presence not read from redis: %s", exc)
                self._dirty.update(users)  # again on the next round
                await trio.sleep(1)

    async def _write_hides(self) -> None:
        hides, self._hides = self._hides, []
        if hides:
            try:
                await self.bus.set_hidden(hides)
            except StoreError:
                self._hides = hides + self._hides
                raise

    async def _read(self, users: list[str]) -> list[PresenceItem]:
        records = await self.bus.read_presence(users) if users else []
        changes: list[PresenceItem] = []
        now = trio.current_time()
        for user, record in zip(users, records, strict=True):
            if record is None:
                continue
            if not record.connected and record.grace_ms > 0:
                heapq.heappush(self._rechecks, (now + record.grace_ms / 1000, user))
            online = record.connected > 0 or record.grace_ms > 0
            changes += self.mirror.update(user, online, record.last_seen, record.hidden)
        return changes
