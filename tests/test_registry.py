"""The registry's doorbell: what it hands the push waker for a device connected nowhere."""

from __future__ import annotations

from gateway.registry import Registry
from gateway.store.base import ItemKind, QueueItem
from tests.wakers import LogWaker


class Calls(LogWaker):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []

    def stored(self, user: str, device: str, urgent: bool) -> None:
        self.calls.append(("stored", user, device))

    def read_elsewhere(self, user: str, device: str) -> None:
        self.calls.append(("read_elsewhere", user, device))


def receipt(kind: ItemKind, by: str) -> QueueItem:
    return QueueItem(1, kind, "", by, "tablet", 1000, False, b"", ("m1",))


def test_a_read_by_the_devices_own_user_is_a_read_elsewhere() -> None:
    waker = Calls()
    registry = Registry(waker)

    registry.ring("bob", "phone", False, receipt(ItemKind.READ, "bob"))
    registry.ring("alice", "phone", False, receipt(ItemKind.READ, "bob"))
    registry.ring("bob", "phone", False, receipt(ItemKind.DELIVERED, "bob"))

    assert waker.calls == [
        ("read_elsewhere", "bob", "phone"),
        ("stored", "alice", "phone"),  # a read by someone else wakes as any receipt
        ("stored", "bob", "phone"),  # a delivered receipt from one's own device too
    ]


class Conn:
    def __init__(self, conn_id: int) -> None:
        self.id, self.user, self.device, self.active = conn_id, "bob", "phone", True


class Moves(LogWaker):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def connected(self, user: str, device: str) -> None:
        self.calls.append("connected")

    def disconnected(self, user: str, device: str) -> None:
        self.calls.append("disconnected")

    def connected_elsewhere(self, user: str, device: str) -> None:
        self.calls.append("connected_elsewhere")


def test_a_connection_replaced_on_another_node_ends_as_connected_elsewhere() -> None:
    waker = Moves()
    registry = Registry(waker)
    first, second = Conn(1), Conn(2)
    registry.attach(first)  # type: ignore[arg-type]
    registry.moved(first)  # type: ignore[arg-type]
    registry.detach(first)  # type: ignore[arg-type]
    registry.attach(second)  # type: ignore[arg-type]
    registry.detach(second)  # type: ignore[arg-type]
    registry.moved(second)  # type: ignore[arg-type]  # too late: it ended, nothing is kept

    assert waker.calls == ["connected", "connected_elsewhere", "connected", "disconnected"]
    assert registry._moved == set()
