"""The Trio side of presence: one task that runs the clocks of the plain-code parts.

`PresenceService` is told about connects, disconnects, subscriptions, client state and
typing by the gateway's connections, and calls back `deliver` with the presence items due
to a subscriber and `relay_typing` with typing indicators; how they look on the wire is
the caller's business. One task sleeps until the next deadline among grace periods, batch
windows and typing expiries.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable

import trio

from presence.fanout import Fanout
from presence.state import PresenceItem, PresenceState
from presence.typing import TypingTracker

log = logging.getLogger(__name__)

# Under overload, presence detail is coarsened: the batch window grows by this factor, so
# each subscriber gets fewer, more merged frames.
COARSEN_FACTOR = 8

#: Hands a subscriber the changes due to it; False if it has no room for them now.
Deliver = Callable[[int, list[PresenceItem]], bool]
RelayTyping = Callable[[str, str, str, bool], None]  # sender, sender device, target, on


class PresenceService:
    """Presence, subscriptions and typing for one gateway process."""

    def __init__(
        self,
        state: PresenceState,
        fanout: Fanout,
        typing: TypingTracker,
        *,
        deliver: Deliver,
        relay_typing: RelayTyping,
        wall_ms: Callable[[], int],
        overloaded: Callable[[], bool] = lambda: False,
        shed: Counter[str] | None = None,
        refresh: Callable[[tuple[str, ...]], Awaitable[list[PresenceItem]]] | None = None,
    ) -> None:
        self.state = state
        self.fanout = fanout
        self.typing_tracker = typing
        self._deliver = deliver
        self._relay_typing = relay_typing
        self._wall_ms = wall_ms
        self._overloaded = overloaded
        self._refresh = refresh
        self._base_batch = fanout.batch
        self._wakeup = trio.Event()
        self.frames_sent = 0
        self.shed: Counter[str] = Counter() if shed is None else shed

    # -- events from connections ------------------------------------------------------------

    def device_connected(self, user: str, device: str) -> None:
        """A device authenticated."""
        self._publish(self.state.connected(user, device, trio.current_time(), self._wall_ms()))

    def device_disconnected(self, user: str, device: str) -> None:
        """A device's connection ended."""
        now = trio.current_time()
        self._publish(self.state.disconnected(user, device, now, self._wall_ms()))
        for sender, sender_device, target in self.typing_tracker.forget_device(user, device):
            self._relay_typing(sender, sender_device, target, False)
        self._wakeup.set()  # a grace period started

    def add_subscriber(self, sub: int, *, active: bool) -> None:
        """A connection that may subscribe."""
        self.fanout.add_subscriber(sub, active=active)

    def remove_subscriber(self, sub: int) -> None:
        """A connection ended: its subscriptions end with it."""
        self.fanout.remove_subscriber(sub)

    async def refresh(self, users: tuple[str, ...]) -> None:
        """Bring the state of `users` up to date before a snapshot of them (a no-op unless
        the state mirrors a shared store)."""
        if self._refresh is not None:
            self._publish(await self._refresh(users))

    def apply(self, items: list[PresenceItem]) -> None:
        """Changes that arrived from elsewhere (another node), for subscribers here."""
        self._publish(items)

    def subscribe(self, sub: int, users: tuple[str, ...]) -> list[PresenceItem]:
        """Watch users; returns the snapshot of them to answer with, in the order asked.

        Raises:
            presence.fanout.SubscriptionLimit: Past the per-connection limit.
        """
        self.fanout.subscribe(sub, users, trio.current_time())
        self.frames_sent += 1
        return [self.state.snapshot(user) for user in users]

    def unsubscribe(self, sub: int, users: tuple[str, ...]) -> None:
        """Stop watching users."""
        self.fanout.unsubscribe(sub, users)

    def set_active(self, sub: int, active: bool) -> None:
        """The subscriber's client state changed."""
        self.fanout.set_active(sub, active, trio.current_time())
        self._wakeup.set()

    def set_hidden(self, user: str, hidden: bool) -> None:
        """Hide or show a user's presence."""
        self._publish(self.state.set_hidden(user, hidden))

    def typing(self, sender: str, device: str, target: str, on: bool) -> None:
        """A typing indicator from a device; relayed unless rate-limited or shed."""
        if on and self._overloaded():
            self.shed["typing"] += 1
            return
        if self.typing_tracker.typing(sender, device, target, on, trio.current_time()):
            self._relay_typing(sender, device, target, on)
            if on:
                self._wakeup.set()
        elif on:
            self.shed["typing_rate"] += 1

    # -- the clock task -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Release batches, expire grace periods and typing, forever."""
        task_status.started()
        while True:
            self._tick(trio.current_time())
            deadlines = [
                d
                for d in (
                    self.state.next_deadline(),
                    self.fanout.next_deadline(),
                    self.typing_tracker.next_deadline(),
                )
                if d is not None
            ]
            with trio.move_on_at(min(deadlines, default=math.inf)):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    def _tick(self, now: float) -> None:
        overloaded = self._overloaded()
        self.fanout.batch = self._base_batch * (COARSEN_FACTOR if overloaded else 1)
        self.fanout.publish(self.state.expire(now), now)
        for sub, items in self.fanout.due(now):
            if self._deliver(sub, items):
                self.frames_sent += 1
            else:
                self.shed["presence_deferred"] += 1
                self.fanout.restore(sub, items, now)
        for sender, sender_device, target in self.typing_tracker.expire(now):
            self._relay_typing(sender, sender_device, target, False)

    def _publish(self, items: list[PresenceItem]) -> None:
        if items:
            self.fanout.publish(items, trio.current_time())
            self._wakeup.set()
