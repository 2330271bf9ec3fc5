"""What only the Redis backend has to show: its key layout, script reloads, and what it
does while Redis is away. The behaviour both backends share is in test_store.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import coredis
import pytest
import trio
import trio.testing
from coredis._utils import hash_slot

from gateway.errors import StoreError
from gateway.store import MessageStore
from gateway.store.redis import SWEEP_LEASE, RedisStore
from gateway.store.redis_scripts import KEY_TTL_SLACK_MS, RECORD_SIZE
from tests.redisproc import RedisClusterProcess, RedisProcess
from tests.test_store import (
    DAY_MS,
    T0,
    envelope,
    fetch_all,
    group_envelope,
    open_backend,
    register,
    send,
)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[MessageStore]:
    async with open_backend("redis", redis_url, lambda *ring: None) as s:
        yield s


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(redis_url) as c:
        yield c


async def test_every_key_of_a_user_shares_one_hash_tag(store, client):
    await register(store, "bob", "phone", "tablet")
    await send(store, envelope())

    keys = sorted(k.decode() for k in await client.keys("*"))

    assert keys and all(k.startswith("gw:{bob}:") for k in keys)
    slots = {hash_slot(k.encode()) for k in keys}  # the slot Redis Cluster would use
    assert len(slots) == 1


async def test_removing_a_device_drops_its_queue_but_never_reuses_its_sids(store, client):
    await register(store, "bob", "phone")
    await send(store, envelope("m1"))
    [old] = await fetch_all(store, "bob", "phone")

    assert await store.remove_device("bob", "phone")
    assert not await client.exists(["gw:{bob}:q:phone", "gw:{bob}:d:phone"])
    await register(store, "bob", "phone")
    await send(store, envelope("m2"))

    [new] = await fetch_all(store, "bob", "phone")
    assert new.sid > old.sid


async def test_remembered_messages_and_queues_expire_in_redis_too(store, client):
    await register(store, "bob", "phone")
    await send(store, envelope(ttl_ms=60_000))

    # Both outlive their longest record or item, by the slack at most.
    for key in ("gw:{bob}:m", "gw:{bob}:q:phone"):
        assert 60_000 < await client.pttl(key) <= 60_000 + KEY_TTL_SLACK_MS


# -- remembered messages: one compact hash per user ---------------------------------------

MANY = 600  # enough to make the hash a few bits deep


async def records(client: coredis.Redis[bytes], key: str) -> int:
    """How many remembered-message records a hash holds."""
    fields = await client.hgetall(key)
    return sum(len(v) for f, v in fields.items() if f not in (b"depth", b"salt")) // RECORD_SIZE


async def test_remembered_messages_take_one_key_and_under_64_bytes_each(store, client):
    await register(store, "bob", "phone")
    tickets = [
        await store.submit_send(envelope(f"m{n}", sender=f"sender{n % 7}", ttl_ms=60_000))
        for n in range(MANY)
    ]
    for ticket in tickets:
        assert not (await ticket.result()).duplicate
    sids = tuple(i.sid for i in await fetch_all(store, "bob", "phone"))
    await (await store.submit_ack("bob", "phone", sids, T0)).result()

    assert sorted(k.decode() for k in await client.keys("gw:{bob}:*")) == [
        "gw:{bob}:d:phone", "gw:{bob}:devs", "gw:{bob}:m", "gw:{bob}:seq:phone",
    ]  # fmt: skip
    assert await client.memory_usage("gw:{bob}:m", samples=0) / MANY < 64
    assert 60_000 < await client.pttl("gw:{bob}:m") <= 60_000 + KEY_TTL_SLACK_MS


async def test_every_remembered_message_is_found_among_many_until_it_expires(store):
    await register(store, "bob", "phone")
    for n in range(MANY):
        await send(store, envelope(f"m{n}", ts=T0 + n, ttl_ms=60_000))

    for n in range(0, MANY, 7):  # each answers its own ts, while it lives
        again = await send(store, envelope(f"m{n}", ts=T0 + 60_000 + n - 1, ttl_ms=60_000))
        assert (again.duplicate, again.ts) == (True, T0 + n)
    later = await send(store, envelope("m0", ts=T0 + 60_000, ttl_ms=60_000))
    assert not later.duplicate  # expired at its logical expiry, with no sweep in between


async def test_a_read_names_only_ids_of_live_records_of_that_sender_and_reader(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await register(store, "carol", "phone")
    for n in range(MANY):  # alice to bob and carol, bob to carol: many records everywhere
        await send(store, envelope(f"m{n}", to="bob", ttl_ms=60_000 if n % 2 else DAY_MS))
        await send(store, envelope(f"c{n}", to="carol"))
        await send(store, envelope(f"b{n}", sender="bob", to="carol"))
    ids = ("m1", "m2", "c1", "b1", "m3")

    now = T0 + 60_000  # the odd ones expired
    read = await store.submit_read("bob", "phone", "alice", ids, now, now + DAY_MS)

    assert await read.result() == 1
    [receipt] = [i for i in await fetch_all(store, "alice", "phone", now) if i.kind.name == "READ"]
    assert receipt.ids == ("m2",)


async def test_each_hash_names_messages_under_a_salt_of_its_own(store, client):
    # So that nobody can choose ids whose records crowd one field of someone's hash.
    await register(store, "bob", "phone")
    await register(store, "carol", "phone")
    await send(store, envelope("m1", to="bob"))
    await send(store, envelope("m1", to="carol"))

    salts, hashes = set(), set()
    for user in ("bob", "carol"):
        fields = await client.hgetall(f"gw:{{{user}}}:m")
        salts.add(fields.pop(b"salt"))
        [rec] = fields.values()
        hashes.add(rec[:8])
    assert len(salts) == len(hashes) == 2


async def test_the_sweep_drops_expired_records_and_then_the_hash(store, client):
    await register(store, "bob", "phone")
    for n in range(MANY):
        await send(store, envelope(f"m{n}", ttl_ms=1000 if n % 2 else DAY_MS))
    assert await records(client, "gw:{bob}:m") == MANY

    await store.sweep_expired(T0 + 1000)

    assert await records(client, "gw:{bob}:m") == MANY // 2
    await store.sweep_expired(T0 + DAY_MS)
    assert not await client.exists(["gw:{bob}:m"])


async def test_records_of_the_layout_before_are_honoured_until_they_expire(store, client):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await store.set_group("team", ("alice", "bob"), T0, 10)
    # As the layout before remembered-message hashes left them.
    expires = T0 + 1000
    await client.set("gw:{bob}:id:alice\0phone\0m1", f"{T0 - 5}|{expires}", px=60_000)
    await client.set("gw:{bob}:rx:alice\0m1", str(expires), px=60_000)
    await client.set("gwg:{team}:id:alice\0phone\0g1", f"{T0 - 7}|{expires}", px=60_000)

    again = await send(store, envelope("m1", ts=T0 + 999))
    group_again = await (await store.submit_group_send(group_envelope("g1", ts=T0 + 999))).result()
    read = await store.submit_read("bob", "phone", "alice", ("m1",), T0 + 999, T0 + DAY_MS)

    assert (again.duplicate, again.ts) == (True, T0 - 5)
    assert (group_again.duplicate, group_again.ts) == (True, T0 - 7)
    assert await read.result() == 1
    assert not (await send(store, envelope("m1", ts=expires))).duplicate
    late = await store.submit_group_send(group_envelope("g1", ts=expires))
    assert not (await late.result()).duplicate


async def test_scripts_lost_by_redis_are_loaded_again(store, client):
    await register(store, "bob", "phone")
    await client.script_flush()

    outcome = await send(store, envelope())

    assert outcome.devices == 1
    assert len(await fetch_all(store, "bob", "phone")) == 1


async def test_sends_fail_while_redis_is_down_and_work_again_after(tmp_path):
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        store = RedisStore(redis.url, doorbell=lambda *ring: None)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await register(store, "bob", "phone")
            await send(store, envelope("before"))
            redis.kill()

            with pytest.raises(StoreError, match="unavailable"):
                await send(store, envelope("during"))
            with pytest.raises(StoreError):
                await fetch_all(store, "bob", "phone")
            assert not store.available
            assert store.counters["errors"] >= 1

            redis.start()
            outcome = await send(store, envelope("after"))

            assert outcome.devices == 1 and store.available
            assert [i.msg_id for i in await fetch_all(store, "bob", "phone")] == ["before", "after"]
            store.close()
    finally:
        redis.stop()


async def test_a_store_started_before_redis_waits_for_it(tmp_path):
    redis = RedisProcess(tmp_path / "redis")
    store = RedisStore(redis.url, doorbell=lambda *ring: None)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            await trio.sleep(0.3)  # let it fail to connect at least once
            assert not store.available and store.counters["errors"] >= 1
            redis.start()
            with trio.fail_after(10):
                assert await store.register_device("bob", "phone", T0)
            store.close()
    finally:
        redis.stop()


async def test_reads_cancelled_in_flight_do_not_use_up_the_connection_pool(store):
    # A connection that ends while its queue read waits on Redis cancels the read; the
    # client's pool must get its connection back, or after as many cancellations as the
    # pool has connections every operation of the gateway waits forever.
    await register(store, "bob", "phone")
    await send(store, envelope())
    for _ in range(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_all, store, "bob", "phone")
            await trio.testing.wait_all_tasks_blocked()  # the read waits on Redis
            nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        assert [item.msg_id for item in await fetch_all(store, "bob", "phone")] == ["m1"]
        await send(store, envelope("m2"))


async def test_one_node_holds_the_sweep_lease_until_it_stops_renewing(redis_url, client):
    lease_ms = 60_000
    async with (
        open_backend("redis", redis_url, lambda *ring: None) as first,
        open_backend("redis", redis_url, lambda *ring: None) as second,
    ):
        assert isinstance(first, RedisStore) and isinstance(second, RedisStore)
        first.node_id, second.node_id = "node-a", "node-b"

        assert await first.may_sweep(lease_ms)
        assert not await second.may_sweep(lease_ms)
        await client.pexpire(SWEEP_LEASE, 1000)
        assert await first.may_sweep(lease_ms)  # the holder renews it for the whole lease
        assert 1000 < await client.pttl(SWEEP_LEASE) <= lease_ms
        assert not await second.may_sweep(lease_ms)

        # The holder stops renewing (it died) and its lease runs out: the other node
        # takes over, and the first one, should it come back, no longer sweeps.
        await client.delete([SWEEP_LEASE])
        assert await second.may_sweep(lease_ms)
        assert not await first.may_sweep(lease_ms)


async def test_a_store_of_one_process_always_sweeps(tmp_path):
    async with open_backend("sqlite", tmp_path / "gateway.db", lambda *ring: None) as store:
        assert await store.may_sweep(1)
        assert await store.may_sweep(1)


def connections_received(cluster: RedisClusterProcess) -> int:
    """TCP connections the cluster's primaries have accepted so far, these queries' own
    (one per primary) included."""
    total = 0
    for server in cluster.primaries:
        info = server.command("INFO", "stats").decode()
        total += int(info.split("total_connections_received:", 1)[1].split()[0])
    return total


async def test_sweeps_on_a_cluster_keep_their_connections(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    store = RedisStore(redis_cluster_url, doorbell=lambda *ring: None, cluster=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await register(store, "bob", "phone")
        await send(store, envelope("m1", ttl_ms=1000))
        await store.sweep_expired(T0)  # the first sweep opens a client per primary
        before = connections_received(redis_cluster)
        assert await store.sweep_expired(T0 + 1000) == 1  # it still finds what expired
        for _ in range(3):
            await store.sweep_expired(T0 + 1000)
        # only the previous line's queries, one connection per primary, came in since
        assert connections_received(redis_cluster) - before == len(redis_cluster.primaries)
        store.close()
