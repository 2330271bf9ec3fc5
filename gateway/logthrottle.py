"""Rate limiting for log lines that a persistent condition would otherwise repeat."""

from __future__ import annotations

import math


class LogThrottle:
    """Lets a repeated log line through at most once per `interval` seconds.

    The caller passes the current time, so the throttle is plain code; the occurrences
    held back in between are counted, so the next line can say how many there were.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -math.inf
        self._held = 0

    def take(self, now: float) -> int | None:
        """Record one occurrence at `now`.

        Returns:
            None if the line should stay quiet, otherwise how many occurrences were
            held back since the last line that went through.
        """
        if now - self._last < self.interval:
            self._held += 1
            return None
        self._last = now
        held, self._held = self._held, 0
        return held
