"""Whether wake-ups work: how soon a woken device connects, and which wake-ups go unanswered.

Every wake-up a provider accepted waits for its device's next connection (on any node:
the cluster link reports connects on other nodes too). A connection within
`ANSWER_WINDOW` seconds is observed in the histogram by provider and kind; a wake-up
that saw none by then counts as unanswered. Only the latest wake-up of a device waits.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from prometheus_client import Histogram

ANSWER_WINDOW = 60.0
WAKE_TO_CONNECT_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)


class WakeAnswers:
    """Wake-ups waiting for their device to connect; `clock` is in seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.latency = Histogram(
            "gateway_push_wake_to_connect_seconds",
            "Time from a wake-up the provider accepted to its device's next connection.",
            ["provider", "kind"],
            buckets=WAKE_TO_CONNECT_BUCKETS,
            registry=None,
        )
        self._unanswered: Counter[tuple[str, str]] = Counter()
        self._waiting: dict[tuple[str, str], tuple[float, str, str]] = {}
        self._order: deque[tuple[float, tuple[str, str]]] = deque()

    def sent(self, user: str, device: str, provider: str, kind: str) -> None:
        """A provider accepted a wake-up of `kind` for the device."""
        now = self._clock()
        self._expire(now)
        key = (user, device)
        self._waiting[key] = (now, provider, kind)
        self._order.append((now, key))

    def connected(self, user: str, device: str) -> None:
        """The device connected: its waiting wake-up, if any, was answered."""
        entry = self._waiting.pop((user, device), None)
        if entry is None:
            return
        at, provider, kind = entry
        waited = self._clock() - at
        if waited <= ANSWER_WINDOW:
            self.latency.labels(provider, kind).observe(waited)
        else:
            self._unanswered[(provider, kind)] += 1

    def unanswered(self) -> dict[tuple[str, str], int]:
        """Wake-ups with no connection within `ANSWER_WINDOW`, by (provider, kind)."""
        self._expire(self._clock())
        return dict(self._unanswered)

    def _expire(self, now: float) -> None:
        order, waiting = self._order, self._waiting
        while order and order[0][0] + ANSWER_WINDOW < now:
            at, key = order.popleft()
            entry = waiting.get(key)
            if entry is not None and entry[0] == at:
                del waiting[key]
                self._unanswered[(entry[1], entry[2])] += 1
