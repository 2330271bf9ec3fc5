"""Groups end to end: membership through the backend API, `send` with `group` from real
devices over real sockets, `group` events, receipts, wake-ups, and two nodes on Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.auth import mint_token
from gateway.client import GatewayClient, SendRefused, connect
from gateway.server import GatewayServer
from gateway.store import ItemKind
from tests.conftest import running_server
from tests.rawws import hello, raw_ws, recv_until, send
from tests.test_admin import AUTH, admin_settings
from tests.test_cluster import cluster_settings, shared_redis  # noqa: F401 (a fixture)
from tests.wakers import LogWaker

DEADLINE = 10


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[GatewayServer]:
    async with running_server(admin_settings(tmp_path, groups={"max_members": 3})) as running:
        yield running


@pytest.fixture
async def http(server: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.admin_url, timeout=10) as client:
        yield client


def token(server: GatewayServer, user: str, device: str) -> str:
    return mint_token(server.settings.auth, user, device)


async def next_of(client: GatewayClient, kind: str) -> dict[str, Any]:
    """The next delivered frame of type `kind` (others are acked and passed over)."""
    with trio.fail_after(DEADLINE):
        while True:
            delivery = await client.next_delivery()
            if delivery.frame["t"] == kind:
                return delivery.frame


# -- the backend API ----------------------------------------------------------------------


async def test_a_group_is_created_read_changed_and_deleted_through_the_api(http):
    created = await http.put("/v1/groups/team", json={"members": ["bob", "alice"]}, headers=AUTH)
    assert (created.status_code, created.json()) == (
        201, {"group": "team", "members": ["alice", "bob"]},
    )  # fmt: skip
    replaced = await http.put("/v1/groups/team", json={"members": ["alice"]}, headers=AUTH)
    assert replaced.status_code == 200

    added = await http.post("/v1/groups/team/members", json={"users": ["carol"]}, headers=AUTH)
    assert (added.status_code, added.json()["members"]) == (200, ["alice", "carol"])
    removed = await http.delete("/v1/groups/team/members/alice", headers=AUTH)
    assert (removed.status_code, removed.json()["members"]) == (200, ["carol"])
    assert (await http.delete("/v1/groups/team/members/alice", headers=AUTH)).status_code == 404

    read = await http.get("/v1/groups/team", headers=AUTH)
    assert (read.status_code, read.json()) == (200, {"group": "team", "members": ["carol"]})
    assert (await http.delete("/v1/groups/team", headers=AUTH)).status_code == 204
    assert (await http.delete("/v1/groups/team", headers=AUTH)).status_code == 404
    assert (await http.get("/v1/groups/team", headers=AUTH)).status_code == 404
    unknown = await http.post("/v1/groups/team/members", json={"users": ["x"]}, headers=AUTH)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_group")


async def test_more_members_than_the_limit_is_a_422_naming_it_and_changes_nothing(http):
    over = await http.put("/v1/groups/team", json={"members": ["a", "b", "c", "d"]}, headers=AUTH)
    assert over.status_code == 422
    assert over.json()["error"] == "too_many_members"
    assert over.json()["limit"] == 3
    assert "[groups] max_members" in over.json()["detail"]
    assert (await http.get("/v1/groups/team", headers=AUTH)).status_code == 404

    await http.put("/v1/groups/team", json={"members": ["a", "b", "a"]}, headers=AUTH)  # 2
    over = await http.post("/v1/groups/team/members", json={"users": ["c", "d"]}, headers=AUTH)
    assert (over.status_code, over.json()["limit"]) == (422, 3)
    assert (await http.get("/v1/groups/team", headers=AUTH)).json()["members"] == ["a", "b"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("PUT", "/v1/groups/team", b"not json", 400, "bad_json"),
        ("PUT", "/v1/groups/team", b"[]", 400, "bad_json"),
        ("PUT", "/v1/groups/team", b"{}", 400, "bad_field"),
        ("PUT", "/v1/groups/team", b'{"members": "bob"}', 400, "bad_field"),
        ("PUT", "/v1/groups/team", b'{"members": [1]}', 400, "bad_field"),
        ("PUT", "/v1/groups/team", b'{"members": [""]}', 400, "bad_field"),
        ("PUT", "/v1/groups/team", b'{"members": ["' + b"u" * 129 + b'"]}', 400, "bad_field"),
        ("PUT", "/v1/groups/" + "g" * 129, b'{"members": []}', 400, "bad_field"),
        ("POST", "/v1/groups/team/members", b'{"members": ["bob"]}', 400, "bad_field"),
        ("DELETE", "/v1/groups/team/members/" + "u" * 129, b"", 400, "bad_field"),
        ("PATCH", "/v1/groups/team", b"{}", 405, "method_not_allowed"),
    ],
)
async def test_malformed_group_requests_get_json_errors_and_change_nothing(
    http, method, path, body, status, code
):
    response = await http.request(method, path, content=body, headers=AUTH)

    assert (response.status_code, response.json()["error"]) == (status, code)
    assert response.json()["detail"]
    assert (await http.get("/v1/groups/team", headers=AUTH)).status_code == 404


async def test_group_endpoints_need_the_key(http):
    response = await http.put("/v1/groups/team", json={"members": []})
    assert response.status_code == 401
    assert (await http.get("/v1/groups/team")).status_code == 401


async def test_a_group_id_of_128_bytes_is_accepted(http):
    group = "é" * 64  # 128 bytes
    response = await http.put(f"/v1/groups/{group}", json={"members": []}, headers=AUTH)
    assert (response.status_code, response.json()["group"]) == (201, group)


# -- devices ------------------------------------------------------------------------------


async def test_membership_changes_reach_every_device_involved_as_group_frames(server, http):
    async with (
        connect(server.url, token(server, "alice", "phone")) as alice,
        connect(server.url, token(server, "bob", "phone")) as bob,
    ):
        await alice.wait_drained()
        await bob.wait_drained()
        response = await http.put("/v1/groups/team", json={"members": ["alice"]}, headers=AUTH)
        assert response.status_code == 201
        frame = await next_of(alice, "group")
        assert (frame["group"], frame["event"], frame["users"]) == ("team", "added", ["alice"])
        assert isinstance(frame["sid"], int) and isinstance(frame["ts"], int)

        await http.post("/v1/groups/team/members", json={"users": ["bob"]}, headers=AUTH)
        for client in (alice, bob):
            frame = await next_of(client, "group")
            assert (frame["event"], frame["users"]) == ("added", ["bob"])
        await http.delete("/v1/groups/team/members/bob", headers=AUTH)
        for client in (alice, bob):  # the removed user hears of it too
            frame = await next_of(client, "group")
            assert (frame["event"], frame["users"]) == ("removed", ["bob"])
        await http.delete("/v1/groups/team", headers=AUTH)
        frame = await next_of(alice, "group")
        assert (frame["event"], frame["users"]) == ("deleted", ["alice"])


async def test_a_group_send_reaches_every_member_device_but_the_sending_one(server, http):
    await http.put("/v1/groups/team", json={"members": ["alice", "bob", "carol"]}, headers=AUTH)
    async with (
        connect(server.url, token(server, "alice", "phone")) as phone,
        connect(server.url, token(server, "alice", "laptop")) as laptop,
        connect(server.url, token(server, "bob", "phone")) as bob,
        connect(server.url, token(server, "carol", "phone")) as carol,
        connect(server.url, token(server, "dave", "phone")) as dave,
    ):
        for client in (phone, laptop, bob, carol, dave):
            await client.wait_drained()

        sent = await phone.send_group("team", b"sender-key ciphertext", id="g-1", urgent=False)

        for client in (laptop, bob, carol):
            frame = await next_of(client, "msg")
            assert (frame["id"], frame["group"], frame["from"], frame["dev"]) == (
                "g-1", "team", "alice", "phone",
            )  # fmt: skip
            assert (frame["body"], frame["ts"], frame["urgent"]) == (
                b"sender-key ciphertext", sent.ts, False,
            )  # fmt: skip
        # Each recipient's ack is a delivered receipt for alice's devices, as for 1:1.
        receipts: list[tuple[str, str]] = []
        with trio.fail_after(DEADLINE):
            while len(receipts) < 3:
                frame = await next_of(phone, "receipt")
                receipts += [(frame["by"], frame["dev"])] * len(frame["ids"])
        assert sorted(receipts) == [("alice", "laptop"), ("bob", "phone"), ("carol", "phone")]
        await bob.read("alice", ["g-1"])
        frame = await next_of(phone, "receipt")
        assert (frame["kind"], frame["ids"], frame["by"]) == ("read", ["g-1"], "bob")

        again = await phone.send_group("team", b"sender-key ciphertext", id="g-1")
        assert again.ts == sent.ts  # stored once
        assert phone.take_buffered() == [] and dave.take_buffered() == []
    assert await server.store.count("bob", "phone", 0) == 0


async def test_a_group_send_from_a_non_member_or_to_no_group_is_not_member(server, http):
    await http.put("/v1/groups/team", json={"members": ["bob"]}, headers=AUTH)
    async with connect(server.url, token(server, "alice", "phone")) as alice:
        for group in ("team", "nowhere"):
            with pytest.raises(SendRefused) as refused:
                await alice.send_group(group, b"x", id=f"to-{group}")
            assert (refused.value.code, refused.value.frame["ref"]) == ("not_member", f"to-{group}")
        # The connection is still fine.
        await http.post("/v1/groups/team/members", json={"users": ["alice"]}, headers=AUTH)
        assert (await alice.send_group("team", b"x", id="to-team")).id == "to-team"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"group": "team", "to": "bob", "body": b"x"}, "exactly one of 'to' or 'group'"),
        ({"body": b"x"}, "exactly one of 'to' or 'group'"),
        ({"group": "g" * 129, "body": b"x"}, "'group' must be text of 1-128 bytes"),
        ({"group": "", "body": b"x"}, "'group' must be text of 1-128 bytes"),
        ({"group": 7, "body": b"x"}, "'group' must be text of 1-128 bytes"),
        ({"group": "team", "bodies": {"phone": b"x"}}, "'bodies' is not allowed with 'group'"),
        ({"group": "team"}, "'body' must be a byte string"),
        ({"group": "team", "body": "text"}, "'body' must be a byte string"),
        ({"group": "team", "body": b"x", "ttl": 0}, "'ttl' must be an integer"),
    ],
)
async def test_bad_group_sends_get_bad_field_and_store_nothing(server, http, fields, reason):
    await http.put("/v1/users/bob/devices/phone", headers=AUTH)
    await http.put("/v1/groups/team", json={"members": ["alice", "bob"]}, headers=AUTH)
    async with raw_ws(server.url) as ws:
        await hello(ws, token(server, "alice", "phone"))
        await send(ws, {"t": "send", "id": "bad-1", **fields})
        with trio.fail_after(DEADLINE):
            frames = await recv_until(ws, "error")
        [error] = [f for f in frames if f.get("t") == "error"]
        assert (error["code"], error["ref"]) == ("bad_field", "bad-1")
        assert error["reason"].startswith(reason)
        await send(ws, {"t": "send", "id": "good", "group": "team", "body": b"x"})
        with trio.fail_after(DEADLINE):
            assert any(f.get("t") == "sent" for f in await recv_until(ws, "sent"))
    queued = await server.store.fetch("bob", "phone", 0, 10, 0)
    assert [i.msg_id for i in queued if i.kind is ItemKind.MESSAGE] == ["good"]


async def test_offline_member_devices_are_woken_as_for_one_to_one(tmp_path):
    wakes: list[tuple[str, str, bool]] = []

    class Recorder(LogWaker):
        def stored(self, user: str, device: str, urgent: bool) -> None:
            wakes.append((user, device, urgent))

    settings = admin_settings(tmp_path)
    async with (
        running_server(settings, waker=Recorder()) as server,
        httpx.AsyncClient(base_url=server.admin_url, timeout=10) as http,
    ):
        await http.put("/v1/users/bob/devices/phone", headers=AUTH)  # known, never connected
        await http.put("/v1/groups/team", json={"members": ["alice", "bob"]}, headers=AUTH)
        assert wakes == [("bob", "phone", False)]  # the group event: a background wake-up
        async with connect(server.url, token(server, "alice", "phone")) as alice:
            await alice.send_group("team", b"wake up", urgent=True)
        assert wakes[-1] == ("bob", "phone", True)
        async with connect(server.url, token(server, "bob", "phone")) as bob:
            frame = await next_of(bob, "msg")
            assert (frame["body"], frame["group"]) == (b"wake up", "team")


async def test_a_group_send_on_one_node_reaches_members_on_both(tmp_path, shared_redis):
    redis_url, redis_cluster = shared_redis
    settings = cluster_settings(
        tmp_path, redis_url, redis_cluster=redis_cluster, admin={"port": 0, "api_key": "k"}
    )
    auth = {"authorization": "Bearer k"}
    async with (
        running_server(settings, waker=LogWaker()) as a,
        running_server(settings, waker=LogWaker()) as b,
        httpx.AsyncClient(base_url=a.admin_url, timeout=10) as http,
    ):
        members = {"members": ["alice", "bob", "carol"]}
        assert (await http.put("/v1/groups/team", json=members, headers=auth)).status_code == 201
        async with (
            connect(a.url, token(a, "bob", "phone")) as bob,
            connect(b.url, token(b, "carol", "phone")) as carol,
            connect(b.url, token(b, "alice", "phone")) as alice,
        ):
            for client in (bob, carol, alice):
                await client.wait_drained()
            sent = await alice.send_group("team", b"across", id="x-1")
            for client in (bob, carol):
                frame = await next_of(client, "msg")
                assert (frame["id"], frame["body"], frame["group"], frame["ts"]) == (
                    "x-1", b"across", "team", sent.ts,
                )  # fmt: skip
            # Membership is read from Redis: node A's member list is node B's.
            async with httpx.AsyncClient(base_url=b.admin_url, timeout=10) as http_b:
                read = await http_b.get("/v1/groups/team", headers=auth)
            assert read.json()["members"] == ["alice", "bob", "carol"]
        assert b.counters.redis["doorbells_published"] >= 1
