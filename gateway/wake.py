"""How the gateway tells the push side about devices it may have to wake.

The registry tells a `Waker` what happens to devices: an item was stored for a device
with no live connection (or, as a case of its own, a read its user made on another
device), a device connected, and a device disconnected; in a cluster, also that a device
connected on another node, or got an alert wake-up from one. What to send, and when, is the
waker's decision; the push dispatcher is the one a served gateway uses.
"""

from __future__ import annotations

from typing import Protocol


class Waker(Protocol):
    """Receives the events that can lead to a wake-up push; every call returns at once."""

    def stored(self, user: str, device: str, urgent: bool) -> None:
        """An item was committed for a device that is connected nowhere."""

    def read_elsewhere(self, user: str, device: str) -> None:
        """A read receipt by `user` was committed for their `device`, which is connected
        nowhere: the user read on another device, and notifications shown on this one
        may be stale. It is not a reason to wake the device for delivery."""

    def connected(self, user: str, device: str) -> None:
        """A device authenticated; whatever was pending for it is moot."""

    def disconnected(self, user: str, device: str) -> None:
        """A device's connection ended."""

    def connected_elsewhere(self, user: str, device: str) -> None:
        """A device authenticated on another node sharing the store: whatever this node
        had pending for it is moot, but it is not connected here."""

    def alerted_elsewhere(self, user: str, device: str) -> None:
        """Another node sent the device an alert wake-up: a read its user makes on
        another device should clear it, whichever node stores that read."""

    def rescue(self, user: str, device: str) -> None:
        """A connected device left an urgent message unanswered for `[push] ack_timeout`
        and sent nothing meanwhile: its socket may be open on a suspended app."""
