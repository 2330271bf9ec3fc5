"""The load generators' lean client: kernel arrival stamps."""

from __future__ import annotations

import math
import time

import cbor2
import trio

from gateway.client import connect
from scripts.kit.lean_client import LeanClient


async def frames_until(peer: LeanClient, kind: str) -> dict:
    while True:
        item = cbor2.loads(await peer.get_message())
        for frame in item if isinstance(item, list) else [item]:
            if frame["t"] == kind:
                return frame


async def test_an_arrival_is_stamped_when_it_reaches_the_socket_not_when_it_is_read(server, token):
    peer = await LeanClient.open(server.url)
    peer.stamp_arrivals()
    assert math.isnan(peer.arrived_at)
    await peer.send_message(cbor2.dumps({"t": "hello", "v": 1, "token": token("bob", "phone")}))
    await frames_until(peer, "drained")
    async with connect(server.url, token("alice", "phone")) as alice:
        before = time.time()
        await alice.send("bob", b"stamped")
        await trio.lowlevel.wait_readable(peer.stream.socket)
        readable = time.time()
        await trio.sleep(0.2)  # a generator busy with other devices reads this one late
        frame = await frames_until(peer, "msg")
        read = time.time()
    assert frame["body"] == b"stamped"
    assert before <= peer.arrived_at <= readable < read - 0.2
    await peer.aclose()
