"""Admission control as plain code: who may open a WebSocket, decided before the upgrade.

`Admission.admit` is asked once per upgrade request with the peer's IP address and its
`Origin` header. It applies, in order: the `Origin` allowlist (403), the global connection
cap, the per-IP cap and the handshake token bucket (503 with a jittered `Retry-After`).
An admitted connection holds its place until `release`. Every refusal is counted by
reason for `/metrics`.
"""

from __future__ import annotations

import math
import random
import resource
from collections import Counter
from dataclasses import dataclass

from gateway.ratelimit import TokenBucket
from gateway.settings import LimitsSettings

# File descriptors kept back from the automatic connection cap for the store, the push
# providers' sockets, the admin API and connections still in their handshake.
RESERVED_FDS = 256


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an upgrade is refused, and how: an HTTP status and an optional `Retry-After`."""

    status: int
    reason: str
    retry_after: int | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers that go with the status."""
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(self.retry_after).encode())]


def automatic_connection_cap() -> int:
    """The connection cap used when `[limits] max_connections` is 0: what the process's
    open-file limit leaves after `RESERVED_FDS`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, soft - RESERVED_FDS)


class Admission:
    """Connection caps and the handshake rate, free of I/O.

    Args:
        limits: The `[limits]` settings.
        now: The current time (seconds, monotonic) for the handshake bucket.
        rng: Randomness for the `Retry-After` jitter.
    """

    def __init__(
        self, limits: LimitsSettings, *, now: float, rng: random.Random | None = None
    ) -> None:
        self.limits = limits
        self.max_connections = limits.max_connections or automatic_connection_cap()
        self.max_per_ip = limits.max_connections_per_ip
        self.origins = limits.origins
        self.open = 0
        self.refused: Counter[str] = Counter()
        self._per_ip: Counter[str] = Counter()
        self._handshakes = TokenBucket(limits.handshake_rate, limits.handshake_burst, now=now)
        self._rng = rng or random.Random()

    def admit(self, ip: str, origin: str | None, now: float) -> Refusal | None:
        """Take a place for a new connection from `ip`, or say why not.

        Returns:
            None when admitted (call `release` when the connection ends), else the refusal.
        """
        refusal = self._check(ip, origin, now)
        if refusal is not None:
            self.refused[refusal.reason] += 1
            return refusal
        self.open += 1
        self._per_ip[ip] += 1
        return None

    def refuse(self, reason: str) -> Refusal:
        """Count and return a 503 refusal decided elsewhere (say, while draining)."""
        self.refused[reason] += 1
        return Refusal(503, reason, self._retry_after(0.0))

    def release(self, ip: str) -> None:
        """Give back the place of an admitted connection from `ip`."""
        self.open -= 1
        left = self._per_ip[ip] - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]

    def connections_from(self, ip: str) -> int:
        """How many admitted connections `ip` holds."""
        return self._per_ip.get(ip, 0)

    def _check(self, ip: str, origin: str | None, now: float) -> Refusal | None:
        if self.origins and origin is not None and origin.rstrip("/") not in self.origins:
            return Refusal(403, "origin")
        if self.open >= self.max_connections:
            return Refusal(503, "max_connections", self._retry_after(0.0))
        if self.max_per_ip and self._per_ip.get(ip, 0) >= self.max_per_ip:
            return Refusal(503, "max_connections_per_ip", self._retry_after(0.0))
        if not self._handshakes.take(now):
            wait = self._handshakes.wait_time(now)
            return Refusal(503, "handshake_rate", self._retry_after(wait))
        return None

    def _retry_after(self, at_least: float) -> int:
        """`retry_after` seconds (or the bucket's wait, if longer), plus up to as much again
        at random, so that refused clients do not all come back in the same second."""
        base = max(self.limits.retry_after, math.ceil(at_least))
        return base + self._rng.randint(0, base)
