"""Two gateway nodes sharing one real redis-server: delivery, 4009 and presence across
nodes. Both nodes run in this process, each on its own port with its own registry,
presence mirror and cluster link; they share nothing but Redis. The tests that take
`shared_redis` run twice: on one redis-server, and on a three-primary Redis Cluster
(``[store] redis_cluster = true``), where the users involved live on different primaries.

The catch-up interval is an hour here, so what crosses nodes within these tests' bounds
crossed on pub/sub, not through the periodic re-read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio

from gateway.auth import mint_token
from gateway.client import connect
from gateway.clock import now_ms
from gateway.server import GatewayServer
from gateway.settings import Settings
from gateway.store import Envelope
from gateway.store.redis import RedisStore, doorbell_channel
from gateway.store.redis_scripts import prefix
from tests.conftest import make_settings, running_server
from tests.rawws import close_code, hello, raw_ws
from tests.redisproc import RedisClusterProcess
from tests.wakers import LogWaker

DEADLINE = 10  # seconds; everything here normally takes milliseconds


@pytest.fixture(params=["redis", "redis-cluster"])
def shared_redis(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """(URL, whether it is a Redis Cluster) of an emptied Redis for two nodes to share.
    On the cluster, bob and alice live on different primaries."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url")), False
    cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
    cluster.flush()
    owners = {cluster.owner_port(f"{prefix(user)}:devs") for user in ("bob", "alice")}
    assert len(owners) == 2, "bob and alice should live on different primaries"
    return cluster.url, True


def cluster_settings(
    tmp_path: Path, redis_url: str, *, redis_cluster: bool = False, **sections: Any
) -> Settings:
    return make_settings(
        tmp_path,
        store={"backend": "redis", "redis_url": redis_url, "redis_cluster": redis_cluster},
        cluster={"node_ttl": 3.0, "catchup_interval": 3600.0},
        presence={"offline_grace": 0.2, "batch_ms": 0},
        **sections,
    )


@asynccontextmanager
async def two_nodes(
    tmp_path: Path, shared: tuple[str, bool], waker_a: Any = None, waker_b: Any = None
) -> AsyncIterator[tuple[GatewayServer, GatewayServer]]:
    redis_url, redis_cluster = shared
    settings = cluster_settings(tmp_path, redis_url, redis_cluster=redis_cluster)
    async with (
        running_server(settings, waker=waker_a or LogWaker()) as a,
        running_server(settings, waker=waker_b or LogWaker()) as b,
    ):
        assert a.node_id != b.node_id
        yield a, b


def tokens(tmp_path: Path) -> Callable[[str, str], str]:
    auth = make_settings(tmp_path).auth
    return lambda user, device: mint_token(auth, user, device)


async def test_a_message_sent_on_one_node_reaches_a_device_on_the_other_at_once(
    tmp_path, shared_redis
):
    token = tokens(tmp_path)
    async with two_nodes(tmp_path, shared_redis) as (a, b):
        async with connect(a.url, token("bob", "phone")) as bob:
            await bob.wait_drained()
            async with connect(b.url, token("alice", "phone")) as alice:
                sent = await alice.send("bob", b"across")
                with trio.fail_after(DEADLINE):
                    delivery = await bob.next_delivery()
                assert (delivery.frame["id"], delivery.frame["body"]) == (sent.id, b"across")
                # ... and bob's ack turns into a delivered receipt for alice on node B.
                with trio.fail_after(DEADLINE):
                    receipt = await alice.next_delivery()
                assert receipt.frame["t"] == "receipt" and receipt.frame["ids"] == [sent.id]
        assert b.counters.redis["doorbells_published"] >= 1
        assert a.counters.redis["doorbells_received"] >= 1


