"""A commit whose answer was lost: the item is stored, but no doorbell rang for it.

On Redis this happens when a pipeline times out after Redis ran the script (Redis frozen
past the client's stream timeout). The client then gets an error, resends the same id,
and gets `sent` for the first copy (a duplicate). Found by the Redis-pause histories in
scripts/crash.py: such an item was skipped by the live connection, which had moved past
its sid, and arrived only on the next connection, out of order. Simulated here by
silencing the store's doorbell for one send.

A resend rings the recipient's devices again whichever way it comes: a device's `send`
or the backend API's `POST /v1/messages`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.client import connect
from gateway.server import GatewayServer
from gateway.settings import Settings
from tests.conftest import make_settings, running_server

API_KEY = "test-admin-key"


@pytest.fixture(params=["sqlite", "redis"])
def settings_on_each_store(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Embedded defaults with the backend API on, on each store backend in turn."""
    store: dict[str, Any] = {}
    if request.param == "redis":
        store = {"backend": "redis", "redis_url": request.getfixturevalue("redis_url")}
    return make_settings(tmp_path, admin={"port": 0, "api_key": API_KEY}, store=store)


@contextmanager
def doorbell_lost(server: GatewayServer) -> Iterator[None]:
    """Commits inside the block ring nothing, as if their answers never came back."""
    store = server.store
    ring = store._doorbell  # type: ignore[attr-defined]
    store._doorbell = lambda *args: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        store._doorbell = ring  # type: ignore[attr-defined]


async def test_an_unannounced_item_is_delivered_before_the_next_one_in_order(
    tmp_path, redis_url, token
):
    settings = make_settings(tmp_path, store={"backend": "redis", "redis_url": redis_url})
    async with (
        running_server(settings) as server,
        connect(server.url, token("bob", "phone")) as bob,
        connect(server.url, token("alice", "phone")) as alice,
    ):
        await alice.send("bob", b"0", id="m0")
        assert (await bob.next_delivery()).frame["id"] == "m0"
        with doorbell_lost(server):
            await alice.send("bob", b"1", id="m1")  # stored; bob is not told
        await alice.send("bob", b"2", id="m2")
        with trio.fail_after(5):
            got = [(await bob.next_delivery()).frame["id"] for _ in range(2)]
    assert got == ["m1", "m2"]


async def test_a_resend_answered_as_duplicate_delivers_the_unannounced_first_copy(
    settings_on_each_store, token
):
    async with (
        running_server(settings_on_each_store) as server,
        connect(server.url, token("bob", "phone")) as bob,
        connect(server.url, token("alice", "phone")) as alice,
    ):
        await bob.wait_drained()
        with doorbell_lost(server):
            first = await alice.send("bob", b"1", id="m1")
        again = await alice.send("bob", b"1", id="m1")  # the client's retry
        with trio.fail_after(5):
            delivery = await bob.next_delivery()
    assert again.ts == first.ts  # answered from the first copy: nothing stored twice
    assert delivery.frame["id"] == "m1"
    assert server.counters.sends["duplicate"] == 1


async def test_a_published_resend_answered_as_duplicate_delivers_the_unannounced_first_copy(
    settings_on_each_store, token
):
    payload = {"to": "bob", "body": base64.b64encode(b"1").decode(), "id": "n1"}
    auth = {"authorization": f"Bearer {API_KEY}"}
    async with (
        running_server(settings_on_each_store) as server,
        httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
        connect(server.url, token("bob", "phone")) as bob,
    ):
        await bob.wait_drained()
        with doorbell_lost(server):
            first = await http.post("/v1/messages", json=payload, headers=auth)
        again = await http.post("/v1/messages", json=payload, headers=auth)  # the retry
        with trio.fail_after(5):
            delivery = await bob.next_delivery()
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json() == {"id": "n1", "ts": first.json()["ts"], "duplicate": True}
    assert (delivery.frame["id"], delivery.frame["from"]) == ("n1", "system")
    assert server.counters.sends["duplicate"] == 1


async def test_a_group_resend_answered_as_duplicate_rings_every_member(
    settings_on_each_store, token
):
    auth = {"authorization": f"Bearer {API_KEY}"}
    async with (
        running_server(settings_on_each_store) as server,
        httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
        connect(server.url, token("bob", "phone")) as bob,
        connect(server.url, token("carol", "phone")) as carol,
        connect(server.url, token("alice", "phone")) as alice,
    ):
        members = {"members": ["alice", "bob", "carol"]}
        assert (await http.put("/v1/groups/team", json=members, headers=auth)).status_code == 201
        for device in (bob, carol, alice):  # the membership events
            event = await device.next_delivery()
            await device.ack([event.sid])
        with doorbell_lost(server):
            first = await alice.send_group("team", b"1", id="g1")
        again = await alice.send_group("team", b"1", id="g1")  # the client's retry
        with trio.fail_after(5):
            got = [await bob.next_delivery(), await carol.next_delivery()]
    assert again.ts == first.ts
    assert [(d.frame["id"], d.frame["group"]) for d in got] == [("g1", "team")] * 2
    assert server.counters.sends["duplicate"] == 1
