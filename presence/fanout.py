"""Subscriptions and batched, coalesced presence fan-out, free of I/O.

Each subscriber gets at most one `presence` frame per batch window: the first change after
a quiet window goes out at once, later ones wait for the window to end, and several
changes of one user within it collapse into the latest. While a subscriber's device is
inactive, its changes are held (latest per user) until it becomes active again or
`hold_limit` users are pending.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from presence.state import PresenceItem

HOLD_LIMIT = 100


class SubscriptionLimit(ValueError):
    """A subscriber asked to watch more users than it may."""


@dataclass(slots=True)
class _Subscriber:
    active: bool
    users: set[str] = field(default_factory=set)
    pending: dict[str, PresenceItem] = field(default_factory=dict)
    next_allowed: float = float("-inf")  # earliest time of the next frame
    scheduled: float | None = None  # time of its live entry in the heap, if any


class Fanout:
    """Who watches whom, and what each subscriber is owed, with batching and holds."""

    def __init__(self, batch: float, *, max_watch: int, hold_limit: int = HOLD_LIMIT) -> None:
        self.batch = batch
        self.max_watch = max_watch
        self.hold_limit = hold_limit
        self._subs: dict[int, _Subscriber] = {}
        self._watchers: dict[str, set[int]] = {}
        self._heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._subs)

    def add_subscriber(self, sub: int, *, active: bool) -> None:
        """Register a connection that may subscribe."""
        self._subs.setdefault(sub, _Subscriber(active))

    def remove_subscriber(self, sub: int) -> None:
        """Forget a connection and all its subscriptions."""
        state = self._subs.pop(sub, None)
        if state is not None:
            for user in state.users:
                self._unwatch(user, sub)

    def subscribe(self, sub: int, users: tuple[str, ...], now: float) -> None:
        """Watch `users`. The caller answers with a snapshot, which counts as this
        window's frame.

        Raises:
            SubscriptionLimit: The subscriber would watch more than `max_watch` users;
                nothing changes.
        """
        state = self._subs[sub]
        new = [u for u in users if u not in state.users]
        if len(state.users) + len(new) > self.max_watch:
            raise SubscriptionLimit(f"at most {self.max_watch} users per connection")
        for user in new:
            state.users.add(user)
            self._watchers.setdefault(user, set()).add(sub)
        for user in users:
            state.pending.pop(user, None)  # the snapshot supersedes anything pending
        state.next_allowed = now + self.batch

    def unsubscribe(self, sub: int, users: tuple[str, ...]) -> None:
        """Stop watching `users`."""
        state = self._subs.get(sub)
        if state is None:
            return
        for user in users:
            if user in state.users:
                state.users.discard(user)
                state.pending.pop(user, None)
                self._unwatch(user, sub)

    def publish(self, items: list[PresenceItem], now: float) -> None:
        """Record changes for everyone watching the users concerned."""
        for item in items:
            for sub in self._watchers.get(item.user, ()):
                state = self._subs[sub]
                state.pending[item.user] = item
                self._schedule(sub, state, now)

    def set_active(self, sub: int, active: bool, now: float) -> None:
        """The subscriber's device became active or inactive."""
        state = self._subs.get(sub)
        if state is None or state.active == active:
            return
        state.active = active
        self._schedule(sub, state, now)

    def restore(self, sub: int, items: list[PresenceItem], now: float) -> None:
        """Take back a frame that could not be sent; newer pending changes win."""
        state = self._subs.get(sub)
        if state is None:
            return
        for item in items:
            if item.user in state.users:
                state.pending.setdefault(item.user, item)
        state.next_allowed = now + self.batch
        self._schedule(sub, state, now)

    def due(self, now: float) -> list[tuple[int, list[PresenceItem]]]:
        """Take the frames that may go out now: (subscriber, items) pairs."""
        out: list[tuple[int, list[PresenceItem]]] = []
        while self._heap and self._heap[0][0] <= now:
            when, sub = heapq.heappop(self._heap)
            state = self._subs.get(sub)
            if state is None or state.scheduled != when:
                continue
            state.scheduled = None
            if not self._releasable(state):
                continue
            if state.next_allowed > now:
                self._schedule(sub, state, now)
                continue
            out.append((sub, list(state.pending.values())))
            state.pending.clear()
            state.next_allowed = now + self.batch
        return out

    def next_deadline(self) -> float | None:
        """When `due` next has something to release."""
        while self._heap:
            when, sub = self._heap[0]
            state = self._subs.get(sub)
            if state is not None and state.scheduled == when:
                return when
            heapq.heappop(self._heap)
        return None

    def pending_users(self, sub: int) -> int:
        """How many users have changes waiting for this subscriber."""
        state = self._subs.get(sub)
        return 0 if state is None else len(state.pending)

    def _releasable(self, state: _Subscriber) -> bool:
        return bool(state.pending) and (state.active or len(state.pending) >= self.hold_limit)

    def _schedule(self, sub: int, state: _Subscriber, now: float) -> None:
        if not self._releasable(state):
            return
        when = max(now, state.next_allowed)
        if state.scheduled is not None and state.scheduled <= when:
            return
        state.scheduled = when
        heapq.heappush(self._heap, (when, sub))

    def _unwatch(self, user: str, sub: int) -> None:
        watchers = self._watchers.get(user)
        if watchers is not None:
            watchers.discard(sub)
            if not watchers:
                del self._watchers[user]