async def test_a_second_connection_on_another_node_closes_the_first_with_4009(
    tmp_path, shared_redis
):
    token = tokens(tmp_path)
    async with two_nodes(tmp_path, shared_redis) as (a, b):
        async with raw_ws(a.url) as first:
            await hello(first, token("bob", "phone"))
            async with raw_ws(b.url) as second:
                await hello(second, token("bob", "phone"))
                with trio.fail_after(DEADLINE):
                    assert await close_code(first) == 4009
                # The newer connection is the one that stays, and gets bob's messages.
                async with connect(a.url, token("alice", "phone")) as alice:
                    await alice.send("bob", b"to the newer one")
                frames = []
                with trio.fail_after(DEADLINE):
                    while not any(f.get("t") == "msg" for f in frames):
                        from tests.rawws import recv

                        frames += await recv(second)
        assert b.counters.redis["kicks_sent"] == 1
        assert a.counters.redis["kicks_received"] == 1


async def test_a_device_connected_on_another_node_gets_no_wake_up(tmp_path, shared_redis):
    token = tokens(tmp_path)
    wakes: list[tuple[str, str]] = []

    class Recorder(LogWaker):
        def stored(self, user: str, device: str, urgent: bool) -> None:
            wakes.append((user, device))

    # A wake-up may come from either node: until B has released bob's claim (soon after
    # the disconnect), a message stored on A rings B, which finds bob connected nowhere.
    async with two_nodes(tmp_path, shared_redis, waker_a=Recorder(), waker_b=Recorder()) as (
        a,
        b,
    ):
        async with connect(b.url, token("bob", "phone")) as bob:  # connected on B
            await bob.wait_drained()
            async with connect(a.url, token("alice", "phone")) as alice:  # sending on A
                await alice.send("bob", b"no push needed")
                with trio.fail_after(DEADLINE):
                    await bob.next_delivery()
        async with connect(a.url, token("alice", "phone")) as alice:
            await alice.send("bob", b"bob is connected nowhere now")
    assert [wake for wake in wakes if wake[0] == "bob"] == [("bob", "phone")]


async def test_presence_is_the_same_seen_from_both_nodes(tmp_path, shared_redis):
    token = tokens(tmp_path)
    async with two_nodes(tmp_path, shared_redis) as (a, b):
        async with connect(a.url, token("bob", "phone")):
            pass  # bob is known, and offline again after the grace period
        async with (
            connect(a.url, token("carol", "phone")) as on_a,
            connect(b.url, token("dave", "phone")) as on_b,
        ):
            with trio.fail_after(DEADLINE):
                await wait_presence(on_a, on_b, online=False)
            async with connect(a.url, token("bob", "phone")):
                with trio.fail_after(DEADLINE):
                    await wait_presence(on_a, on_b, online=True)
            with trio.fail_after(DEADLINE):
                seen = await wait_presence(on_a, on_b, online=False)
            assert seen[0] == seen[1] and seen[0] is not None  # the same last-seen


async def wait_presence(*clients: Any, online: bool) -> list[int | None]:
    """Subscribe each client to bob until bob shows `online`; return each last_seen."""
    seen: list[int | None] = []
    for client in clients:
        await client.subscribe(["bob"])
        while True:
            event = await client.next_event()
            if event.get("t") != "presence":
                continue
            [item] = [i for i in event["items"] if i["user"] == "bob"]
            if item["online"] is online:
                seen.append(item["last_seen"])
                break
    return seen


async def test_a_lost_doorbell_only_delays_delivery_until_the_catch_up(tmp_path, redis_url):
    token = tokens(tmp_path)
    settings = cluster_settings(tmp_path, redis_url).replace(
        cluster={"catchup_interval": 0.5, "node_ttl": 3600.0}  # no renewal in this test
    )
    async with running_server(settings) as node:
        async with connect(node.url, token("bob", "phone")) as bob:
            await bob.wait_drained()
            # Make the registry point at a node that does not exist: the doorbell of the
            # next message goes to a channel nobody listens to.
            async with coredis.Redis.from_url(redis_url) as redis:
                await redis.set("gw:{bob}:node:phone", "ghost|1")
            async with connect(node.url, token("alice", "phone")) as alice:
                await alice.send("bob", b"rung in vain")
            with trio.fail_after(DEADLINE):
                delivery = await bob.next_delivery()
            assert delivery.frame["body"] == b"rung in vain"
        counters = node.counters.redis
        assert counters["doorbells_published"] >= 1
        assert counters["doorbells_received"] == 0  # it came through the catch-up read


