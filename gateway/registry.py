"""Which devices are connected to this process, and how their doorbells ring."""

from __future__ import annotations

from collections.abc import Iterator

from gateway.peer import Peer
from gateway.store.base import ItemKind, QueueItem
from gateway.wake import Waker

DeviceKey = tuple[str, str]


class Watch:
    """Whether a device's doorbell rang while it was watched (see `Registry.watch`)."""

    __slots__ = ("key", "rung")

    def __init__(self, key: DeviceKey) -> None:
        self.key = key
        self.rung = False


class Registry:
    """Live connections by (user, device), one per device, plus doorbell routing.

    `ring` is the store's doorbell: a connected device's writer is woken; a device
    connected nowhere is handed to the push waker (a read its own user made on another
    device as `read_elsewhere`, anything else as `stored`).
    """

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self._by_device: dict[DeviceKey, Peer] = {}
        self._by_user: dict[str, dict[str, Peer]] = {}
        self._by_id: dict[int, Peer] = {}  # replaced ones too, until they end
        self._watches: dict[DeviceKey, list[Watch]] = {}
        self._moved: set[int] = set()  # connections replaced by one on another node

    def __len__(self) -> int:
        return len(self._by_device)

    def attach(self, conn: Peer) -> Peer | None:
        """Register a newly authenticated connection; return the one it replaces, if any."""
        key = (conn.user, conn.device)
        previous = self._by_device.get(key)
        self._by_device[key] = conn
        self._by_id[conn.id] = conn
        self._by_user.setdefault(conn.user, {})[conn.device] = conn
        self.waker.connected(conn.user, conn.device)
        return previous

    def moved(self, conn: Peer) -> None:
        """`conn` is being closed because its device connected on another node: when it
        ends, the device is connected there, not gone (no linger wake-up starts here)."""
        if self._by_id.get(conn.id) is conn:
            self._moved.add(conn.id)

    def detach(self, conn: Peer) -> bool:
        """Forget a connection that ended; True if it was still its device's current one."""
        self._by_id.pop(conn.id, None)
        moved = conn.id in self._moved
        self._moved.discard(conn.id)
        key = (conn.user, conn.device)
        if self._by_device.get(key) is not conn:
            return False
        del self._by_device[key]
        devices = self._by_user[conn.user]
        del devices[conn.device]
        if not devices:
            del self._by_user[conn.user]
        if moved:
            self.waker.connected_elsewhere(conn.user, conn.device)
        else:
            self.waker.disconnected(conn.user, conn.device)
        return True

    def get(self, user: str, device: str) -> Peer | None:
        """The live connection of a device, if it is connected here."""
        return self._by_device.get((user, device))

    def by_id(self, conn_id: int) -> Peer | None:
        """An attached connection by its id (a replaced one too, until it ends)."""
        return self._by_id.get(conn_id)

    def of_user(self, user: str) -> Iterator[Peer]:
        """The live connections of a user's devices."""
        yield from list(self._by_user.get(user, {}).values())

    def all(self) -> list[Peer]:
        """Every live connection."""
        return list(self._by_device.values())

    def ring_all(self) -> None:
        """Have every live connection read its queue (doorbells may have been lost)."""
        for conn in list(self._by_device.values()):
            conn.ring()

    def watch(self, user: str, device: str) -> Watch:
        """Note every doorbell of a device from now until `unwatch`: a session that is
        opening has read the queue but is not attached yet, and must not miss an item
        committed in between."""
        watch = Watch((user, device))
        self._watches.setdefault(watch.key, []).append(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        """Stop noting the doorbells of `watch`'s device."""
        watches = self._watches.get(watch.key)
        if watches is not None:
            watches.remove(watch)
            if not watches:
                del self._watches[watch.key]

    def ring(self, user: str, device: str, urgent: bool, item: QueueItem) -> None:
        """Doorbell: an item was committed for (user, device)."""
        if self._watches:
            for watch in self._watches.get((user, device), ()):
                watch.rung = True
        conn = self._by_device.get((user, device))
        if conn is not None:
            conn.deliver(item)
        elif item.kind is ItemKind.READ and item.sender == user:
            self.waker.read_elsewhere(user, device)
        else:
            self.waker.stored(user, device, urgent)
