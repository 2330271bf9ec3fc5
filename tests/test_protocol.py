"""Protocol v1 end to end: real loopback sockets, a real SQLite file, the gateway in-process."""

from __future__ import annotations

import cbor2
import jwt
import pytest
import trio

from gateway.client import SendRefused, connect
from tests.rawws import close_code, hello, raw_ws, recv, recv_until, send


async def test_welcome_reports_the_device_and_its_queue(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass  # bob's device is now known
    async with connect(server.url, token("alice", "phone")) as alice:
        await alice.send("bob", b"one")
        await alice.send("bob", b"two")
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("bob", "phone"))
    welcome = frames[0]
    assert welcome["t"] == "welcome"
    assert (welcome["user"], welcome["device"]) == ("bob", "phone")
    assert welcome["queued"] == 2
    assert welcome["heartbeat"] == 30
    assert isinstance(welcome["ts"], int)
    assert [f["t"] for f in frames] == ["welcome", "msg", "msg", "drained"]
    assert [f["body"] for f in frames[1:3]] == [b"one", b"two"]
    assert frames[1]["sid"] < frames[2]["sid"]


async def test_subprotocol_is_selected_when_offered(server):
    async with raw_ws(server.url, subprotocols=["gateway.v1"]) as ws:
        assert ws.subprotocol == "gateway.v1"
    async with raw_ws(server.url) as ws:
        assert ws.subprotocol is None


