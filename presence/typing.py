"""Typing indicators: per-sender rate limiting and expiry, free of I/O.

A typing indicator is relayed, never stored. `on: true` lasts `ttl` seconds unless
renewed; if no `on: false` follows in time, the server relays one itself, so a phone
that lost its radio mid-sentence never leaves "typing…" on screen.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

TYPING_TTL = 6.0  # seconds an `on: true` lasts without renewal; clients renew every ~3 s
RATE = 2.0  # sustained indicators per second per sending device
BURST = 6.0

Key = tuple[str, str, str]  # (sender user, sender device, target user)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TypingTracker:
    """Decides which typing indicators to relay, and which have expired."""

    def __init__(self, *, ttl: float = TYPING_TTL, rate: float = RATE, burst: float = BURST):
        self.ttl = ttl
        self.rate = rate
        self.burst = burst
        self._active: dict[Key, float] = {}  # key -> expiry
        self._heap: list[tuple[float, Key]] = []
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def typing(self, sender: str, device: str, target: str, on: bool, now: float) -> bool:
        """Record an indicator; True if it should be relayed to the target's devices.

        `on: false` for an indicator that is showing is always relayed. Everything else
        spends a token from the sender device's bucket and is dropped when it is empty.
        """
        key = (sender, device, target)
        if not on:
            return self._active.pop(key, None) is not None
        if not self._take_token(sender, device, now):
            return False
        expiry = now + self.ttl
        self._active[key] = expiry
        heapq.heappush(self._heap, (expiry, key))
        return True

    def expire(self, now: float) -> list[Key]:
        """Indicators whose `ttl` ran out by `now`: relay `on: false` for each."""
        out: list[Key] = []
        while self._heap and self._heap[0][0] <= now:
            expiry, key = heapq.heappop(self._heap)
            if self._active.get(key) == expiry:
                del self._active[key]
                out.append(key)
        return out

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do."""
        while self._heap:
            expiry, key = self._heap[0]
            if self._active.get(key) == expiry:
                return expiry
            heapq.heappop(self._heap)
        return None

    def forget_device(self, sender: str, device: str) -> list[Key]:
        """A sending device went away: its showing indicators end now."""
        gone = [k for k in self._active if k[0] == sender and k[1] == device]
        for key in gone:
            del self._active[key]
        self._buckets.pop((sender, device), None)
        return gone

    def _take_token(self, sender: str, device: str, now: float) -> bool:
        bucket = self._buckets.get((sender, device))
        if bucket is None:
            bucket = self._buckets[(sender, device)] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True
