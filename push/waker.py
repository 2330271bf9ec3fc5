"""The interface between the message path and push wake-ups.

The gateway tells a `Waker` three things: an item was stored for a device with no live
connection, a device connected, and a device disconnected. What to send, and when, is the
waker's decision.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Waker(Protocol):
    """Receives the events that can lead to a wake-up push."""

    def stored(self, user: str, device: str, urgent: bool) -> None:
        """An item was committed for a device that is connected nowhere."""

    def connected(self, user: str, device: str) -> None:
        """A device authenticated; whatever was pending for it is moot."""

    def disconnected(self, user: str, device: str) -> None:
        """A device's connection ended."""


class LogWaker:
    """Logs the wake-ups that a push provider would send; the embedded default."""

    def __init__(self) -> None:
        self.offline_items = 0

    def stored(self, user: str, device: str, urgent: bool) -> None:
        self.offline_items += 1
        log.debug("wake-up wanted for %s/%s (urgent=%s)", user, device, urgent)

    def connected(self, user: str, device: str) -> None:
        pass

    def disconnected(self, user: str, device: str) -> None:
        pass
