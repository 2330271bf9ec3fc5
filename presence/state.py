"""Who is online: devices per user, the offline grace period, last-seen and hiding.

`PresenceState` is the interface the gateway programs against; `MemoryPresence` is the
embedded implementation, plain code with times passed in (seconds on any monotonic clock
for deadlines, milliseconds since the epoch for `last_seen`). `MirrorPresence` fills in
the same interface for a cluster, mirroring what Redis holds (gateway/cluster_presence.py
keeps the mirror up to date from TTL heartbeats there).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PresenceItem:
    """What subscribers see of one user."""

    user: str
    online: bool
    last_seen: int | None


class PresenceState(Protocol):
    """Presence bookkeeping; every method returns the changes subscribers must hear of."""

    def connected(self, user: str, device: str, now: float, wall_ms: int) -> list[PresenceItem]:
        """A device of `user` connected."""
        ...

    def disconnected(self, user: str, device: str, now: float, wall_ms: int) -> list[PresenceItem]:
        """A device of `user` disconnected; offline follows after the grace period."""
        ...

    def expire(self, now: float) -> list[PresenceItem]:
        """Users whose grace period has run out by `now` go offline."""
        ...

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do."""
        ...

    def snapshot(self, user: str) -> PresenceItem:
        """The current view of one user, as subscribers may see it."""
        ...

    def set_hidden(self, user: str, hidden: bool) -> list[PresenceItem]:
        """Hide (or show) a user's presence from everyone."""
        ...


@dataclass(slots=True)
class _User:
    devices: set[str]
    online: bool = False
    last_seen: int | None = None
    offline_at: float | None = None  # deadline of the grace period, while one runs
    hidden: bool = False


class MemoryPresence:
    """In-process `PresenceState` with an offline grace period.

    A user is online while any device is connected. When the last one disconnects, the
    user stays online for `offline_grace` seconds; a reconnect within that window changes
    nothing that subscribers can see. `last_seen` is the time of that last disconnect.
    """

    # Every user seen stays in memory (their last_seen is what subscribers are shown);
    # fleets too large for that use the Redis implementation.

    def __init__(self, offline_grace: float) -> None:
        self.offline_grace = offline_grace
        self._users: dict[str, _User] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap; stale entries are skipped

    def connected(self, user: str, device: str, now: float, wall_ms: int) -> list[PresenceItem]:
        """A device of `user` connected."""
        state = self._users.setdefault(user, _User(set()))
        state.devices.add(device)
        state.offline_at = None
        if state.online:
            return []  # already online, or within the grace period: no flap
        state.online = True
        return self._visible(user, state)

    def disconnected(self, user: str, device: str, now: float, wall_ms: int) -> list[PresenceItem]:
        """A device of `user` disconnected; offline follows after the grace period."""
        state = self._users.get(user)
        if state is None:
            return []
        state.devices.discard(device)
        if not state.devices and state.online:
            state.last_seen = wall_ms
            state.offline_at = now + self.offline_grace
            heapq.heappush(self._deadlines, (state.offline_at, user))
        return []

    def expire(self, now: float) -> list[PresenceItem]:
        """Users whose grace period has run out by `now` go offline."""
        changes: list[PresenceItem] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, user = heapq.heappop(self._deadlines)
            state = self._users.get(user)
            if state is None or state.offline_at != deadline:
                continue  # reconnected meanwhile, or a newer deadline replaced this one
            state.online = False
            state.offline_at = None
            changes += self._visible(user, state)
        return changes

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do."""
        while self._deadlines:
            deadline, user = self._deadlines[0]
            state = self._users.get(user)
            if state is not None and state.offline_at == deadline:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    def snapshot(self, user: str) -> PresenceItem:
        """The current view of one user, as subscribers may see it."""
        state = self._users.get(user)
        if state is None or state.hidden:
            return PresenceItem(user, False, None)
        return _item(user, state)

    def set_hidden(self, user: str, hidden: bool) -> list[PresenceItem]:
        """Hide (or show) a user's presence; subscribers see the change like any other."""
        state = self._users.setdefault(user, _User(set()))
        if state.hidden == hidden:
            return []
        state.hidden = hidden
        if hidden:
            return [PresenceItem(user, False, None)]
        return [_item(user, state)]

    def _visible(self, user: str, state: _User) -> list[PresenceItem]:
        if state.hidden:
            return []
        return [_item(user, state)]


