"""Which devices are connected to this process, and how their doorbells ring."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from gateway.store.base import QueueItem
from push.waker import Waker

if TYPE_CHECKING:
    from gateway.connection import Connection

DeviceKey = tuple[str, str]


class Registry:
    """Live connections by (user, device), one per device, plus doorbell routing.

    `ring` is the store's doorbell: a connected device's writer is woken; a device
    connected nowhere is handed to the push waker.
    """

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self._by_device: dict[DeviceKey, Connection] = {}
        self._by_user: dict[str, dict[str, Connection]] = {}

    def __len__(self) -> int:
        return len(self._by_device)

    def attach(self, conn: Connection) -> Connection | None:
        """Register a newly authenticated connection; return the one it replaces, if any."""
        key = (conn.user, conn.device)
        previous = self._by_device.get(key)
        self._by_device[key] = conn
        self._by_user.setdefault(conn.user, {})[conn.device] = conn
        self.waker.connected(conn.user, conn.device)
        return previous

    def detach(self, conn: Connection) -> bool:
        """Forget a connection if it is still the current one for its device."""
        key = (conn.user, conn.device)
        if self._by_device.get(key) is not conn:
            return False
        del self._by_device[key]
        devices = self._by_user[conn.user]
        del devices[conn.device]
        if not devices:
            del self._by_user[conn.user]
        self.waker.disconnected(conn.user, conn.device)
        return True

    def get(self, user: str, device: str) -> Connection | None:
        """The live connection of a device, if it is connected here."""
        return self._by_device.get((user, device))

    def of_user(self, user: str) -> Iterator[Connection]:
        """The live connections of a user's devices."""
        yield from list(self._by_user.get(user, {}).values())

    def all(self) -> list[Connection]:
        """Every live connection."""
        return list(self._by_device.values())

    def ring(self, user: str, device: str, urgent: bool, item: QueueItem) -> None:
        """Doorbell: an item was committed for (user, device)."""
        conn = self._by_device.get((user, device))
        if conn is not None:
            conn.deliver_live(item)
        else:
            self.waker.stored(user, device, urgent)
