"""Rate limits as plain code: a token bucket, and a send limiter built from two of them.

Both take the current time as an argument (seconds on any monotonic clock), so they are
tested with a fake clock and driven by `trio.current_time` in the server.
"""

from __future__ import annotations

import enum
import math


class TokenBucket:
    """A bucket of `burst` tokens refilled at `rate` tokens per second.

    A `rate` of 0 means no limit: every `take` succeeds.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, float(burst))
        self._tokens = self.burst
        self._stamp = now

    @property
    def unlimited(self) -> bool:
        """Whether this bucket lets everything through."""
        return self.rate <= 0

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if they are there; return whether they were."""
        if self.unlimited:
            return True
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def wait_time(self, now: float, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens will be there (0 if they are now)."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        missing = cost - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def tokens(self, now: float) -> float:
        """The tokens available at `now`."""
        if self.unlimited:
            return math.inf
        self._refill(now)
        return self._tokens


class SendVerdict(enum.Enum):
    """What to do with one `send` of a device."""

    ALLOW = "allow"
    LIMITED = "limited"  # answer `rate_limited`, keep the connection
    ABUSE = "abuse"  # the device keeps going over its limit: close the connection


# Refused sends are forgiven at this fraction of `strikes` per second, so `strikes`
# refusals within roughly ten seconds mean the client ignores `rate_limited`.
STRIKE_WINDOW = 10.0


class SendLimiter:
    """Per-device send limit: `rate` sends per second with bursts of `burst`.

    A send over the limit is refused (`LIMITED`). A client that keeps sending past
    refusals, more than `strikes` within about `STRIKE_WINDOW` seconds, is told `ABUSE`.
    """

    __slots__ = ("_sends", "_strikes")

    def __init__(self, rate: float, burst: int, strikes: int, *, now: float) -> None:
        self._sends = TokenBucket(rate, burst, now=now)
        self._strikes = TokenBucket(strikes / STRIKE_WINDOW, strikes, now=now)

    def check(self, now: float) -> SendVerdict:
        """Decide about one send at `now`."""
        if self._sends.take(now):
            return SendVerdict.ALLOW
        if self._strikes.take(now):
            return SendVerdict.LIMITED
        return SendVerdict.ABUSE
