"""Presence: grace periods, coalescing, holds and typing, driven by Trio's autojump clock.

What the service hands over is recorded as it appears on the wire, encoded by
`gateway.frames.presence` as the gateway does.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from gateway import frames
from presence.fanout import Fanout, SubscriptionLimit
from presence.service import PresenceService
from presence.state import MemoryPresence, PresenceItem
from presence.typing import TYPING_TTL, TypingTracker

GRACE = 5.0
BATCH = 0.25


class Harness:
    """A presence service whose outputs are recorded with the (virtual) time they left."""

    def __init__(self, *, accept: bool = True, overloaded: bool = False) -> None:
        self.frames: list[tuple[float, int, list[dict[str, Any]]]] = []
        self.typing: list[tuple[float, str, str, bool]] = []
        self.accept = accept
        self.overloaded = overloaded
        self.wall = 1_700_000_000_000
        self.service = PresenceService(
            MemoryPresence(GRACE),
            Fanout(BATCH, max_watch=3),
            TypingTracker(),
            deliver=self._deliver,
            relay_typing=self._relay,
            wall_ms=lambda: self.wall,
            overloaded=lambda: self.overloaded,
        )

    def _deliver(self, sub: int, items: list[PresenceItem]) -> bool:
        if self.accept:
            self.frames.append((trio.current_time(), sub, frames.presence(items)["items"]))
        return self.accept

    def _relay(self, sender: str, device: str, target: str, on: bool) -> None:
        self.typing.append((trio.current_time(), sender, target, on))

    def items_for(self, sub: int) -> list[list[dict[str, Any]]]:
        return [items for _, s, items in self.frames if s == sub]


@pytest.fixture
async def harness(nursery):
    # Tests that use this also ask for `autojump_clock` themselves: pytest-trio picks the
    # clock from the test function's own arguments.
    h = Harness()
    await nursery.start(h.service.run)
    return h


async def test_a_user_is_online_while_any_device_is_connected(harness, autojump_clock):
    svc = harness.service
    svc.add_subscriber(1, active=True)
    svc.subscribe(1, ("alice",))
    await trio.sleep(1)
    svc.device_connected("alice", "phone")
    svc.device_connected("alice", "laptop")
    await trio.sleep(1)
    svc.device_disconnected("alice", "phone")
    await trio.sleep(GRACE * 2)
    assert harness.items_for(1) == [[{"user": "alice", "online": True, "last_seen": None}]]


async def test_offline_comes_after_the_grace_period_with_last_seen(harness, autojump_clock):
    svc = harness.service
    svc.add_subscriber(1, active=True)
    svc.subscribe(1, ("alice",))
    svc.device_connected("alice", "phone")
    await trio.sleep(1)
    harness.wall = 1_700_000_123_000
    disconnected_at = trio.current_time()
    svc.device_disconnected("alice", "phone")
    await trio.sleep(GRACE * 2)
    (when, _, items) = harness.frames[-1]
    assert items == [{"user": "alice", "online": False, "last_seen": 1_700_000_123_000}]
    assert when == pytest.approx(disconnected_at + GRACE, abs=1e-6)


async def test_a_quick_reconnect_does_not_flap(harness, autojump_clock):
    svc = harness.service
    svc.add_subscriber(1, active=True)
    svc.subscribe(1, ("alice",))
    svc.device_connected("alice", "phone")
    await trio.sleep(1)
    svc.device_disconnected("alice", "phone")
    await trio.sleep(GRACE - 1)
    svc.device_connected("alice", "phone")
    await trio.sleep(GRACE * 3)
    assert harness.items_for(1) == [[{"user": "alice", "online": True, "last_seen": None}]]
    assert svc.state.snapshot("alice").online


async def test_changes_within_a_window_collapse_into_the_latest(harness, autojump_clock):
    svc = harness.service
    svc.add_subscriber(1, active=True)
    svc.subscribe(1, ("alice", "bob"))
    await trio.sleep(1)
    svc.device_connected("alice", "phone")  # leading edge: goes out at once
    t0 = trio.current_time()
    await trio.testing.wait_all_tasks_blocked()
    svc.device_connected("bob", "phone")
    svc.set_hidden("alice", True)
    svc.set_hidden("alice", False)
    await trio.sleep(1)
    times = [when for when, _, _ in harness.frames]
    assert times == [pytest.approx(t0, abs=1e-6), pytest.approx(t0 + BATCH, abs=1e-6)]
    first, second = harness.items_for(1)
    assert first == [{"user": "alice", "online": True, "last_seen": None}]
    assert sorted(second, key=lambda i: i["user"]) == [
        {"user": "alice", "online": True, "last_seen": None},
        {"user": "bob", "online": True, "last_seen": None},
    ]


async def test_subscribers_only_hear_of_users_they_watch_and_unsubscribe_works(
    harness, autojump_clock
):
    svc = harness.service
    svc.add_subscriber(1, active=True)
    svc.add_subscriber(2, active=True)
    svc.subscribe(1, ("alice",))
    svc.subscribe(2, ("bob",))
    await trio.sleep(1)
    svc.device_connected("alice", "phone")
    svc.device_connected("bob", "phone")
    await trio.sleep(1)
    assert [i["user"] for items in harness.items_for(1) for i in items] == ["alice"]
    assert [i["user"] for items in harness.items_for(2) for i in items] == ["bob"]
    svc.unsubscribe(1, ("alice",))
    svc.remove_subscriber(2)
    svc.device_disconnected("alice", "phone")
    svc.device_disconnected("bob", "phone")
    await trio.sleep(GRACE * 2)
    assert len(harness.frames) == 2


def test_the_watch_limit_is_enforced_and_changes_nothing():
    fanout = Fanout(BATCH, max_watch=3)
    fanout.add_subscriber(1, active=True)
    fanout.subscribe(1, ("a", "b"), 0.0)
    with pytest.raises(SubscriptionLimit):
        fanout.subscribe(1, ("c", "d"), 0.0)
    fanout.subscribe(1, ("a", "c"), 0.0)  # re-subscribing to a watched user is free
    fanout.publish([PresenceItem("d", True, None)], 0.0)
    assert fanout.due(10.0) == []


async def test_an_inactive_device_gets_held_changes_when_it_becomes_active(harness, autojump_clock):
    svc = harness.service
    svc.add_subscriber(1, active=False)
    svc.subscribe(1, ("alice",))
    for _ in range(3):
        svc.device_connected("alice", "phone")
        await trio.sleep(1)
        svc.device_disconnected("alice", "phone")
        await trio.sleep(GRACE + 1)
    assert harness.frames == []
    svc.set_active(1, True)
    await trio.lowlevel.checkpoint()
    await trio.testing.wait_all_tasks_blocked()
    (items,) = harness.items_for(1)
    assert items == [{"user": "alice", "online": False, "last_seen": harness.wall}]


async def test_held_changes_are_flushed_once_100_users_are_pending(nursery, autojump_clock):
    h = Harness()
    h.service.fanout.max_watch = 1000
    await nursery.start(h.service.run)
    svc = h.service
    users = tuple(f"user{i}" for i in range(150))
    svc.add_subscriber(1, active=False)
    svc.subscribe(1, users)
    await trio.sleep(1)
    for user in users[:99]:
        svc.device_connected(user, "phone")
    await trio.sleep(5)
    assert h.frames == []
    svc.device_connected(users[99], "phone")
    await trio.sleep(0.001)
    (items,) = h.items_for(1)
    assert len(items) == 100


async def test_a_frame_that_cannot_be_delivered_is_kept_and_coarsened(nursery, autojump_clock):
    h = Harness(accept=False)
    await nursery.start(h.service.run)
    svc = h.service
    svc.add_subscriber(1, active=True)
    svc.subscribe(1, ("alice",))
    await trio.sleep(1)
    svc.device_connected("alice", "phone")
    await trio.sleep(1)
    assert svc.shed["presence_deferred"] >= 1
    h.accept = True
    await trio.sleep(1)
    assert h.items_for(1) == [[{"user": "alice", "online": True, "last_seen": None}]]


async def test_typing_expires_by_itself(harness, autojump_clock):
    svc = harness.service
    start = trio.current_time()
    svc.typing("alice", "phone", "bob", True)
    await trio.sleep(TYPING_TTL * 2)
    assert [(t - start, on) for t, _, _, on in harness.typing] == [
        (0, True),
        (pytest.approx(TYPING_TTL, abs=1e-6), False),
    ]


async def test_typing_off_ends_it_and_renewal_extends_it(harness, autojump_clock):
    svc = harness.service
    start = trio.current_time()
    svc.typing("alice", "phone", "bob", True)
    await trio.sleep(TYPING_TTL - 1)
    svc.typing("alice", "phone", "bob", True)  # renewed
    await trio.sleep(TYPING_TTL - 1)
    svc.typing("alice", "phone", "bob", False)
    await trio.sleep(TYPING_TTL * 2)
    assert [(round(t - start), on) for t, _, _, on in harness.typing] == [
        (0, True),
        (TYPING_TTL - 1, True),
        (2 * TYPING_TTL - 2, False),
    ]


async def test_typing_is_rate_limited_per_sending_device(harness, autojump_clock):
    svc = harness.service
    for _ in range(50):
        svc.typing("alice", "phone", "bob", True)
    relayed = len(harness.typing)
    assert 1 <= relayed <= 10
    assert svc.shed["typing_rate"] == 50 - relayed
    svc.typing("alice", "laptop", "bob", True)  # another device has its own budget
    assert len(harness.typing) == relayed + 1


async def test_under_overload_typing_is_shed_first(nursery, autojump_clock):
    h = Harness(overloaded=True)
    await nursery.start(h.service.run)
    h.service.typing("alice", "phone", "bob", True)
    assert h.typing == [] and h.service.shed["typing"] == 1


async def test_a_disconnecting_sender_ends_its_typing_at_once(harness, autojump_clock):
    svc = harness.service
    svc.device_connected("alice", "phone")
    svc.typing("alice", "phone", "bob", True)
    svc.device_disconnected("alice", "phone")
    assert [on for *_, on in harness.typing] == [True, False]


async def test_hidden_users_look_offline_with_no_last_seen(harness, autojump_clock):
    svc = harness.service
    svc.device_connected("alice", "phone")
    svc.set_hidden("alice", True)
    svc.add_subscriber(1, active=True)
    snapshot = svc.subscribe(1, ("alice",))
    hidden = {"user": "alice", "online": False, "last_seen": None}
    assert frames.presence(snapshot) == {"t": "presence", "items": [hidden]}
    svc.device_disconnected("alice", "phone")
    svc.device_connected("alice", "phone")
    await trio.sleep(GRACE * 2)
    assert harness.frames == []
