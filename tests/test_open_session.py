"""`MessageStore.open_session`: what a device's `hello` needs from the store, in one round
trip: the revocation check, the durable registration, the first page of its queue and
the number queued, ordered after everything submitted before it.

Every test runs against each backend of test_store.BACKENDS (SQLite on a file, Redis, and
Redis Cluster, where every key the call touches must share one hash slot).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import coredis
import pytest
import trio
import trio.testing

from gateway.errors import StoreError
from gateway.store import MessageStore
from gateway.store.base import ItemKind, SessionOpening
from gateway.store.redis import RedisStore
from tests.redisproc import RedisProcess
from tests.test_store import (
    BACKENDS,
    DAY_MS,
    T0,
    envelope,
    fetch_all,
    open_backend,
    register,
    send,
)

LIMIT = 100


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_path(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path | str:
    """Where the backend keeps its data: a SQLite file, or a Redis URL."""
    if backend == "redis":
        return str(request.getfixturevalue("redis_url"))
    if backend == "redis-cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
    return tmp_path / "store" / "gateway.db"


@pytest.fixture
async def store(backend: str, db_path: Path | str) -> AsyncIterator[MessageStore]:
    async with open_backend(backend, db_path, lambda *ring: None) as s:
        yield s


async def open_session(
    store: MessageStore,
    user: str = "bob",
    device: str = "phone",
    *,
    issued_at: int | None = T0,
    now: int = T0,
    limit: int = LIMIT,
) -> SessionOpening:
    return await store.open_session(user, device, issued_at=issued_at, now=now, limit=limit)


def ids(opening: SessionOpening) -> list[str]:
    return [item.msg_id for item in opening.items]


# -- registration ---------------------------------------------------------------------------


async def test_a_new_device_is_registered_and_has_nothing_queued(store):
    opening = await open_session(store, now=T0 + 7)

    assert opening == SessionOpening(refused=False, items=(), queued=0)
    [record] = await store.devices("bob")
    assert (record.device, record.created, record.last_seen) == ("phone", T0 + 7, T0 + 7)
    assert await store.register_device("bob", "phone", T0 + 8) is False  # known now


async def test_opening_again_keeps_the_first_registration(store):
    await open_session(store, now=T0)
    await open_session(store, now=T0 + 50)

    [record] = await store.devices("bob")
    assert record.created == T0


async def test_a_new_device_receives_what_is_sent_after_it_opened(store):
    await open_session(store)

    outcome = await send(store, envelope())

    assert outcome.devices == 1
    assert ids(await open_session(store)) == ["m1"]


# -- the first page and the count ------------------------------------------------------------


async def test_a_known_device_gets_its_queue_in_order_with_the_count(store):
    await register(store, "bob", "phone")
    for n in range(5):
        await send(store, envelope(f"m{n}"))

    opening = await open_session(store)

    assert not opening.refused
    assert ids(opening) == ["m0", "m1", "m2", "m3", "m4"]
    assert opening.queued == 5
    assert list(opening.items) == await fetch_all(store, "bob", "phone")
    sids = [item.sid for item in opening.items]
    assert sids == sorted(sids)


async def test_a_page_smaller_than_the_queue_still_counts_everything(store):
    await register(store, "bob", "phone")
    for n in range(5):
        await send(store, envelope(f"m{n}"))

    opening = await open_session(store, limit=2)

    assert ids(opening) == ["m0", "m1"]
    assert opening.queued == 5
    assert list(opening.items) == await store.fetch("bob", "phone", 0, 2, T0)


async def test_a_page_exactly_as_long_as_the_queue(store):
    await register(store, "bob", "phone")
    for n in range(3):
        await send(store, envelope(f"m{n}"))

    opening = await open_session(store, limit=3)

    assert ids(opening) == ["m0", "m1", "m2"]
    assert opening.queued == 3


async def test_a_zero_limit_reads_only_the_count(store):
    await register(store, "bob", "phone")
    await send(store, envelope())

    assert await open_session(store, limit=0) == SessionOpening(refused=False, queued=1)


async def test_expired_items_are_neither_read_nor_counted(store):
    await register(store, "bob", "phone")
    await send(store, envelope("long1"))
    await send(store, envelope("short1", ttl_ms=1000))
    await send(store, envelope("long2"))
    await send(store, envelope("short2", ttl_ms=1000))
    await send(store, envelope("long3"))
    now = T0 + 1000  # the short ones expire at exactly this time

    whole = await open_session(store, now=now)
    page = await open_session(store, now=now, limit=2)

    assert ids(whole) == ["long1", "long2", "long3"] and whole.queued == 3
    assert ids(page) == ["long1", "long2"] and page.queued == 3
    assert whole.queued == await store.count("bob", "phone", now)


async def test_receipts_are_read_with_their_ids(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await send(store, envelope("m1"))
    [item] = await fetch_all(store, "bob", "phone")
    await (await store.submit_ack("bob", "phone", (item.sid,), T0 + 1)).result()

    opening = await open_session(store, "alice", "phone", now=T0 + 2)

    [receipt] = opening.items
    assert receipt.kind is ItemKind.DELIVERED and receipt.ids == ("m1",)
    assert opening.queued == 1


async def test_only_this_devices_queue_is_read(store):
    await register(store, "bob", "phone", "tablet")
    await send(store, envelope("both"))
    await send(store, envelope("tablet", bodies={"tablet": b"x"}))

    opening = await open_session(store, "bob", "phone")

    assert ids(opening) == ["both"] and opening.queued == 1


async def test_a_negative_limit_is_refused(store):
    with pytest.raises(ValueError):
        await open_session(store, limit=-1)


# -- revocation -------------------------------------------------------------------------------


async def test_a_token_issued_before_the_revocation_is_refused_and_nothing_registered(store):
    await register(store, "bob", "phone", "tablet")
    await send(store, envelope())
    await store.revoke_device("bob", "phone", T0 + 5)

    for issued_at in (T0, T0 + 5):  # at the revocation counts as before
        opening = await open_session(store, issued_at=issued_at, now=T0 + 10)
        assert opening == SessionOpening(refused=True)

    assert [d.device for d in await store.devices("bob")] == ["tablet"]
    assert await store.revoked_at("bob", "phone") == T0 + 5


async def test_a_token_without_issue_time_is_refused_once_the_device_was_revoked(store):
    await store.revoke_device("bob", "phone", T0 + 5)  # never registered: still remembered

    assert (await open_session(store, issued_at=None, now=T0 + 10)).refused
    assert await store.devices("bob") == []


async def test_a_token_without_issue_time_is_accepted_for_a_device_never_revoked(store):
    opening = await open_session(store, issued_at=None)

    assert not opening.refused
    assert [d.device for d in await store.devices("bob")] == ["phone"]


async def test_a_token_issued_after_the_revocation_is_accepted_and_registers_again(store):
    await open_session(store, now=T0)
    await send(store, envelope("before"))
    await store.revoke_device("bob", "phone", T0 + 5)

    opening = await open_session(store, issued_at=T0 + 6, now=T0 + 10)

    assert opening == SessionOpening(refused=False, items=(), queued=0)  # the queue went
    [record] = await store.devices("bob")
    assert record.created == T0 + 10
    await send(store, envelope("after"))
    assert ids(await open_session(store, issued_at=T0 + 6, now=T0 + 11)) == ["after"]
    # The old token stays refused even now that the device is known again.
    assert (await open_session(store, issued_at=T0 + 5, now=T0 + 12)).refused


async def test_a_revocation_submitted_just_before_is_applied_first(store):
    await open_session(store)
    revoking = trio.Event()

    async def revoke() -> None:
        revoking.set()  # revoke_device submits before its first checkpoint
        await store.revoke_device("bob", "phone", T0 + 5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(revoke)
        await revoking.wait()
        opening = await open_session(store, issued_at=T0 + 1, now=T0 + 6)

    assert opening.refused


# -- ordering ---------------------------------------------------------------------------------


async def test_an_ack_submitted_just_before_is_committed_before_the_read(store):
    await register(store, "bob", "phone")
    for n in range(3):
        await send(store, envelope(f"m{n}"))
    first, second, _ = await fetch_all(store, "bob", "phone")

    ack = await store.submit_ack("bob", "phone", (first.sid, second.sid), T0 + 1)
    opening = await open_session(store, now=T0 + 2)  # the previous connection's ack, unawaited

    assert ids(opening) == ["m2"]
    assert opening.queued == 1
    assert ack.done and ack.outcome() == 2


async def test_receipts_of_an_ack_submitted_just_before_are_read(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await send(store, envelope("m1"))
    [item] = await fetch_all(store, "bob", "phone")

    ack = await store.submit_ack("bob", "phone", (item.sid,), T0 + 1)
    opening = await open_session(store, "alice", "phone", now=T0 + 2)

    assert [i.ids for i in opening.items] == [("m1",)]
    assert opening.queued == 1
    assert ack.done


async def test_sends_submitted_just_before_are_read(store):
    await register(store, "bob", "phone")

    sends = [await store.submit_send(envelope(f"m{n}")) for n in range(3)]
    opening = await open_session(store)

    assert ids(opening) == ["m0", "m1", "m2"] and opening.queued == 3
    assert all(ticket.done for ticket in sends)


async def test_operations_submitted_after_it_still_run(store):
    await register(store, "bob", "phone")
    await send(store, envelope("m0"))
    [item] = await fetch_all(store, "bob", "phone")
    opening: list[SessionOpening] = []
    submitted = trio.Event()

    async def open_first() -> None:
        submitted.set()  # open_session submits before its first checkpoint
        opening.append(await open_session(store))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_first)
        await submitted.wait()
        ack = await store.submit_ack("bob", "phone", (item.sid,), T0 + 1)
        sent = await store.submit_send(envelope("m1"))

    assert ids(opening[0]) == ["m0"]
    assert await ack.result() == 1
    assert (await sent.result()).devices == 1
    assert ids(await open_session(store)) == ["m1"]


# -- Redis: the writer's rounds and failures -----------------------------------------------


async def run_one_batch(store: RedisStore, go: trio.Event) -> None:
    """The writer of a store that is not running: one batch, once `go` is set."""
    await go.wait()
    batch = await store._queue.next_batch(100)
    assert batch is not None
    await store._commit(batch)


def fake_redis(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Answer the store's script calls without Redis; returns the names called, per round."""
    member = b"%d|1|" % (T0 + DAY_MS) + cbor2.dumps([0, "m1", "alice", "phone", T0, True, b"x"])
    answers: dict[str, Any] = {
        "send": [-1],
        "peek": [member],
        "receipts": [],
        "remove_members": 1,
        "open": [0, 1, member],
    }
    rounds: list[list[str]] = []

    async def pipeline(calls: list[tuple[str, Any, Any]], replicas: Any = None) -> list[Any]:
        rounds.append([name for name, _, _ in calls])
        return [answers[name] for name, _, _ in calls]

    monkeypatch.setattr(store, "_pipeline", pipeline)
    return rounds


