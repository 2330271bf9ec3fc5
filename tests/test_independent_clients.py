"""The device protocol driven by a client the gateway shares no code with: the asyncio
client of the `websockets` package, in its own thread and event loop, against the
gateway running in the test's Trio loop."""

from __future__ import annotations

import asyncio
from typing import Any

import cbor2
import trio
from websockets.asyncio.client import ClientConnection, connect

BOUND = 10.0  # seconds for a whole scenario on loopback


async def send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    await ws.send(cbor2.dumps(frame))


async def frames_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Frames up to and including the first of type `kind`; a message is a map or a batch."""
    seen: list[dict[str, Any]] = []
    while True:
        message = await ws.recv()
        assert isinstance(message, bytes), "the gateway sends binary messages only"
        item = cbor2.loads(message)
        for frame in item if isinstance(item, list) else [item]:
            seen.append(frame)
            if frame["t"] == kind:
                return seen


async def hello(ws: ClientConnection, token: str) -> dict[str, Any]:
    """Authenticate; return `welcome` once `drained` has arrived."""
    await send(ws, {"t": "hello", "v": 1, "token": token})
    frames = await frames_until(ws, "drained")
    assert frames[0]["t"] == "welcome"
    return frames[0]


async def send_deliver_ack_receipt(url: str, alice_token: str, bob_token: str) -> None:
    async with asyncio.timeout(BOUND):
        async with connect(url) as bob:
            assert bob.subprotocol is None
            assert (await hello(bob, bob_token))["user"] == "bob"
            async with connect(url, subprotocols=["gateway.v1"]) as alice:
                assert alice.subprotocol == "gateway.v1"
                await hello(alice, alice_token)

                await send(alice, {"t": "send", "id": "m1", "to": "bob", "body": b"sealed"})
                assert (await frames_until(alice, "sent"))[-1]["id"] == "m1"

                msg = (await frames_until(bob, "msg"))[-1]
                assert (msg["id"], msg["from"], msg["dev"]) == ("m1", "alice", "phone")
                assert msg["body"] == b"sealed"
                await send(bob, {"t": "ack", "sids": [msg["sid"]]})

                receipt = (await frames_until(alice, "receipt"))[-1]
                assert receipt["kind"] == "delivered"
                assert receipt["ids"] == ["m1"]
                assert (receipt["by"], receipt["dev"]) == ("bob", "laptop")


async def test_a_websockets_client_sends_and_the_other_acks_and_the_sender_gets_a_receipt(
    server, token
):
    scenario = send_deliver_ack_receipt(server.url, token("alice", "phone"), token("bob", "laptop"))
    await trio.to_thread.run_sync(asyncio.run, scenario)


async def offered_subprotocol(url: str, bob_token: str) -> str | None:
    async with asyncio.timeout(BOUND), connect(url, subprotocols=["gateway.v1"]) as ws:
        await hello(ws, bob_token)
        return ws.subprotocol


async def test_a_websockets_client_offering_gateway_v1_gets_it_selected(server, token):
    chosen = await trio.to_thread.run_sync(
        asyncio.run, offered_subprotocol(server.url, token("bob", "laptop"))
    )
    assert chosen == "gateway.v1"
