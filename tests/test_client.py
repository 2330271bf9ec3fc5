"""The client SDK: reconnect with backoff, resume of unanswered sends, manual acks."""

from __future__ import annotations

import functools
import random

import cbor2
import pytest
import trio

from gateway.client import Backoff, ClientClosed, connect
from gateway.session import CloseCode


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap():
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [min(4.0, 0.5 * 2**n) for n in range(8)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_backoff_stays_at_its_cap_however_many_attempts_failed():
    backoff = Backoff(base=0.05, cap=0.5, rng=random.Random(7), attempts=2000)

    assert 0 <= backoff.next_delay() <= 0.5


async def test_client_reconnects_after_a_server_side_close_and_keeps_receiving(server, token):
    async with (
        connect(server.url, token("bob", "phone"), backoff=Backoff(base=0.01)) as bob,
        connect(server.url, token("alice", "phone")) as alice,
    ):
        first = server.registry.get("bob", "phone")
        first.request_close(CloseCode.OVERLOADED, "try again later")
        await server.edge.wait_for_close("bob", "phone")
        sent = await alice.send("bob", b"after the reconnect")
        assert (await bob.next_delivery()).frame["id"] == sent.id
        assert bob.connections == 2


async def test_unanswered_sends_are_resent_after_reconnect_without_duplicates(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with connect(server.url, token("alice", "phone"), backoff=Backoff(base=0.01)) as alice:
        conn = server.registry.get("alice", "phone")
        # Close alice's connection before the server can answer: the commit is still
        # pending when the writer is cancelled, so `sent` never reaches the client.
        async with trio.open_nursery() as nursery:
            results = []

            async def send() -> None:
                results.append(await alice.send("bob", b"resent", id="m-resume"))

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            conn.request_close(CloseCode.OVERLOADED, "try again later")
        assert results[0].id == "m-resume"
    async with connect(server.url, token("bob", "phone"), auto_ack=False) as bob:
        await bob.wait_drained()
        ids = [d.frame["id"] for d in bob.take_buffered()]
    assert ids == ["m-resume"]


async def test_manual_ack_leaves_items_queued_until_acked(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with connect(server.url, token("alice", "phone")) as alice:
        await alice.send("bob", b"1")
        await alice.send("bob", b"2")
    async with connect(server.url, token("bob", "phone"), auto_ack=False) as bob:
        await bob.wait_drained()
        first, _second = bob.take_buffered()
        await bob.ack([first.sid])
    async with connect(server.url, token("bob", "phone"), auto_ack=False) as bob:
        await bob.wait_drained()
        assert [d.frame["body"] for d in bob.take_buffered()] == [b"2"]


async def test_refused_token_stops_the_client(server, token):
    with pytest.raises(ClientClosed) as closed:
        async with connect(server.url, "not-a-token"):
            pass
    assert closed.value.code == 4001


async def test_replaced_client_stops_reconnecting(server, token):
    async with (
        connect(server.url, token("bob", "phone"), backoff=Backoff(base=0.01)) as old,
        connect(server.url, token("bob", "phone")),
    ):
        await old.connected.wait()  # woken when the old connection is lost
        with pytest.raises(ClientClosed) as closed:
            await old.send("bob", b"x")
        assert closed.value.code == 4009


async def _pinging_closer(stream: trio.SocketStream) -> None:
    """A server that welcomes the device and answers its close frame with a ping first:
    the ping crosses the client's close handshake."""
    from websockets.frames import Frame, Opcode
    from websockets.server import ServerProtocol

    proto = ServerProtocol(subprotocols=["gateway.v1"])
    welcomed = False
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            proto.receive_data(data)
            for event in proto.events_received():
                if hasattr(event, "headers") and not isinstance(event, Frame):
                    proto.send_response(proto.accept(event))
                elif isinstance(event, Frame) and event.opcode is Opcode.BINARY and not welcomed:
                    welcomed = True
                    proto.send_binary(cbor2.dumps({"t": "welcome", "v": 1, "sid": 0}))
                elif isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                    # The ping goes ahead of the close reply the protocol has queued.
                    await stream.send_all(b"\x89\x00")
            for chunk in proto.data_to_send():
                if chunk:
                    await stream.send_all(chunk)


async def test_a_ping_that_crosses_the_clients_close_does_not_fail_the_close():
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, _pinging_closer, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/", "t", reconnect=False) as client:
            assert client.connections == 1
        nursery.cancel_scope.cancel()