async def test_message_fields_and_unacked_redelivery(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with connect(server.url, token("alice", "tablet")) as alice:
        sent = await alice.send("bob", b"\x00ciphertext", urgent=False, ttl=60)
    for _ in range(2):  # not acked the first time, so delivered again
        async with raw_ws(server.url) as ws:
            frames = await hello(ws, token("bob", "phone"))
        msg = frames[1]
        assert msg == {
            "t": "msg", "sid": msg["sid"], "id": sent.id, "from": "alice", "dev": "tablet",
            "ts": sent.ts, "body": b"\x00ciphertext", "urgent": False,
        }  # fmt: skip


async def test_ack_deletes_and_sends_delivered_receipt_to_every_sender_device(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with (
        connect(server.url, token("alice", "phone")) as alice,
        connect(server.url, token("alice", "laptop")) as laptop,
    ):
        first = await alice.send("bob", b"1")
        second = await alice.send("bob", b"2")
        async with raw_ws(server.url) as ws:
            frames = await hello(ws, token("bob", "phone"))
            await send(ws, {"t": "ack", "sids": [f["sid"] for f in frames if f["t"] == "msg"]})
            for device in (alice, laptop):
                receipt = (await device.next_delivery()).frame
                assert receipt["t"] == "receipt" and receipt["kind"] == "delivered"
                assert receipt["ids"] == [first.id, second.id]  # coalesced in one item
                assert (receipt["by"], receipt["dev"]) == ("bob", "phone")
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("bob", "phone"))
    assert frames[0]["queued"] == 0 and [f["t"] for f in frames] == ["welcome", "drained"]


async def test_read_receipt_reaches_every_device_of_the_sender(server, token):
    async with (
        connect(server.url, token("alice", "phone")) as alice,
        connect(server.url, token("bob", "phone")) as bob,
    ):
        sent = await alice.send("bob", b"hello")
        msg = await bob.next_delivery()
        await bob.read("alice", [msg.frame["id"]])
        kinds = {}
        while len(kinds) < 2:
            frame = (await alice.next_delivery()).frame
            kinds[frame["kind"]] = frame
        assert kinds["read"]["ids"] == [sent.id]
        assert kinds["read"]["by"] == "bob"


async def test_send_to_self_syncs_the_other_devices_only(server, token):
    async with (
        connect(server.url, token("alice", "phone")) as phone,
        connect(server.url, token("alice", "laptop")) as laptop,
    ):
        await phone.send("alice", b"note to self")
        got = await laptop.next_delivery()
        assert got.frame["body"] == b"note to self"
        await phone.send("alice", b"marker")
        assert (await laptop.next_delivery()).frame["body"] == b"marker"
        # The phone gets the laptop's delivered receipts, never a copy of its own messages.
        for _ in range(2):
            receipt = (await phone.next_delivery()).frame
            assert (receipt["t"], receipt["dev"]) == ("receipt", "laptop")


async def test_bodies_address_devices_individually(server, token):
    for device in ("phone", "laptop", "watch"):
        async with connect(server.url, token("bob", device)):
            pass
    async with connect(server.url, token("alice", "phone")) as alice:
        sent = await alice.send("bob", bodies={"phone": b"for phone", "laptop": b"for laptop",
                                               "toaster": b"?"})  # fmt: skip
    assert sent.skipped == ("toaster",)
    bodies = {}
    for device in ("phone", "laptop", "watch"):
        async with raw_ws(server.url) as ws:
            frames = await hello(ws, token("bob", device))
        bodies[device] = [f["body"] for f in frames if f["t"] == "msg"]
    assert bodies == {"phone": [b"for phone"], "laptop": [b"for laptop"], "watch": []}


async def test_resend_of_the_same_id_is_idempotent(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with raw_ws(server.url) as ws:
        await hello(ws, token("alice", "phone"))
        frame = {"t": "send", "id": "m-1", "to": "bob", "body": b"x"}
        await send(ws, [frame, frame])
        replies: list[dict] = []
        while len(replies) < 2:
            replies += [f for f in await recv(ws) if f["t"] == "sent"]
    assert [r["t"] for r in replies] == ["sent", "sent"]
    assert replies[0]["ts"] == replies[1]["ts"]
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("bob", "phone"))
    assert frames[0]["queued"] == 1


async def test_unknown_recipient(server, token):
    async with connect(server.url, token("alice", "phone")) as alice:
        with pytest.raises(SendRefused) as refused:
            await alice.send("nobody", b"x", id="m-404")
    assert refused.value.frame == {"t": "error", "code": "unknown_recipient", "ref": "m-404",
                                   "reason": "no known device"}  # fmt: skip


async def test_a_second_connection_replaces_the_first_with_4009(server, token):
    async with raw_ws(server.url) as first:
        await hello(first, token("bob", "phone"))
        async with raw_ws(server.url) as second:
            await hello(second, token("bob", "phone"))
            assert await close_code(first) == 4009
            await send(second, {"t": "ack", "sids": []})  # the new one is unaffected
            async with connect(server.url, token("alice", "phone")) as alice:
                await alice.send("bob", b"to the new connection")
            frames = await recv_until(second, "msg")
            assert frames[-1]["body"] == b"to the new connection"


async def test_typing_reaches_only_connected_devices_of_the_target(server, token):
    async with (
        connect(server.url, token("alice", "phone")) as alice,
        connect(server.url, token("bob", "phone")) as bob,
    ):
        await alice.typing("bob", True)
        assert await bob.next_event() == {"t": "typing", "from": "alice", "on": True}


async def test_batches_are_handled_in_order(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with raw_ws(server.url) as ws:
        batch = [{"t": "hello", "v": 1, "token": token("alice", "phone")}] + [
            {"t": "send", "id": f"m{i}", "to": "bob", "body": bytes([i])} for i in range(20)
        ]
        await send(ws, batch)
        replies = []
        while len(replies) < 20:
            replies += [f for f in await recv(ws) if f["t"] == "sent"]
    assert [r["id"] for r in replies] == [f"m{i}" for i in range(20)]
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("bob", "phone"))
    assert [f["body"] for f in frames if f["t"] == "msg"] == [bytes([i]) for i in range(20)]


# -- bad input -----------------------------------------------------------------------------


async def test_text_message_closes_with_1003(server, token):
    async with raw_ws(server.url) as ws:
        await hello(ws, token("alice", "phone"))
        await ws.send_message("hello?")
        assert await close_code(ws) == 1003


async def test_oversized_message_closes_with_1009(server, token):
    async with raw_ws(server.url) as ws:
        await hello(ws, token("alice", "phone"))
        await ws.send_message(cbor2.dumps({"t": "send", "id": "big", "to": "bob",
                                           "body": b"x" * (64 * 1024 + 1)}))  # fmt: skip
        assert await close_code(ws) == 1009


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\xff\x00garbage", "bad_frame"),
        (cbor2.dumps(42), "bad_frame"),
        (cbor2.dumps({"no": "type"}), "bad_frame"),
        (cbor2.dumps({"t": "send", "id": "m", "to": "bob"}), "bad_field"),
        (cbor2.dumps({"t": "ack", "sids": "1,2"}), "bad_field"),
        (cbor2.dumps({"t": "teleport"}), "unknown_type"),
        (cbor2.dumps(cbor2.CBORTag(1, 1700000000)), "bad_frame"),
    ],
)
async def test_bad_frames_get_a_precise_error_and_the_connection_stays(
    server, token, message, code
):
    async with raw_ws(server.url) as ws:
        await hello(ws, token("alice", "phone"))
        await ws.send_message(message)
        (error,) = await recv(ws)
        assert error["t"] == "error" and error["code"] == code
        await send(ws, {"t": "send", "id": "after", "to": "alice", "body": b""})
        (reply,) = await recv(ws)
        assert (reply["t"], reply["id"]) == ("sent", "after")


async def test_bad_field_error_refers_to_the_send(server, token):
    async with raw_ws(server.url) as ws:
        await hello(ws, token("alice", "phone"))
        await send(ws, {"t": "send", "id": "m-7", "to": "bob", "body": "not bytes"})
        (error,) = await recv(ws)
    assert error["code"] == "bad_field" and error["ref"] == "m-7" and "body" in error["reason"]


