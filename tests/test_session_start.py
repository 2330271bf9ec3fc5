"""The `hello` path: one store round trip before `welcome`, nothing acked delivered again,
nothing committed while a session opens left behind."""

from __future__ import annotations

import trio

from gateway.client import connect
from gateway.store import Envelope
from tests.rawws import hello, raw_ws, recv, send


async def test_a_known_device_costs_one_store_round_trip_before_welcome(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass  # bob's phone is known from now on
    store = server.store
    calls: list[str] = []
    for name in ("open_session", "revoked_at", "register_device", "sync", "count", "fetch"):
        original = getattr(store, name)

        async def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return await _original(*args, **kwargs)

        setattr(store, name, counted)
    async with connect(server.url, token("alice", "phone")) as alice:
        for i in range(3):
            await alice.send("bob", bytes([i]))
    calls.clear()
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("bob", "phone"))
    assert calls == ["open_session"]
    assert frames[0]["t"] == "welcome" and frames[0]["queued"] == 3
    assert [f["body"] for f in frames if f["t"] == "msg"] == [b"\x00", b"\x01", b"\x02"]


async def test_items_acked_just_before_a_reconnect_are_not_delivered_again(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with connect(server.url, token("alice", "phone")) as alice:
        for round_ in range(5):
            for i in range(20):
                await alice.send("bob", f"{round_}-{i}".encode())
            async with raw_ws(server.url) as old:
                delivered = [f for f in await hello(old, token("bob", "phone")) if "sid" in f]
                assert len(delivered) == 20
                # The ack is submitted for commit; `sub` is answered once it was handled,
                # so the server has the ack in hand (not yet committed, perhaps).
                await send(old, [{"t": "ack", "sids": [f["sid"] for f in delivered]}])
                await send(old, {"t": "sub", "users": []})
                while not any(f["t"] == "presence" for f in await recv(old)):
                    pass
                async with raw_ws(server.url) as new:
                    again = [f for f in await hello(new, token("bob", "phone")) if "sid" in f]
            assert again == []


async def test_an_item_committed_while_the_session_opens_is_delivered_at_once(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    store = server.store
    open_session = store.open_session
    slipped_in: list[int] = []

    async def open_then_commit_another(user, device, **kwargs):
        opening = await open_session(user, device, **kwargs)
        # Committed after the session's read and before the connection is attached: its
        # doorbell rings while no connection of bob's phone is registered.
        envelope = Envelope("carol", "phone", "late", "bob", b"late", None, True, 1, 2**62)
        outcome = await (await store.submit_send(envelope)).result()
        slipped_in.append(outcome.devices)
        return opening

    store.open_session = open_then_commit_another
    async with connect(server.url, token("bob", "phone")) as bob:
        with trio.fail_after(5):
            delivery = await bob.next_delivery()
    assert slipped_in == [1]
    assert delivery.frame["id"] == "late"
