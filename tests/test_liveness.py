"""Heartbeats, slow readers and graceful shutdown: connections that end for a reason."""

from __future__ import annotations

import cbor2
import trio

from gateway.client import connect
from gateway.store.sqlite import SqliteStore
from scripts.kit.lean_client import LeanClient
from tests.conftest import make_settings, running_server
from tests.rawws import close_code, hello, raw_ws


async def test_a_peer_that_never_answers_pings_is_closed(tmp_path, token):
    settings = make_settings(tmp_path, server={"port": 0, "heartbeat": 0.2})
    async with running_server(settings) as server:
        # A peer that reads only when told to and never answers a ping.
        peer = await LeanClient.open(server.url, subprotocol=None)
        await peer.send_message(cbor2.dumps({"t": "hello", "v": 1, "token": token("bob", "phone")}))
        code = await server.edge.wait_for_close("bob", "phone")
        assert code == 1001
        assert await peer.read_until_closed() == 1001


async def test_a_peer_that_answers_pings_stays(tmp_path, token):
    # Real time on purpose: the virtual clock could jump while a pong is on the wire.
    settings = make_settings(tmp_path, server={"port": 0, "heartbeat": 0.1})
    async with (
        running_server(settings) as server,
        connect(server.url, token("bob", "phone")) as bob,
    ):
        await trio.sleep(0.8)  # eight heartbeat rounds are what is under test
        assert bob.connections == 1
        assert server.registry.get("bob", "phone") is not None


async def test_a_reader_that_never_reads_is_closed_with_1013_and_keeps_its_items(tmp_path, token):
    settings = make_settings(tmp_path, server={"port": 0, "write_timeout": 0.5})
    async with running_server(settings) as server:
        peer = await LeanClient.open(server.url, rcvbuf=4096, subprotocol=None)
        await peer.send_message(cbor2.dumps({"t": "hello", "v": 1, "token": token("bob", "phone")}))
        body = b"x" * 60_000
        async with connect(server.url, token("alice", "phone")) as alice:
            closed = server.edge.wait_for_close("bob", "phone")
            async with trio.open_nursery() as nursery:
                result: list[int] = []

                async def watch() -> None:
                    result.append(await closed)

                nursery.start_soon(watch)
                ids = [(await alice.send("bob", body)).id for _ in range(150)]
            assert result == [1013]
        await peer.stream.aclose()
        async with connect(server.url, token("bob", "phone")) as bob:
            got = [(await bob.next_delivery()).frame["id"] for _ in ids]
        assert got == ids


async def test_shutdown_closes_clients_with_1012_and_flushes_the_store(tmp_path, token):
    settings = make_settings(tmp_path)
    async with trio.open_nursery() as nursery:
        from gateway.server import serve_gateway

        server = await nursery.start(serve_gateway, settings)
        async with connect(server.url, token("bob", "phone")):
            pass
        async with raw_ws(server.url) as ws:
            await hello(ws, token("alice", "phone"))
            async with connect(server.url, token("carol", "phone")) as carol:
                for i in range(50):
                    await carol.send("bob", bytes([i]))
                server.shutdown()
                assert await close_code(ws) == 1012
    # serve_gateway has returned: everything acknowledged is in the file.
    store = SqliteStore(settings.store.path, doorbell=lambda *a: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert await store.count("bob", "phone", 0) == 50
        store.close()
