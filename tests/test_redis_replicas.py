"""`[store] redis_replicas`: `sent` only once a replica has the write, on a single Redis
with a replica and on a Redis Cluster of three primaries with a replica each.

A replica is frozen (SIGSTOP) for less than the cluster's node timeout, so no failover
starts: the primary keeps answering, but its ``WAIT`` counts no replica.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import trio
from coredis._utils import hash_slot

from gateway.errors import StoreError
from gateway.store.base import Envelope, SendOutcome
from gateway.store.redis import RedisStore
from gateway.store.redis_scripts import prefix
from scripts.kit.loopback import HOST
from scripts.kit.redis_cluster import RedisCluster
from scripts.kit.redis_server import RedisServer
from tests.redisproc import redis_binary
from tests.test_store import envelope, fetch_all, register, send

SYNC_TIMEOUT = 20.0
RETRIES = 20


def _wait_for_link(replica: RedisServer) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT
    while b"master_link_status:up" not in replica.command("INFO", "replication"):
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.05)


@pytest.fixture(params=["redis", "redis-cluster"])
def replicated(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, bool, RedisServer]]:
    """(URL, whether it is a cluster, the replica of bob's primary)."""
    redis_binary()
    if request.param == "redis":
        primary = RedisServer(tmp_path / "primary")
        replica = RedisServer(tmp_path / "replica", args=["--replicaof", HOST, str(primary.port)])
        try:
            primary.start()
            replica.start()
            _wait_for_link(replica)
            yield primary.url, False, replica
        finally:
            replica.kill()
            primary.kill()
        return
    cluster = RedisCluster(tmp_path / "cluster", primaries=3, replicas=1)
    cluster.start()
    try:
        owner = cluster.owner(hash_slot(f"{prefix('bob')}:devs".encode()))
        [replica] = cluster.replicas_of(owner)
        yield cluster.url, True, replica
    finally:
        cluster.stop()


async def test_sent_waits_for_a_replica_and_is_refused_while_none_acknowledges(replicated):
    url, cluster, replica = replicated
    store = RedisStore(
        url, doorbell=lambda *ring: None, cluster=cluster, replicas=1, replica_timeout=0.2
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await register(store, "bob", "phone")
        assert (await send(store, envelope("m1"))).devices == 1

        replica.pause()
        try:
            with pytest.raises(StoreError, match="0 of 1 replicas"):
                await send(store, envelope("m2"))
            # The resend finds m2 stored on the primary: still no `sent` until a replica
            # has it.
            with pytest.raises(StoreError, match="0 of 1 replicas"):
                await send(store, envelope("m2"))
        finally:
            replica.resume()

        outcome = await _send_until_replicated(store, envelope("m2"))
        assert outcome.duplicate
        assert [i.msg_id for i in await fetch_all(store, "bob", "phone")] == ["m1", "m2"]
        assert store.counters["not_replicated"] >= 2
        store.close()


async def _send_until_replicated(store: RedisStore, env: Envelope) -> SendOutcome:
    """Send until the send is answered: a thawed replica may need a moment (bounded)."""
    for _ in range(RETRIES - 1):
        try:
            return cast(SendOutcome, await send(store, env))
        except StoreError:
            await trio.sleep(0.1)
    return cast(SendOutcome, await send(store, env))
