"""The protocol's clock: wall-clock milliseconds since the Unix epoch."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch, the protocol's time unit."""
    return time.time_ns() // 1_000_000
