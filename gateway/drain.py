"""The graceful-drain schedule as plain code: who is closed when, and told to come back when.

On SIGTERM the gateway closes every connection with 1012, but not all at once: a fleet
that is told to reconnect at the same instant comes back at the same instant, to the
next instance or to this one's neighbours. `drain_plan` spreads the closes evenly over
`drain_seconds` in random order, and gives each connection a random reconnect hint,
carried in the close reason as ``reconnect_after_ms=N`` (see docs/protocol.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

REASON_PREFIX = "restarting; reconnect_after_ms="


@dataclass(frozen=True, slots=True)
class DrainStep(Generic[T]):
    """Close `target` at `offset` seconds into the drain, hinting `reconnect_after_ms`."""

    offset: float
    target: T
    reconnect_after_ms: int

    @property
    def reason(self) -> str:
        """The close reason that carries the hint."""
        return f"{REASON_PREFIX}{self.reconnect_after_ms}"


def drain_plan(
    targets: Sequence[T], drain_seconds: float, rng: random.Random | None = None
) -> list[DrainStep[T]]:
    """Spread the closing of `targets` over `drain_seconds`, in random order.

    The first close is at offset 0 and the last before `drain_seconds`. Each hint is
    uniform in [0, max(1, drain_seconds)) seconds, so reconnects are spread at least as
    widely as the closes.
    """
    rng = rng or random.Random()
    order = list(targets)
    rng.shuffle(order)
    n = len(order)
    window = max(1.0, drain_seconds)
    return [
        DrainStep(drain_seconds * i / n, target, int(rng.uniform(0, window) * 1000))
        for i, target in enumerate(order)
    ]


def parse_reconnect_hint(reason: str | None) -> float | None:
    """The reconnect hint in a 1012 close reason, in seconds, or None if it has none."""
    if not reason or REASON_PREFIX not in reason:
        return None
    digits = reason.split(REASON_PREFIX, 1)[1].split(";", 1)[0].strip()
    if not digits.isdigit():
        return None
    return int(digits) / 1000