async def test_redis_runs_the_opening_after_the_last_step_of_an_earlier_ack(monkeypatch):
    store = RedisStore("redis://127.0.0.1:1", doorbell=lambda *ring: None)  # never connects
    rounds = fake_redis(store, monkeypatch)
    go = trio.Event()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_one_batch, store, go)
        before = await store.submit_send(envelope("m0"))
        ack = await store.submit_ack("bob", "phone", (1,), T0)
        nursery.start_soon(open_session, store)
        await trio.testing.wait_all_tasks_blocked()  # the opening is submitted
        after = await store.submit_send(envelope("m2"))
        go.set()

    # The ack reads, queues receipts, then deletes: only then does the opening read, in
    # one call, with the operations submitted after it.
    assert rounds == [["send", "peek"], ["receipts"], ["remove_members"], ["open", "send"]]
    assert before.done and ack.done and after.done


async def test_redis_runs_the_opening_with_earlier_single_step_operations(monkeypatch):
    store = RedisStore("redis://127.0.0.1:1", doorbell=lambda *ring: None)
    rounds = fake_redis(store, monkeypatch)
    go = trio.Event()
    opening: list[SessionOpening] = []

    async def open_and_keep() -> None:
        opening.append(await open_session(store))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_one_batch, store, go)
        await store.submit_send(envelope("m0"))
        nursery.start_soon(open_and_keep)
        await trio.testing.wait_all_tasks_blocked()
        go.set()

    assert rounds == [["send", "open"]]  # one round trip: the send's call comes first
    [result] = opening
    assert ids(result) == ["m1"] and result.queued == 1


