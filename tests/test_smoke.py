from __future__ import annotations

from gateway.client import connect


async def test_send_and_receive(server, token):
    async with connect(server.url, token("bob", "phone")) as bob:
        await bob.wait_drained()
        async with connect(server.url, token("alice", "phone")) as alice:
            sent = await alice.send("bob", b"hi")
            d = await bob.next_delivery()
            assert d.frame["id"] == sent.id
            assert d.frame["body"] == b"hi"
            r = await alice.next_delivery()
            assert r.frame["t"] == "receipt" and r.frame["ids"] == [sent.id]
