"""Presence across a cluster: keeps this node's `MirrorPresence` in step with Redis.

Redis holds the truth: a user is online while any of their devices is claimed by a live
node (claims have TTLs, see gateway/cluster.py) or while the grace period after their
last disconnect runs (``P:grace``, a key with a TTL). Every node hears of connects,
disconnects and hidden changes on the events channel and reads back the users it has in
its mirror; a grace period ending is read back when it ends. A periodic re-read of every
mirrored user catches what no event announces: a dead node's claims expiring, or an
event lost while the channel reconnected.
"""

from __future__ import annotations

import heapq
import logging

import trio

from gateway.errors import StoreError
from gateway.store.redis import Call, RedisStore
from gateway.store.redis_scripts import prefix, wire_device
from presence.service import PresenceService
from presence.state import MirrorPresence, PresenceItem

log = logging.getLogger(__name__)

READ_CHUNK = 1000


class ClusterPresence:
    """Reads presence from Redis into a mirror, and writes hidden flags to it."""

    def __init__(self, store: RedisStore, *, reconcile: float) -> None:
        self.store = store
        self.mirror = MirrorPresence(on_hidden=self.on_hidden)  # the service's state
        self.reconcile = reconcile
        self._dirty: set[str] = set()
        self._hides: list[tuple[str, bool]] = []
        self._rechecks: list[tuple[float, str]] = []  # heap of grace-period ends
        self._wakeup = trio.Event()

    def on_event(self, kind: str, user: str, device: str) -> None:
        """A cluster event about `user`: read them again if anyone here may care."""
        if self.mirror.knows(user):
            self._dirty.add(user)
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
        return await self._read(list(users))

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
        calls: list[Call] = [
            ("hide", [f"{prefix(user)}:hidden"], ["1" if hidden else "0", wire_device(user, "")])
            for user, hidden in hides
        ]
        if calls:
            try:
                await self.store.run_scripts(calls)
            except StoreError:
                self._hides = hides + self._hides
                raise

    async def _read(self, users: list[str]) -> list[PresenceItem]:
        calls: list[Call] = []
        for user in users:
            p = prefix(user)
            keys = [f"{p}:devs", f"{p}:grace", f"{p}:seen", f"{p}:hidden"]
            calls.append(("presence", keys, [p]))
        answers = await self.store.run_scripts(calls) if calls else []
        changes: list[PresenceItem] = []
        now = trio.current_time()
        for user, answer in zip(users, answers, strict=True):
            if isinstance(answer, Exception):
                log.warning("presence of %s not read: %s", user, answer)
                continue
            connected, grace_ms, seen, hidden = answer
            if not connected and grace_ms > 0:
                heapq.heappush(self._rechecks, (now + grace_ms / 1000, user))
            online = connected > 0 or grace_ms > 0
            last_seen = int(seen) if seen else None
            changes += self.mirror.update(user, online, last_seen, hidden == 1)
        return changes