async def test_redis_down_fails_the_opening_and_the_ack_before_it(tmp_path):
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        store = RedisStore(redis.url, doorbell=lambda *ring: None)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await register(store, "bob", "phone")
            await send(store, envelope())
            redis.kill()

            with trio.fail_after(10):
                ack = await store.submit_ack("bob", "phone", (1,), T0 + 1)
                with pytest.raises(StoreError, match="unavailable"):
                    await open_session(store)  # waited behind the ack: never sent
                with pytest.raises(StoreError, match="unavailable"):
                    await ack.result()

            redis.start()
            opening = await open_session(store, now=T0 + 2)
            assert ids(opening) == ["m1"] and opening.queued == 1
            store.close()
    finally:
        redis.stop()


async def test_every_key_it_touches_is_under_the_users_hash_tag(redis_url):
    async with open_backend("redis", redis_url, lambda *ring: None) as store:
        await store.revoke_device("bob", "tablet", T0)
        await open_session(store, "bob", "phone")
        await open_session(store, "bob", "tablet", issued_at=T0 - 1)  # refused
    async with coredis.Redis.from_url(redis_url) as client:
        keys = sorted(k.decode() for k in await client.keys("*"))
    assert keys == ["gw:{bob}:d:phone", "gw:{bob}:devs", "gw:{bob}:rev:tablet"]