def _item(user: str, state: _User) -> PresenceItem:
    """Online users carry no last_seen: they are being seen now."""
    return PresenceItem(user, state.online, None if state.online else state.last_seen)


@dataclass(slots=True)
class _Seen:
    online: bool
    last_seen: int | None
    hidden: bool


class MirrorPresence:
    """`PresenceState` for a cluster: a local mirror of what a shared store says.

    Many nodes share the truth (in Redis: which devices are connected where, grace
    periods, last-seen, hidden flags). This class only remembers the last view of each
    user it was told about through `update`, and turns differences into the changes
    subscribers must hear of. The grace period runs in the shared store, so `expire` has
    nothing to do here. A device connecting on this node makes its user online at once,
    without waiting for the shared store to be read back.

    `on_hidden` is called with (user, hidden) when a user hides or shows their presence,
    for the shared store to record.
    """

    # The mirror forgets everyone past this many users (they are read again on demand).
    MAX_USERS = 100_000

    def __init__(self, on_hidden: Callable[[str, bool], None] = lambda user, hidden: None) -> None:
        self._users: dict[str, _Seen] = {}
        self.on_hidden = on_hidden

    def known(self) -> list[str]:
        """The users in the mirror."""
        return list(self._users)

    def knows(self, user: str) -> bool:
        """Whether `user` is in the mirror (someone here may be watching them)."""
        return user in self._users

    def update(
        self, user: str, online: bool, last_seen: int | None, hidden: bool
    ) -> list[PresenceItem]:
        """The shared store's view of `user`; returns what subscribers must hear."""
        before = self._users.get(user)
        if before is None and len(self._users) >= self.MAX_USERS:
            self._users.clear()
        self._users[user] = now = _Seen(online, last_seen, hidden)
        if before is None:
            return []  # nobody here was shown anything of this user yet
        if _visible(user, before) == _visible(user, now):
            return []
        return [_visible(user, now)]

    def connected(self, user: str, device: str, now: float, wall_ms: int) -> list[PresenceItem]:
        """A device of `user` connected to this node: online at once."""
        state = self._users.get(user)
        if state is None:
            self._users[user] = _Seen(True, None, False)
            return [PresenceItem(user, True, None)]
        if state.online:
            return []
        state.online = True
        return [] if state.hidden else [PresenceItem(user, True, None)]

    def disconnected(self, user: str, device: str, now: float, wall_ms: int) -> list[PresenceItem]:
        """Offline is decided by the shared store once its grace period ends."""
        return []

    def expire(self, now: float) -> list[PresenceItem]:
        """Nothing expires locally: grace periods run in the shared store."""
        return []

    def next_deadline(self) -> float | None:
        """No local deadlines."""
        return None

    def snapshot(self, user: str) -> PresenceItem:
        """The last view of `user` (offline if never read)."""
        state = self._users.get(user)
        if state is None:
            return PresenceItem(user, False, None)
        return _visible(user, state)

    def set_hidden(self, user: str, hidden: bool) -> list[PresenceItem]:
        """Hide (or show) a user; the shared store is told through `on_hidden`."""
        self.on_hidden(user, hidden)
        state = self._users.setdefault(user, _Seen(False, None, False))
        if state.hidden == hidden:
            return []
        before = _visible(user, state)
        state.hidden = hidden
        after = _visible(user, state)
        return [] if before == after else [after]


def _visible(user: str, state: _Seen) -> PresenceItem:
    if state.hidden:
        return PresenceItem(user, False, None)
    return PresenceItem(user, state.online, None if state.online else state.last_seen)
