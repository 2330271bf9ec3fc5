"""Deliveries handed over by one commit leave as one WebSocket message per device."""

from __future__ import annotations

import trio
import trio.testing

from gateway.delivery_flush import DeliveryFlush
from gateway.store.base import ItemKind, QueueItem
from tests.rawws import hello, raw_ws, recv

T0 = 1_700_000_000_000


def receipt(sid: int, member: str) -> QueueItem:
    return QueueItem(sid, ItemKind.DELIVERED, "", member, "phone", T0, False, b"", (f"m-{member}",))


async def test_the_receipts_one_commit_rings_reach_a_device_in_one_message(server, token):
    async with raw_ws(server.url) as alice:
        await hello(alice, token("alice", "phone"))
        conn = server.registry.get("alice", "phone")
        assert conn is not None
        first = conn.cursor + 1
        # A commit rings every item it stored, one after another, in one task: here the
        # receipts of three members who acked alice's group message.
        for n, member in enumerate(("bob", "carol", "dave")):
            server.registry.ring("alice", "phone", False, receipt(first + n, member))
        frames = await recv(alice)
        assert [(f["t"], f["sid"], f["by"]) for f in frames] == [
            ("receipt", first, "bob"),
            ("receipt", first + 1, "carol"),
            ("receipt", first + 2, "dave"),
        ]


class Conn:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def flush_deliveries(self) -> None:
        self.log.append(self.name)


async def test_connections_are_flushed_once_the_task_that_added_them_yields() -> None:
    flush, log = DeliveryFlush(), []
    async with trio.open_nursery() as nursery:
        await nursery.start(flush.run)
        flush.add(Conn("a", log))
        flush.add(Conn("b", log))
        assert log == []  # nothing written while the ringing task runs on
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["a", "b"]
        flush.add(Conn("c", log))
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["a", "b", "c"]
        nursery.cancel_scope.cancel()
