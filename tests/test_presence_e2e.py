"""Presence over real sockets: three users on five devices, one watcher."""

from __future__ import annotations

import pytest

from gateway.client import connect
from tests.conftest import make_settings, running_server


def online(user: str) -> dict:
    return {"user": user, "online": True, "last_seen": None}


@pytest.fixture
async def server(tmp_path):
    settings = make_settings(
        tmp_path, presence={"batch_ms": 50, "offline_grace": 0.3, "max_watch": 3}
    )
    async with running_server(settings) as running:
        yield running


async def next_presence(client) -> list[dict]:
    while True:
        frame = await client.next_event()
        if frame["t"] == "presence":
            return frame["items"]


async def test_the_watcher_sees_exactly_the_contracted_sequence(server, token):
    url = server.url
    async with connect(url, token("carol", "phone")) as carol:
        await carol.subscribe(["alice", "bob"])
        assert await next_presence(carol) == [
            {"user": "alice", "online": False, "last_seen": None},
            {"user": "bob", "online": False, "last_seen": None},
        ]
        # alice: phone, then laptop too; the phone leaves while the laptop stays.
        async with connect(url, token("alice", "phone")):
            assert await next_presence(carol) == [online("alice")]
            async with connect(url, token("alice", "laptop")):
                pass  # alice's phone is still on: nothing changes
        # Both gone: offline after the grace period, with the last disconnect's time.
        (item,) = await next_presence(carol)
        assert item["user"] == "alice" and item["online"] is False
        assert isinstance(item["last_seen"], int)

        # bob: phone and tablet, with a reconnect inside the grace period.
        async with connect(url, token("bob", "phone")):
            assert await next_presence(carol) == [online("bob")]
        # bob comes back within the grace period: no offline/online flap.
        async with connect(url, token("bob", "tablet")), connect(url, token("alice", "phone")):
            assert await next_presence(carol) == [online("alice")]
            await carol.subscribe(["dave"])  # watching alice, bob and dave: the limit
            assert await next_presence(carol) == [
                {"user": "dave", "online": False, "last_seen": None}
            ]
            await carol.subscribe(["erin"])
            error = await carol.next_event()
            assert (error["t"], error["code"]) == ("error", "limit_exceeded")


async def test_hiding_presence_shows_offline_with_no_last_seen(server, token):
    async with (
        connect(server.url, token("carol", "phone")) as carol,
        connect(server.url, token("alice", "phone")) as alice,
    ):
        await carol.subscribe(["alice"])
        assert await next_presence(carol) == [online("alice")]
        await alice._send_frames([{"t": "privacy", "hide_presence": True}])
        assert await next_presence(carol) == [{"user": "alice", "online": False, "last_seen": None}]


async def test_inactive_devices_get_no_typing_and_held_presence(server, token):
    async with (
        connect(server.url, token("carol", "phone"), active=False) as carol,
        connect(server.url, token("alice", "phone")) as alice,
    ):
        await carol.subscribe(["bob"])
        await next_presence(carol)  # the snapshot always comes
        await alice.typing("carol", True)
        async with connect(server.url, token("bob", "phone")):
            pass
        await carol.set_active(True)
        # The held change comes first (typing was never queued for an inactive device).
        (item,) = await next_presence(carol)
        assert item["user"] == "bob"
        await alice.typing("carol", True)
        assert await carol.next_event() == {"t": "typing", "from": "alice", "on": True}
