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
from tests.redisproc import RedisProcess
from tests.test_store import T0, envelope, fetch_all, open_backend, register, send


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


async def test_idempotency_records_and_queues_expire_in_redis_too(store, client):
    await register(store, "bob", "phone")
    await send(store, envelope(ttl_ms=60_000))

    assert 0 < await client.pttl("gw:{bob}:id:alice\0phone\0m1") <= 60_000
    assert await client.pttl("gw:{bob}:q:phone") > 60_000  # outlives its longest item


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