async def test_an_item_nobody_was_rung_for_is_not_jumped_over(tmp_path, redis_url):
    # An operation whose answer Redis lost was carried out all the same, and nobody was
    # rung for its item. The next item's sid is then not the connection's cursor + 1, so
    # the connection reads the store instead of delivering the newer item alone.
    token = tokens(tmp_path)
    async with (
        running_server(cluster_settings(tmp_path, redis_url)) as node,
        connect(node.url, token("bob", "phone")) as bob,
    ):
        await bob.wait_drained()
        # A store of the same node that rings nobody stands for the lost answer.
        unrung = RedisStore(redis_url, doorbell=lambda *ring: None, node_id=node.node_id)
        async with trio.open_nursery() as nursery:
            await nursery.start(unrung.run)
            now = now_ms()
            envelope = Envelope("carol", "phone", "c1", "bob", b"unrung", None, True, now,
                                now + 3_600_000)  # fmt: skip
            await (await unrung.submit_send(envelope)).result()
            unrung.close()
        async with connect(node.url, token("alice", "phone")) as alice:
            await alice.send("bob", b"rung")
        with trio.fail_after(DEADLINE):
            first, second = await bob.next_delivery(), await bob.next_delivery()
        assert [first.frame["body"], second.frame["body"]] == [b"unrung", b"rung"]


async def test_on_redis_cluster_doorbells_go_on_the_nodes_sharded_channel(
    tmp_path, redis_cluster
):
    redis_cluster.flush()
    redis_cluster_url = redis_cluster.url
    token = tokens(tmp_path)
    async with two_nodes(tmp_path, (redis_cluster_url, True)) as (a, b):
        async with coredis.RedisCluster.from_url(redis_cluster_url) as redis:
            listening = await redis.pubsub_shardnumsub(doorbell_channel(a.node_id))
        assert listening == {doorbell_channel(a.node_id).encode(): 1}
        async with connect(a.url, token("bob", "phone")) as bob:
            await bob.wait_drained()
            async with connect(b.url, token("alice", "phone")) as alice:
                await alice.send("bob", b"sharded")
                with trio.fail_after(DEADLINE):
                    delivery = await bob.next_delivery()
                assert delivery.frame["body"] == b"sharded"
        assert b.counters.redis["doorbells_published"] >= 1
        assert a.counters.redis["doorbells_received"] >= 1


async def test_a_read_reaches_the_readers_devices_on_both_nodes(tmp_path, shared_redis):
    token = tokens(tmp_path)
    cleared: list[tuple[str, str]] = []

    class Recorder(LogWaker):
        def read_elsewhere(self, user: str, device: str) -> None:
            cleared.append((user, device))

    async with two_nodes(tmp_path, shared_redis, waker_a=Recorder(), waker_b=Recorder()) as (
        a,
        b,
    ):
        async with connect(b.url, token("bob", "phone")):  # known, then connected nowhere
            pass
        async with (
            connect(a.url, token("bob", "laptop")) as laptop,
            connect(b.url, token("bob", "tablet")) as tablet,
        ):
            await laptop.wait_drained()
            await tablet.wait_drained()
            async with connect(a.url, token("alice", "phone")) as alice:
                sent = await alice.send("bob", b"read me")
                with trio.fail_after(DEADLINE):
                    assert (await tablet.next_delivery()).frame["id"] == sent.id
                    assert (await laptop.next_delivery()).frame["id"] == sent.id
                    await tablet.read("alice", [sent.id])  # read on B
                    receipt = (await laptop.next_delivery()).frame  # on A, at once
        assert (receipt["t"], receipt["kind"], receipt["ids"]) == ("receipt", "read", [sent.id])
        assert (receipt["by"], receipt["dev"]) == ("bob", "tablet")
    # The phone, connected nowhere, is handed to a push waker as a read made elsewhere.
    assert cleared == [("bob", "phone")]
