"""A waker for gateways under test that must not push: it only counts what it is told."""

from __future__ import annotations


class LogWaker:
    """A waker that sends nothing: it counts the wake-ups wanted."""

    def __init__(self) -> None:
        self.offline_items = 0

    def stored(self, user: str, device: str, urgent: bool) -> None:
        """Count the item."""
        self.offline_items += 1

    def read_elsewhere(self, user: str, device: str) -> None:
        """Count the read receipt like any item."""
        self.offline_items += 1

    def connected(self, user: str, device: str) -> None:
        """Nothing to cancel."""

    def disconnected(self, user: str, device: str) -> None:
        """Nothing to schedule."""

    def connected_elsewhere(self, user: str, device: str) -> None:
        """Nothing to cancel."""

    def alerted_elsewhere(self, user: str, device: str) -> None:
        """Nothing to clear."""

    def rescue(self, user: str, device: str) -> None:
        """Nothing to send."""
