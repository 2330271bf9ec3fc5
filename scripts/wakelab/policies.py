"""The policies the lab compares; each answers the calls the gateway makes of a policy.

- ``v1``: the rules of protocol v1 as first shipped: urgent and background cooldowns and
  the linger check, with no alert retries, no background budget and no zombie rescue;
- ``new``: `push.policy.WakePolicy` with its defaults (alert retries, the background
  budget) and zombie rescue;
- ``signal``: a baseline after Signal-Server's published behaviour: an alert at once for
  every urgent message, at most one background push per 20 minutes whatever happens in
  between, one push a minute after a close that left items behind, and no retries.

All run on the lab's virtual clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from push.policy import Decision, LingerCheck, WakeKind, WakePolicy, WakeRules, WakeUp

Clock = Callable[[], float]

V1_RULES = WakeRules(alert_retries=0, background_per_hour=0)
SIGNAL_BACKGROUND_EVERY = 20 * 60.0
SIGNAL_LINGER = 60.0


class SignalPolicy:
    """The Signal-Server-like baseline (see the module docstring)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._online: set[tuple[str, str]] = set()
        self._last_background: dict[tuple[str, str], float] = {}
        self._timers: list[tuple[float, int, tuple[str, str]]] = []
        self._checks: dict[tuple[str, str], float] = {}
        self._seq = itertools.count()

    def stored(self, user: str, device: str, urgent: bool) -> WakeUp | None:
        """An alert for every urgent item; background at most once per 20 minutes."""
        key = (user, device)
        if key in self._online:
            return None
        if urgent:
            return WakeUp(user, device, WakeKind.ALERT, "urgent")
        now = self._clock()
        last = self._last_background.get(key)
        if last is not None and now - last < SIGNAL_BACKGROUND_EVERY:
            return None
        self._last_background[key] = now
        return WakeUp(user, device, WakeKind.BACKGROUND, "background")

    def connected(self, user: str, device: str) -> None:
        """Online: nothing is pushed to it."""
        self._online.add((user, device))
        self._checks.pop((user, device), None)

    def disconnected(self, user: str, device: str) -> None:
        """A push a minute later, if it left items behind."""
        key = (user, device)
        self._online.discard(key)
        when = self._clock() + SIGNAL_LINGER
        self._checks[key] = when
        heapq.heappush(self._timers, (when, next(self._seq), key))

    def linger_checked(self, user: str, device: str, unacked: int, urgent: bool) -> WakeUp | None:
        """The push after a close: an alert if an urgent message waits."""
        if not unacked or (user, device) in self._online:
            return None
        if urgent:
            return WakeUp(user, device, WakeKind.ALERT, "linger")
        return self.stored(user, device, False)

    def zombie(self, user: str, device: str) -> WakeUp | None:
        """No zombie rescue."""
        return None

    def next_deadline(self) -> float | None:
        """The next linger check."""
        while self._timers:
            when, _, key = self._timers[0]
            if self._checks.get(key) == when:
                return when
            heapq.heappop(self._timers)
        return None

    def due(self) -> list[Decision]:
        """Linger checks whose minute has passed."""
        now = self._clock()
        out: list[Decision] = []
        while self._timers and self._timers[0][0] <= now:
            when, _, key = heapq.heappop(self._timers)
            if self._checks.get(key) == when:
                del self._checks[key]
                out.append(LingerCheck(*key))
        return out


POLICIES = ("v1", "new", "signal")


def make_policy(name: str, clock: Clock) -> WakePolicy | SignalPolicy:
    """The policy called `name`, on `clock`."""
    if name == "v1":
        return WakePolicy(V1_RULES, clock)
    if name == "new":
        return WakePolicy(WakeRules(), clock)
    if name == "signal":
        return SignalPolicy(clock)
    raise ValueError(f"unknown policy {name!r}")


def rescues_zombies(name: str) -> bool:
    """Whether the policy's gateway watches for zombie sockets."""
    return name == "new"
