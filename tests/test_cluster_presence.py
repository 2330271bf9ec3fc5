"""`ClusterPresence` against a bus whose presence reads the test answers by hand."""

from __future__ import annotations

from collections.abc import Sequence

import trio
from trio.testing import wait_all_tasks_blocked

from gateway.cluster_presence import ClusterPresence
from gateway.store.bus import Event, EventKind, PresenceRecord
from presence.state import PresenceItem

OFFLINE = PresenceRecord(connected=0, grace_ms=0, last_seen=5, hidden=False)
ONLINE = PresenceRecord(connected=1, grace_ms=0, last_seen=5, hidden=False)


class HeldBus:
    """Answers `read_presence` with what `records` held when the read was asked, once the
    test lets it go (`release`)."""

    def __init__(self) -> None:
        self.records: dict[str, PresenceRecord] = {}
        self.asked = trio.Event()
        self.release = trio.Event()
        self.reads = 0

    async def read_presence(self, users: Sequence[str]) -> list[PresenceRecord | None]:
        answer = [self.records.get(user) for user in users]
        self.reads += 1
        self.asked.set()
        await self.release.wait()
        return answer

    async def set_hidden(self, hides: list[tuple[str, bool]]) -> None:
        pass


class Service:
    """What `ClusterPresence.run` publishes to."""

    def __init__(self) -> None:
        self.items: list[PresenceItem] = []
        self.changed = trio.Event()

    def apply(self, items: list[PresenceItem]) -> None:
        self.items += items
        self.changed.set()


async def test_an_event_during_a_users_first_read_has_them_read_again():
    bus = HeldBus()
    presence = ClusterPresence(bus, reconcile=3600)  # type: ignore[arg-type]
    service = Service()
    bus.records["bob"] = OFFLINE
    async with trio.open_nursery() as nursery:
        await nursery.start(presence.run, service)
        nursery.start_soon(presence.refresh, ("bob",))  # someone here subscribes to bob
        await bus.asked.wait()  # the read is answered: offline
        bus.records["bob"] = ONLINE  # then bob connects on another node
        presence.on_event(Event(EventKind.CONNECTED, "bob", "phone"))
        bus.release.set()

        with trio.fail_after(5):
            await service.changed.wait()
        nursery.cancel_scope.cancel()

    assert service.items == [PresenceItem("bob", True, None)]
    assert presence.mirror.snapshot("bob") == PresenceItem("bob", True, None)
    assert bus.reads == 2


async def test_an_event_about_a_user_nobody_here_reads_is_ignored():
    bus = HeldBus()
    bus.release.set()
    presence = ClusterPresence(bus, reconcile=3600)  # type: ignore[arg-type]
    service = Service()
    async with trio.open_nursery() as nursery:
        await nursery.start(presence.run, service)
        presence.on_event(Event(EventKind.CONNECTED, "carol", "phone"))
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert (bus.reads, service.items) == (0, [])