async def test_repeated_bad_frames_close_with_1008(server, token):
    async with raw_ws(server.url) as ws:
        await hello(ws, token("alice", "phone"))
        await send(ws, [{"t": "ack"}] * 11)
        assert await close_code(ws) == 1008


async def test_frame_before_hello_closes_with_1008(server):
    async with raw_ws(server.url) as ws:
        await send(ws, {"t": "send", "id": "m", "to": "bob", "body": b""})
        assert await close_code(ws) == 1008


@pytest.mark.parametrize(
    "bad_token",
    [
        "not-a-jwt",
        jwt.encode(
            {"sub": "a", "dev": "d", "exp": 1}, "dev-only-jwt-secret-change-me-before-production"
        ),
        jwt.encode({"sub": "a", "dev": "d", "exp": 2**40}, "wrong-secret-of-enough-length-32b"),
        jwt.encode({"sub": "a", "dev": "d", "exp": 2**40}, None, algorithm="none"),
        jwt.encode({"sub": "a", "exp": 2**40}, "dev-only-jwt-secret-change-me-before-production"),
    ],
    ids=["garbage", "expired", "bad-signature", "alg-none", "no-dev-claim"],
)
async def test_bad_tokens_close_with_4001(server, bad_token):
    async with raw_ws(server.url) as ws:
        await send(ws, {"t": "hello", "v": 1, "token": bad_token})
        assert await close_code(ws) == 4001
        assert ws.closed.reason == "unauthorized"


async def test_no_hello_in_time_closes_with_4008(tmp_path):
    from tests.conftest import make_settings, running_server

    settings = make_settings(tmp_path, server={"port": 0, "hello_timeout": 0.2})
    async with running_server(settings) as server, raw_ws(server.url) as ws:
        assert await close_code(ws) == 4008


async def test_acking_someone_elses_sids_deletes_nothing(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with connect(server.url, token("alice", "phone")) as alice:
        await alice.send("bob", b"private")
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("bob", "phone"))
        bob_sid = frames[1]["sid"]
    async with raw_ws(server.url) as ws:
        await hello(ws, token("mallory", "phone"))
        await send(ws, {"t": "ack", "sids": list(range(bob_sid - 5, bob_sid + 5))})
        await send(ws, {"t": "send", "id": "sync", "to": "mallory", "body": b""})
        await recv_until(ws, "sent")  # the ack was committed before this send
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("bob", "phone"))
    assert [f.get("body") for f in frames if f["t"] == "msg"] == [b"private"]


async def test_the_gateway_survives_bad_input_and_others_are_unaffected(server, token):
    async with (
        connect(server.url, token("alice", "phone")) as alice,
        connect(server.url, token("bob", "phone")) as bob,
    ):
        for message in [b"\x9f" * 100, b"\xd9\xd9\xf7", b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff"]:
            async with raw_ws(server.url) as ws:
                await hello(ws, token("mallory", "phone"))
                await ws.send_message(message)
                assert (await recv(ws))[0]["code"] == "bad_frame"
        sent = await alice.send("bob", b"still here")
        assert (await bob.next_delivery()).frame["id"] == sent.id


async def test_a_failing_connection_closes_with_1011_and_the_server_carries_on(server, token):
    from gateway.frames import Typing

    async def explode(conn, frame):
        raise RuntimeError("handler bug")

    server.router._handlers[Typing] = explode
    async with connect(server.url, token("bob", "phone")) as bob:
        async with raw_ws(server.url) as ws:
            await hello(ws, token("alice", "phone"))
            await send(ws, {"t": "typing", "to": "bob", "on": True})
            assert await close_code(ws) == 1011
        async with connect(server.url, token("carol", "phone")) as carol:
            sent = await carol.send("bob", b"unaffected")
        assert (await bob.next_delivery()).frame["id"] == sent.id


async def test_concurrent_senders_reach_an_online_device_in_order_without_store_reads(
    server, token
):
    store = server.store
    reads = 0
    fetch = store.fetch

    async def counting_fetch(user, *args, **kwargs):
        nonlocal reads
        reads += user == "bob"
        return await fetch(user, *args, **kwargs)

    store.fetch = counting_fetch
    async with connect(server.url, token("bob", "phone")) as bob:
        await bob.wait_drained()
        reads_after_drain = reads
        async with trio.open_nursery() as nursery:
            for n in range(5):

                async def sender(n: int = n) -> None:
                    async with connect(server.url, token(f"sender{n}", "phone")) as client:
                        for i in range(50):
                            await client.send("bob", b"x", id=f"{n}-{i}")

                nursery.start_soon(sender)
        got = [(await bob.next_delivery()).frame for _ in range(250)]
    sids = [f["sid"] for f in got]
    assert sids == sorted(sids) and len(set(sids)) == 250
    for n in range(5):  # each sender's own order holds
        assert [f["id"] for f in got if f["from"] == f"sender{n}"] == [
            f"{n}-{i}" for i in range(50)
        ]
    assert reads == reads_after_drain  # delivered from the commit, not read back
