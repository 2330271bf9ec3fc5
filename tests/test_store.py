"""The store contract: durable per-device queues, idempotent sends, receipts, devices, push.

Every test runs against each backend in `BACKENDS` through the `store` fixture. The SQLite
backend runs on a real file in tmp_path, the Redis backend on a real redis-server (the
`redis_url` fixture, emptied for each test). A backend-specific check (reading raw rows)
asks for the `raw` fixture, which skips on backends it does not know.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.errors import StoreClosed, StoreError
from gateway.store import (
    Envelope,
    GroupEnvelope,
    ItemKind,
    MessageStore,
    PushToken,
    QueueItem,
)
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SqliteStore
from push.subscription import WebPushSubscription, b64url_decode

BACKENDS = ["sqlite", "memory", "redis", "redis-cluster"]

T0 = 1_700_000_000_000  # ms since the epoch; the store takes every time from its caller
DAY_MS = 24 * 3600 * 1000
RECEIPT_TTL_MS = 7 * DAY_MS

Ring = tuple[str, str, bool]


@asynccontextmanager
async def open_backend(
    backend: str, path: Path | str, doorbell: Callable[..., None]
) -> AsyncIterator[MessageStore]:
    """A started store for the block; closed (and flushed) on the way out. `path` is the
    SQLite file, or the Redis URL."""
    store: MessageStore
    if backend == "sqlite":
        store = SqliteStore(Path(path), doorbell=doorbell, receipt_ttl_ms=RECEIPT_TTL_MS)
    elif backend in ("redis", "redis-cluster"):
        store = RedisStore(
            str(path),
            doorbell=doorbell,
            receipt_ttl_ms=RECEIPT_TTL_MS,
            cluster=backend == "redis-cluster",
        )
    elif backend == "memory":
        store = MemoryStore(doorbell=doorbell, receipt_ttl_ms=RECEIPT_TTL_MS)
    else:  # pragma: no cover - a new backend must be wired in here
        raise AssertionError(f"unknown backend {backend}")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            yield store
        finally:
            store.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rings() -> list[Ring]:
    """Every doorbell ring, in order."""
    return []


@pytest.fixture
def rung() -> list[tuple[str, str, QueueItem]]:
    """Every doorbell ring with the item it names, in order."""
    return []


@pytest.fixture
def db_path(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path | str:
    """Where the backend keeps its data: a SQLite file, or a Redis URL."""
    if backend == "redis":
        return str(request.getfixturevalue("redis_url"))
    if backend == "redis-cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
    return tmp_path / "store" / "gateway.db"


@pytest.fixture
async def store(
    backend: str, db_path: Path, rings: list[Ring], rung: list[tuple[str, str, QueueItem]]
) -> AsyncIterator[MessageStore]:
    def doorbell(user: str, device: str, urgent: bool, item: QueueItem) -> None:
        rings.append((user, device, urgent))
        rung.append((user, device, item))

    async with open_backend(backend, db_path, doorbell) as s:
        yield s


@pytest.fixture
def durable(backend: str) -> None:
    """Skips on the memory backend, which keeps nothing across a restart by design."""
    if backend == "memory":
        pytest.skip("the memory backend is not durable")


@pytest.fixture
def raw(backend: str, db_path: Path) -> Callable[[str], list[tuple[Any, ...]]]:
    """Run a query on the SQLite file through a connection of its own."""
    if backend != "sqlite":
        pytest.skip("raw rows are a SQLite detail")

    def query(sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(db_path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    return query


def envelope(
    msg_id: str = "m1",
    *,
    sender: str = "alice",
    device: str = "phone",
    to: str = "bob",
    body: bytes | None = b"ciphertext",
    bodies: dict[str, bytes] | None = None,
    urgent: bool = True,
    ts: int = T0,
    ttl_ms: int = DAY_MS,
) -> Envelope:
    return Envelope(
        sender=sender,
        sender_device=device,
        msg_id=msg_id,
        to=to,
        body=None if bodies is not None else body,
        bodies=bodies,
        urgent=urgent,
        ts=ts,
        expires=ts + ttl_ms,
    )


async def register(store: MessageStore, user: str, *devices: str) -> None:
    for device in devices:
        await store.register_device(user, device, T0)


async def send(store: MessageStore, env: Envelope) -> Any:
    return await (await store.submit_send(env)).result()


async def fetch_all(store: MessageStore, user: str, device: str, now: int = T0) -> list[QueueItem]:
    return await store.fetch(user, device, 0, 10_000, now)


# -- devices -------------------------------------------------------------------------------


async def test_registering_a_device_is_true_only_the_first_time(store):
    assert await store.register_device("bob", "phone", T0) is True
    assert await store.register_device("bob", "phone", T0 + 5) is False

    [record] = await store.devices("bob")
    assert (record.user, record.device, record.created) == ("bob", "phone", T0)
    assert record.push is None


async def test_devices_lists_only_that_users_devices(store):
    await register(store, "bob", "tablet", "phone")
    await register(store, "carol", "phone")

    assert [d.device for d in await store.devices("bob")] == ["phone", "tablet"]
    assert await store.devices("nobody") == []


async def test_touch_device_records_last_seen(store):
    await register(store, "bob", "phone")

    await store.touch_device("bob", "phone", T0 + 1234)  # queued for commit, not awaited
    await register(store, "carol", "phone")  # committed after it: a barrier

    [record] = await store.devices("bob")
    assert record.last_seen == T0 + 1234


async def test_remove_device_forgets_it_and_drops_its_queue(store, raw):
    await register(store, "bob", "phone", "tablet")
    await send(store, envelope())

    assert await store.remove_device("bob", "phone") is True
    assert await store.remove_device("bob", "phone") is False

    assert [d.device for d in await store.devices("bob")] == ["tablet"]
    assert await store.register_device("bob", "phone", T0) is True
    assert await fetch_all(store, "bob", "phone") == []
    assert raw("SELECT count(*) FROM queue") == [(1,)]  # only the tablet's copy is left


async def test_revoke_device_forgets_it_drops_its_queue_and_remembers_when(store):
    await register(store, "bob", "phone", "tablet")
    await send(store, envelope())
    assert await store.revoked_at("bob", "phone") is None

    assert await store.revoke_device("bob", "phone", T0 + 5) is True

    assert [d.device for d in await store.devices("bob")] == ["tablet"]
    assert await store.revoked_at("bob", "phone") == T0 + 5
    assert await store.revoked_at("bob", "tablet") is None
    assert await store.register_device("bob", "phone", T0 + 6) is True  # a new token's hello
    assert await fetch_all(store, "bob", "phone") == []
    assert len(await fetch_all(store, "bob", "tablet")) == 1
    assert await store.revoked_at("bob", "phone") == T0 + 5  # registering does not forget it


async def test_revocation_keeps_the_latest_time_and_applies_to_unknown_devices(store):
    assert await store.revoke_device("bob", "stolen", T0 + 9) is False
    assert await store.revoke_device("bob", "stolen", T0 + 3) is False

    assert await store.revoked_at("bob", "stolen") == T0 + 9
    assert await store.revoked_at("alice", "stolen") is None


# -- sending -------------------------------------------------------------------------------


async def test_a_send_is_stored_for_every_device_of_the_recipient(store):
    await register(store, "bob", "phone", "tablet")

    outcome = await send(store, envelope(body=b"secret", urgent=False, ts=T0 + 7))

    assert outcome.ts == T0 + 7
    assert (outcome.devices, outcome.duplicate, outcome.unknown_recipient) == (2, False, False)
    for device in ("phone", "tablet"):
        [item] = await fetch_all(store, "bob", device)
        assert item.kind is ItemKind.MESSAGE
        assert (item.msg_id, item.sender, item.sender_device) == ("m1", "alice", "phone")
        assert (item.ts, item.urgent, item.body) == (T0 + 7, False, b"secret")


async def test_a_send_to_oneself_skips_the_sending_device(store):
    await register(store, "alice", "phone", "laptop", "tablet")

    outcome = await send(store, envelope(to="alice", device="phone"))

    assert outcome.devices == 2
    assert await fetch_all(store, "alice", "phone") == []
    assert len(await fetch_all(store, "alice", "laptop")) == 1
    assert len(await fetch_all(store, "alice", "tablet")) == 1


async def test_a_send_to_an_unknown_recipient_stores_nothing(store, rings):
    outcome = await send(store, envelope(to="nobody"))

    assert outcome.unknown_recipient
    assert outcome.devices == 0
    assert rings == []


async def test_an_unknown_recipient_answer_is_not_remembered_as_sent(store):
    await send(store, envelope(to="bob"))
    await register(store, "bob", "phone")

    outcome = await send(store, envelope(to="bob"))

    assert not outcome.duplicate and outcome.devices == 1


async def test_per_device_bodies_go_only_to_the_devices_named(store, rings):
    await register(store, "bob", "phone", "tablet", "laptop")

    outcome = await send(store, envelope(bodies={"phone": b"P", "tablet": b"T", "watch": b"W"}))

    assert outcome.devices == 2
    assert outcome.skipped == ("watch",)
    assert [i.body for i in await fetch_all(store, "bob", "phone")] == [b"P"]
    assert [i.body for i in await fetch_all(store, "bob", "tablet")] == [b"T"]
    assert await fetch_all(store, "bob", "laptop") == []
    assert sorted(rings) == [("bob", "phone", True), ("bob", "tablet", True)]


async def test_per_device_bodies_for_ones_own_sending_device_are_skipped(store):
    await register(store, "alice", "phone", "laptop")

    outcome = await send(
        store, envelope(to="alice", device="phone", bodies={"phone": b"P", "laptop": b"L"})
    )

    assert (outcome.devices, outcome.skipped) == (1, ("phone",))
    assert await fetch_all(store, "alice", "phone") == []


async def test_a_device_queue_keeps_the_order_of_many_pipelined_sends(store):
    await register(store, "bob", "phone")
    ids = [f"m{i:03d}" for i in range(150)]
    senders = ["alice", "carol", "dave"]

    tickets = [
        await store.submit_send(envelope(msg_id, sender=senders[n % 3]))
        for n, msg_id in enumerate(ids)
    ]
    for ticket in tickets:
        await ticket.result()

    assert [i.msg_id for i in await fetch_all(store, "bob", "phone")] == ids


async def test_sids_are_unique_and_increase_per_device(store, backend):
    await register(store, "bob", "phone", "tablet")
    await register(store, "carol", "phone")
    for n in range(20):
        await send(store, envelope(f"b{n}", to="bob"))
        await send(store, envelope(f"c{n}", to="carol"))

    queues = [
        [i.sid for i in await fetch_all(store, user, device)]
        for user, device in [("bob", "phone"), ("bob", "tablet"), ("carol", "phone")]
    ]

    for sids in queues:
        assert len(sids) == 20
        assert sids == sorted(sids) and len(set(sids)) == len(sids)
    if backend == "sqlite":  # one global sequence; the contract only asks per device
        assert len({sid for sids in queues for sid in sids}) == 60


async def test_a_resend_within_the_ttl_is_a_duplicate_with_the_original_ts(store, rings):
    await register(store, "bob", "phone")
    first = await send(store, envelope(ts=T0))
    rings.clear()

    again = await send(store, envelope(ts=T0 + 60_000, body=b"different"))

    assert again.duplicate
    assert again.ts == first.ts == T0
    assert [i.body for i in await fetch_all(store, "bob", "phone")] == [b"ciphertext"]
    assert rings == []


async def test_the_same_id_from_another_sender_device_is_a_new_message(store):
    await register(store, "bob", "phone")
    await send(store, envelope(device="phone"))

    outcome = await send(store, envelope(device="laptop", ts=T0 + 1))

    assert not outcome.duplicate
    assert [i.sender_device for i in await fetch_all(store, "bob", "phone")] == ["phone", "laptop"]


async def test_the_same_id_from_another_sender_user_is_a_new_message(store):
    await register(store, "bob", "phone")
    await send(store, envelope(sender="alice"))

    assert not (await send(store, envelope(sender="carol"))).duplicate


# -- doorbells -----------------------------------------------------------------------------


async def test_the_doorbell_rings_once_per_stored_device_with_the_urgency(store, rings):
    await register(store, "bob", "phone", "tablet")

    await send(store, envelope("m1", urgent=True))
    await send(store, envelope("m2", urgent=False))

    assert sorted(rings[:2]) == [("bob", "phone", True), ("bob", "tablet", True)]
    assert sorted(rings[2:]) == [("bob", "phone", False), ("bob", "tablet", False)]


async def test_the_doorbell_rings_only_after_the_item_is_committed(backend, db_path):
    if backend != "sqlite":
        pytest.skip("reads the committed rows of the SQLite file")
    visible: list[int] = []

    def doorbell(user: str, device: str, urgent: bool, item: object) -> None:
        # A separate connection sees only committed data.
        conn = sqlite3.connect(db_path)
        try:
            visible.append(conn.execute("SELECT count(*) FROM queue").fetchone()[0])
        finally:
            conn.close()

    async with open_backend(backend, db_path, doorbell) as store:
        await register(store, "bob", "phone")
        ticket = await store.submit_send(envelope())
        await ticket.result()

    assert visible == [1]


# -- acks and receipts ---------------------------------------------------------------------


async def test_an_ack_deletes_the_acked_items_of_that_device_only(store):
    await register(store, "bob", "phone", "tablet")
    for n in range(3):
        await send(store, envelope(f"m{n}"))
    phone = await fetch_all(store, "bob", "phone")

    deleted = await (
        await store.submit_ack("bob", "phone", (phone[0].sid, phone[2].sid), T0)
    ).result()

    assert deleted == 2
    assert [i.msg_id for i in await fetch_all(store, "bob", "phone")] == ["m1"]
    assert len(await fetch_all(store, "bob", "tablet")) == 3


async def test_a_device_acking_another_devices_sids_deletes_nothing(store, rings):
    await register(store, "bob", "phone", "tablet")
    await register(store, "alice", "phone")
    await send(store, envelope(bodies={"phone": b"only the phone's"}))
    [item] = await fetch_all(store, "bob", "phone")
    rings.clear()

    deleted = await (await store.submit_ack("bob", "tablet", (item.sid,), T0)).result()
    foreign = await (await store.submit_ack("carol", "phone", (item.sid,), T0)).result()

    assert (deleted, foreign) == (0, 0)
    assert await fetch_all(store, "bob", "phone") == [item]
    assert await fetch_all(store, "alice", "phone") == []  # no receipt for a failed ack
    assert rings == []


async def test_acking_unknown_sids_is_harmless(store):
    await register(store, "bob", "phone")

    assert await (await store.submit_ack("bob", "phone", (), T0)).result() == 0
    assert await (await store.submit_ack("bob", "phone", (999_999,), T0)).result() == 0


async def test_acking_messages_queues_one_delivered_receipt_per_sender_device(store, rings):
    await register(store, "alice", "phone", "laptop")
    await register(store, "carol", "phone")
    await register(store, "bob", "phone")
    await send(store, envelope("a1", sender="alice", device="phone"))
    await send(store, envelope("a2", sender="alice", device="laptop"))
    await send(store, envelope("a3", sender="alice", device="phone"))
    await send(store, envelope("c1", sender="carol", device="phone"))
    sids = tuple(i.sid for i in await fetch_all(store, "bob", "phone"))
    rings.clear()

    assert await (await store.submit_ack("bob", "phone", sids, T0 + 500)).result() == 4

    for device in ("phone", "laptop"):
        [receipt] = await fetch_all(store, "alice", device, now=T0 + 500)
        assert receipt.kind is ItemKind.DELIVERED
        assert sorted(receipt.ids) == ["a1", "a2", "a3"]
        assert (receipt.sender, receipt.sender_device, receipt.ts) == ("bob", "phone", T0 + 500)
        assert receipt.urgent is False
    [receipt] = await fetch_all(store, "carol", "phone", now=T0 + 500)
    assert receipt.ids == ("c1",)
    assert sorted(rings) == [
        ("alice", "laptop", False),
        ("alice", "phone", False),
        ("carol", "phone", False),
    ]


async def test_delivered_receipts_expire_after_the_receipt_ttl(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await send(store, envelope())
    [item] = await fetch_all(store, "bob", "phone")
    await (await store.submit_ack("bob", "phone", (item.sid,), T0)).result()

    assert await store.count("alice", "phone", T0 + RECEIPT_TTL_MS - 1) == 1
    assert await store.count("alice", "phone", T0 + RECEIPT_TTL_MS) == 0


async def test_acking_receipts_generates_no_receipts(store, rings):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await send(store, envelope())
    [item] = await fetch_all(store, "bob", "phone")
    await (await store.submit_ack("bob", "phone", (item.sid,), T0)).result()
    [receipt] = await fetch_all(store, "alice", "phone")
    rings.clear()

    assert await (await store.submit_ack("alice", "phone", (receipt.sid,), T0)).result() == 1

    assert await fetch_all(store, "alice", "phone") == []
    assert await fetch_all(store, "bob", "phone") == []
    assert rings == []


async def test_a_read_queues_a_read_receipt_for_every_device_of_the_sender(store, rings):
    await register(store, "alice", "phone", "laptop")
    await register(store, "bob", "tablet")
    await send(store, envelope("m1", to="bob"))
    await send(store, envelope("m2", device="laptop", to="bob"))
    rings.clear()

    count = await (
        await store.submit_read("bob", "tablet", "alice", ("m1", "m2"), T0 + 9, T0 + DAY_MS)
    ).result()

    assert count == 2
    for device in ("phone", "laptop"):
        [receipt] = await fetch_all(store, "alice", device, now=T0 + 9)
        assert receipt.kind is ItemKind.READ
        assert receipt.ids == ("m1", "m2")
        assert (receipt.sender, receipt.sender_device, receipt.ts) == ("bob", "tablet", T0 + 9)
    assert sorted(rings) == [("alice", "laptop", False), ("alice", "phone", False)]


async def test_a_read_queues_the_same_read_receipt_for_the_readers_other_devices(store, rings):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone", "tablet", "laptop")
    await send(store, envelope("m1", to="bob"))
    before = {d: await fetch_all(store, "bob", d) for d in ("phone", "tablet", "laptop")}
    rings.clear()

    count = await (
        await store.submit_read("bob", "tablet", "alice", ("m1", "made-up"), T0 + 9, T0 + DAY_MS)
    ).result()

    assert count == 3  # alice's phone, and bob's phone and laptop
    for device in ("phone", "laptop"):
        queued = await fetch_all(store, "bob", device, T0 + 9)
        [sync] = [i for i in queued if i not in before[device]]
        assert sync.kind is ItemKind.READ
        assert (sync.ids, sync.sender, sync.sender_device, sync.ts) == (
            ("m1",), "bob", "tablet", T0 + 9
        )  # fmt: skip
    assert await fetch_all(store, "bob", "tablet", T0 + 9) == before["tablet"]
    assert sorted(rings) == [("alice", "phone", False), ("bob", "laptop", False),
                             ("bob", "phone", False)]  # fmt: skip


async def test_a_read_sync_receipt_is_acked_like_any_receipt(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone", "tablet")
    await send(store, envelope("m1", to="bob"))
    [message] = await fetch_all(store, "bob", "phone")
    await (await store.submit_read("bob", "tablet", "alice", ("m1",), T0, T0 + DAY_MS)).result()
    [_, sync] = await fetch_all(store, "bob", "phone")

    acked = await store.submit_ack("bob", "phone", (message.sid, sync.sid), T0 + 1)

    assert await acked.result() == 2
    assert await fetch_all(store, "bob", "phone", T0 + 1) == []
    # Only the message's ack makes a delivered receipt; the read sync's makes none.
    kinds = [i.kind for i in await fetch_all(store, "alice", "phone", T0 + 1)]
    assert kinds == [ItemKind.READ, ItemKind.DELIVERED]


async def test_a_read_of_nothing_the_reader_was_sent_syncs_nothing(store, rings):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone", "tablet")
    rings.clear()

    count = await (
        await store.submit_read("bob", "tablet", "alice", ("made-up",), T0, T0 + DAY_MS)
    ).result()

    assert count == 0
    assert await fetch_all(store, "bob", "phone") == []
    assert rings == []


async def test_a_read_carries_only_ids_the_reader_was_sent_by_that_user(store, rings):
    await register(store, "alice", "phone")
    await register(store, "bob", "tablet")
    await register(store, "carol", "phone")
    await send(store, envelope("to-bob", to="bob"))
    await send(store, envelope("to-carol", to="carol"))
    await send(store, envelope("carol-to-bob", sender="carol", to="bob"))
    before = await fetch_all(store, "alice", "phone")

    # bob names alice's message to carol, carol's message to him, and an id never sent.
    ids = ("to-carol", "carol-to-bob", "made-up", "to-bob", "to-bob")
    count = await (await store.submit_read("bob", "tablet", "alice", ids, T0, T0 + DAY_MS)).result()

    assert count == 1
    [receipt] = [i for i in await fetch_all(store, "alice", "phone") if i not in before]
    assert receipt.ids == ("to-bob",)


async def test_a_read_naming_only_ids_never_sent_to_the_reader_queues_nothing(store, rings):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await register(store, "mallory", "phone")
    await send(store, envelope("secret", to="bob"))
    rings.clear()

    for ids in (("secret",), ("guess-1", "guess-2")):
        queued = await (
            await store.submit_read("mallory", "phone", "alice", ids, T0, T0 + DAY_MS)
        ).result()
        assert queued == 0
    assert await fetch_all(store, "alice", "phone") == []
    assert rings == []


async def test_a_read_after_the_message_expired_queues_nothing(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await send(store, envelope("m1", to="bob", ttl_ms=1000))

    late = T0 + 1000
    assert (
        await (await store.submit_read("bob", "phone", "alice", ("m1",), late, late + 1)).result()
        == 0
    )


async def test_a_read_for_an_unknown_user_queues_nothing(store, rings):
    assert (
        await (await store.submit_read("bob", "tablet", "nobody", ("m1",), T0, T0 + 1)).result()
        == 0
    )
    assert rings == []


# -- reading the queue ---------------------------------------------------------------------


async def test_fetch_pages_by_after_sid_and_limit(store):
    await register(store, "bob", "phone")
    for n in range(5):
        await send(store, envelope(f"m{n}"))
    everything = await fetch_all(store, "bob", "phone")

    first = await store.fetch("bob", "phone", 0, 2, T0)
    rest = await store.fetch("bob", "phone", first[-1].sid, 100, T0)

    assert [i.msg_id for i in first] == ["m0", "m1"]
    assert [i.msg_id for i in rest] == ["m2", "m3", "m4"]
    assert first + rest == everything
    assert await store.fetch("bob", "phone", everything[-1].sid, 100, T0) == []


async def test_fetch_and_count_skip_expired_items(store):
    await register(store, "bob", "phone")
    await send(store, envelope("short", ttl_ms=1000))
    await send(store, envelope("long", ttl_ms=DAY_MS))

    assert await store.count("bob", "phone", T0 + 999) == 2
    assert [i.msg_id for i in await fetch_all(store, "bob", "phone", T0 + 1000)] == ["long"]
    assert await store.count("bob", "phone", T0 + 1000) == 1
    assert await store.count("bob", "phone", T0 + DAY_MS) == 0


async def test_count_is_per_device(store):
    await register(store, "bob", "phone", "tablet")
    await send(store, envelope("m1", bodies={"phone": b"p"}))
    await send(store, envelope("m2"))

    assert await store.count("bob", "phone", T0) == 2
    assert await store.count("bob", "tablet", T0) == 1
    assert await store.count("bob", "nothing", T0) == 0


# -- expiry --------------------------------------------------------------------------------


async def test_sweep_deletes_expired_items_only(store):
    await register(store, "bob", "phone")
    await send(store, envelope("short", ttl_ms=1000))
    await send(store, envelope("long", ttl_ms=DAY_MS))

    assert await store.sweep_expired(T0 + 999) == 0
    assert await store.sweep_expired(T0 + 1000) == 1

    # Even a reader whose clock is behind no longer sees the swept item.
    assert [i.msg_id for i in await fetch_all(store, "bob", "phone", now=T0)] == ["long"]


async def test_one_sweep_reaches_every_users_queue(store):
    # Thirty users: on a Redis Cluster their queues lie on every primary.
    users = [f"user{n}" for n in range(30)]
    for user in users:
        await register(store, user, "phone")
    tickets = []
    for user in users:  # submitted together: one batch across every user (and slot)
        tickets.append(await store.submit_send(envelope(f"short-{user}", to=user, ttl_ms=1000)))
        tickets.append(await store.submit_send(envelope(f"long-{user}", to=user)))
    for ticket in tickets:
        assert not (await ticket.result()).duplicate

    assert await store.sweep_expired(T0 + 1000) == len(users)

    for user in users:
        assert [i.msg_id for i in await fetch_all(store, user, "phone", now=T0)] == [f"long-{user}"]


async def test_a_resend_after_the_ttl_is_stored_again(store):
    await register(store, "bob", "phone")
    await send(store, envelope(ts=T0, ttl_ms=1000))
    await store.sweep_expired(T0 + 1000)

    outcome = await send(store, envelope(ts=T0 + 5000, ttl_ms=1000))

    assert not outcome.duplicate
    assert outcome.ts == T0 + 5000
    assert [i.ts for i in await fetch_all(store, "bob", "phone", now=T0 + 5000)] == [T0 + 5000]


async def test_sweep_deletes_expired_idempotency_records(store, raw):
    await register(store, "bob", "phone")
    await send(store, envelope("old", ttl_ms=1000))
    await send(store, envelope("new", ttl_ms=DAY_MS))

    await store.sweep_expired(T0 + 1000)

    assert raw("SELECT msg_id FROM sent_ids") == [("new",)]


async def test_one_sweep_deletes_every_expired_idempotency_record(store, raw, monkeypatch):
    # With a slice of 2, five acked (so already deleted) messages leave five expired
    # idempotency records and no expired items: the sweep must still take them all.
    monkeypatch.setattr("gateway.store.sqlite.SWEEP_SLICE", 2)
    await register(store, "bob", "phone")
    for n in range(5):
        await send(store, envelope(f"m{n}", ttl_ms=1000))
    sids = tuple(i.sid for i in await fetch_all(store, "bob", "phone"))
    await (await store.submit_ack("bob", "phone", sids, T0)).result()

    await store.sweep_expired(T0 + 1000)

    assert raw("SELECT count(*) FROM sent_ids") == [(0,)]


# -- push tokens ---------------------------------------------------------------------------


async def test_a_push_token_is_set_replaced_and_removed(store):
    await register(store, "bob", "phone")
    apns = PushToken("apns", "tok-1", "com.example.app", True, T0)
    fcm = PushToken("fcm", "tok-2", None, False, T0 + 10)

    assert await store.push_token("bob", "phone") is None
    await store.set_push_token("bob", "phone", apns)
    assert await store.push_token("bob", "phone") == apns
    [record] = await store.devices("bob")
    assert record.push == apns

    await store.set_push_token("bob", "phone", fcm)
    assert await store.push_token("bob", "phone") == fcm

    await store.set_push_token("bob", "phone", None)
    assert await store.push_token("bob", "phone") is None


async def test_a_push_token_belongs_to_one_device(store):
    await register(store, "bob", "phone", "tablet")

    await store.set_push_token("bob", "phone", PushToken("fcm", "tok", None, False, T0))

    assert await store.push_token("bob", "tablet") is None
    assert await store.push_token("nobody", "phone") is None


async def test_clear_push_token_removes_a_token_registered_before_the_push(store):
    await register(store, "bob", "phone")
    await store.set_push_token("bob", "phone", PushToken("apns", "tok", None, False, T0))

    assert await store.clear_push_token("bob", "phone", "tok", sent_at=T0 + 100) is True
    assert await store.push_token("bob", "phone") is None


async def test_clear_push_token_keeps_a_token_re_registered_after_the_push(store):
    await register(store, "bob", "phone")
    token = PushToken("apns", "tok", None, False, T0 + 200)
    await store.set_push_token("bob", "phone", token)

    assert await store.clear_push_token("bob", "phone", "tok", sent_at=T0 + 100) is False
    assert await store.push_token("bob", "phone") == token


async def test_clear_push_token_keeps_a_different_token(store):
    await register(store, "bob", "phone")
    token = PushToken("apns", "new-tok", None, False, T0)
    await store.set_push_token("bob", "phone", token)

    assert await store.clear_push_token("bob", "phone", "old-tok", sent_at=T0 + 100) is False
    assert await store.push_token("bob", "phone") == token


async def test_a_web_push_subscription_is_kept_verbatim_and_cleared_like_a_token(store):
    """Subscriptions travel in the token field: long JSON with quotes, colons and slashes."""
    await register(store, "bob", "browser")
    endpoint = "https://wns2-par02p.notify.windows.com/w/?token=" + "Ab+/=" * 80
    key = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
    text = WebPushSubscription(endpoint, b64url_decode(key), bytes(16)).to_token()
    token = PushToken("webpush", text, None, False, T0)
    await store.set_push_token("bob", "browser", token)

    stored = await store.push_token("bob", "browser")
    assert stored == token
    assert WebPushSubscription.from_token(stored.token).endpoint == endpoint
    assert await store.clear_push_token("bob", "browser", text, sent_at=T0 - 1) is False
    assert await store.clear_push_token("bob", "browser", text, sent_at=T0 + 1) is True
    assert await store.push_token("bob", "browser") is None


# -- commits -------------------------------------------------------------------------------


async def test_concurrent_sends_share_commits(store):
    await register(store, "bob", "phone")
    commits_before = store.commits
    outcomes: dict[int, Any] = {}

    async def one(n: int) -> None:
        outcomes[n] = await send(store, envelope(f"m{n}", sender=f"user{n}"))

    async with trio.open_nursery() as nursery:
        for n in range(200):
            nursery.start_soon(one, n)

    assert len(outcomes) == 200
    assert all(o.devices == 1 and not o.duplicate for o in outcomes.values())
    assert await store.count("bob", "phone", T0) == 200
    assert store.commits - commits_before < 200


async def test_acks_committed_together_each_take_only_their_own_devices_items(store, rung):
    await register(store, "alice", "phone", "laptop")
    await register(store, "bob", "phone", "tablet")
    await register(store, "carol", "phone")
    await send(store, envelope("m1"))  # alice -> bob
    await send(store, envelope("m2", sender="carol"))  # carol -> bob
    await send(store, envelope("m3", to="carol"))  # alice -> carol
    [a1, a2] = [i.sid for i in await fetch_all(store, "bob", "phone")]
    [b1, b2] = [i.sid for i in await fetch_all(store, "bob", "tablet")]
    [c1] = [i.sid for i in await fetch_all(store, "carol", "phone")]
    rung.clear()
    commits = store.commits

    tickets = [  # submitted before the writer runs: one batch, one commit
        await store.submit_ack("bob", "phone", (a1, b1, a1), T0 + 1),  # b1 is the tablet's
        await store.submit_ack("bob", "tablet", (b1, b2), T0 + 2),
        await store.submit_ack("carol", "phone", (c1, c1 + 1000), T0 + 3),  # no such item
    ]

    assert [await t.result() for t in tickets] == [1, 2, 1]
    assert store.commits == commits + 1
    assert [i.msg_id for i in await fetch_all(store, "bob", "phone")] == ["m2"]
    assert await fetch_all(store, "bob", "tablet") == []
    receipts = sorted(
        (user, device, item.sender, item.sender_device, item.ids, item.ts)
        for user, device, item in rung
    )
    assert receipts == [
        ("alice", "laptop", "bob", "phone", ("m1",), T0 + 1),
        ("alice", "laptop", "bob", "tablet", ("m1",), T0 + 2),
        ("alice", "laptop", "carol", "phone", ("m3",), T0 + 3),
        ("alice", "phone", "bob", "phone", ("m1",), T0 + 1),
        ("alice", "phone", "bob", "tablet", ("m1",), T0 + 2),
        ("alice", "phone", "carol", "phone", ("m3",), T0 + 3),
        ("carol", "phone", "bob", "tablet", ("m2",), T0 + 2),
    ]
    for user, device, item in rung:  # each ring names the receipt stored for that device
        assert item.sid in [i.sid for i in await fetch_all(store, user, device)]


async def test_a_failing_operation_fails_alone(store):
    await register(store, "bob", "phone")

    before = await store.submit_send(envelope("m1"))
    bad = await store.submit_ack("bob", "phone", (2**64,), T0)  # beyond SQLite's integers
    after = await store.submit_send(envelope("m2"))

    assert (await before.result()).devices == 1
    with pytest.raises(StoreError):
        await bad.result()
    assert (await after.result()).devices == 1
    assert [i.msg_id for i in await fetch_all(store, "bob", "phone")] == ["m1", "m2"]


# -- lifecycle -----------------------------------------------------------------------------


async def test_data_survives_closing_and_reopening_the_file(backend, db_path, durable):
    async with open_backend(backend, db_path, lambda *ring: None) as store:
        await register(store, "bob", "phone")
        await store.set_push_token("bob", "phone", PushToken("fcm", "tok", None, False, T0))
        await send(store, envelope("m1"))
        await send(store, envelope("m2"))
        [_, newest] = await fetch_all(store, "bob", "phone")
        await (await store.submit_ack("bob", "phone", (newest.sid,), T0)).result()

    async with open_backend(backend, db_path, lambda *ring: None) as store:
        assert [d.device for d in await store.devices("bob")] == ["phone"]
        assert await store.push_token("bob", "phone") == PushToken("fcm", "tok", None, False, T0)
        assert [i.msg_id for i in await fetch_all(store, "bob", "phone")] == ["m1"]
        assert (await send(store, envelope("m2"))).duplicate


async def test_sids_are_never_reused_even_across_restarts(backend, db_path, durable):
    # Acking the newest item and restarting must not hand its sid to the next item: a
    # late ack of the old sid would otherwise delete a message never delivered.
    async with open_backend(backend, db_path, lambda *ring: None) as store:
        await register(store, "bob", "phone")
        await send(store, envelope("m1"))
        await send(store, envelope("m2"))
        [_, newest] = await fetch_all(store, "bob", "phone")
        await (await store.submit_ack("bob", "phone", (newest.sid,), T0)).result()

    async with open_backend(backend, db_path, lambda *ring: None) as store:
        await send(store, envelope("m3"))
        [_, m3] = await fetch_all(store, "bob", "phone")

    assert m3.sid > newest.sid


async def test_close_commits_what_was_already_submitted(backend, db_path, durable):
    async with open_backend(backend, db_path, lambda *ring: None) as store:
        await register(store, "bob", "phone")
        tickets = [await store.submit_send(envelope(f"m{n}")) for n in range(10)]
        store.close()
        outcomes = [await t.result() for t in tickets]

    assert all(o.devices == 1 for o in outcomes)
    async with open_backend(backend, db_path, lambda *ring: None) as store:
        assert await store.count("bob", "phone", T0) == 10


async def test_after_close_submissions_raise_store_closed(store):
    await register(store, "bob", "phone")

    store.close()

    with pytest.raises(StoreClosed):
        await store.submit_send(envelope())
    with pytest.raises(StoreClosed):
        await store.submit_ack("bob", "phone", (1,), T0)
    with pytest.raises(StoreClosed):
        await store.submit_read("bob", "phone", "alice", ("m1",), T0, T0 + 1)
    with pytest.raises(StoreClosed):
        await store.register_device("carol", "phone", T0)
    with pytest.raises(StoreClosed):
        await store.sweep_expired(T0)


def test_store_closed_is_a_store_error():
    assert issubclass(StoreClosed, StoreError)


async def test_a_file_from_before_read_checking_gains_the_recipient_column(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE sent_ids (sender TEXT NOT NULL, sender_device TEXT NOT NULL,"
        " msg_id TEXT NOT NULL, ts INTEGER NOT NULL, expires INTEGER NOT NULL,"
        " PRIMARY KEY (sender, sender_device, msg_id)) WITHOUT ROWID;"
        f"INSERT INTO sent_ids VALUES ('alice', 'phone', 'old', {T0}, {T0 + DAY_MS});"
    )
    old.close()

    async with open_backend("sqlite", path, lambda *a: None) as store:
        await register(store, "alice", "phone")
        await register(store, "bob", "phone")
        await send(store, envelope("new", to="bob"))
        ids = ("old", "new")
        assert (
            await (await store.submit_read("bob", "phone", "alice", ids, T0, T0 + 1)).result() == 1
        )
        [receipt] = await fetch_all(store, "alice", "phone")
    assert receipt.ids == ("new",)  # an id stored before the column names no recipient


# -- groups --------------------------------------------------------------------------------

GROUP_LIMIT = 1024


def group_envelope(
    msg_id: str = "g1",
    *,
    sender: str = "alice",
    device: str = "phone",
    group: str = "team",
    body: bytes = b"sender-key ciphertext",
    urgent: bool = True,
    ts: int = T0,
    ttl_ms: int = DAY_MS,
) -> GroupEnvelope:
    return GroupEnvelope(sender, device, msg_id, group, body, urgent, ts, ts + ttl_ms)


async def group_send(store: MessageStore, env: GroupEnvelope) -> Any:
    return await (await store.submit_group_send(env)).result()


def events(items: list[QueueItem]) -> list[tuple[str, str, tuple[str, ...]]]:
    """The (group, event, users) of the `group` items among `items`, in order."""
    return [(i.group, i.msg_id, i.ids) for i in items if i.kind is ItemKind.GROUP]


async def stored_bodies(store: MessageStore, backend: str, db_path: Any) -> int:
    """How many group-message bodies the backend holds."""
    if backend == "sqlite":
        conn = sqlite3.connect(db_path)
        try:
            return int(conn.execute("SELECT count(*) FROM bodies").fetchone()[0])
        finally:
            conn.close()
    assert isinstance(store, RedisStore)
    return len([key async for key in store.client.scan_iter(match="gwg:{*}:b:*")])


async def test_a_group_is_created_read_replaced_and_deleted(store):
    assert await store.group_members("team") is None

    change = await store.set_group("team", ("carol", "alice", "alice"), T0, GROUP_LIMIT)
    assert (change.created, change.found, change.members) == (True, True, ("alice", "carol"))
    assert await store.group_members("team") == ("alice", "carol")

    change = await store.set_group("team", ("bob",), T0, GROUP_LIMIT)
    assert (change.created, change.members) == (False, ("bob",))
    assert await store.group_members("team") == ("bob",)

    assert await store.delete_group("team", T0) is True
    assert await store.delete_group("team", T0) is False
    assert await store.group_members("team") is None


async def test_an_empty_group_exists(store):
    change = await store.set_group("quiet", (), T0, GROUP_LIMIT)
    assert change.created and change.members == ()
    assert await store.group_members("quiet") == ()


async def test_members_are_added_and_removed_only_in_an_existing_group(store):
    assert not (await store.add_group_members("team", ("bob",), T0, GROUP_LIMIT)).found
    assert not (await store.remove_group_member("team", "bob", T0)).found
    await store.set_group("team", ("alice",), T0, GROUP_LIMIT)

    added = await store.add_group_members("team", ("bob", "alice"), T0, GROUP_LIMIT)
    assert added.members == ("alice", "bob")
    removed = await store.remove_group_member("team", "alice", T0)
    assert (removed.found, removed.members) == (True, ("bob",))
    assert not (await store.remove_group_member("team", "alice", T0)).found
    assert await store.group_members("team") == ("bob",)


async def test_a_group_over_the_limit_changes_nothing(store):
    assert (await store.set_group("team", ("a", "b", "c"), T0, 2)).over_limit
    assert await store.group_members("team") is None

    await store.set_group("team", ("a", "b"), T0, 2)
    assert (await store.add_group_members("team", ("c",), T0, 2)).over_limit
    assert (await store.set_group("team", ("a", "b", "c"), T0, 2)).over_limit
    assert await store.group_members("team") == ("a", "b")
    assert not (await store.add_group_members("team", ("a",), T0, 2)).over_limit  # no change


async def test_every_membership_change_queues_a_group_event_to_every_device_involved(store, rings):
    await register(store, "alice", "phone", "laptop")
    await register(store, "bob", "phone")
    await register(store, "carol", "phone")

    await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)
    for user, device in (("alice", "phone"), ("alice", "laptop"), ("bob", "phone")):
        assert events(await fetch_all(store, user, device)) == [("team", "added", ("alice", "bob"))]
    assert events(await fetch_all(store, "carol", "phone")) == []

    rings.clear()
    await store.set_group("team", ("alice", "carol"), T0 + 1, GROUP_LIMIT)  # +carol -bob
    # The removed user is told too, so that clients can rotate their group keys.
    for user, device in (("alice", "phone"), ("bob", "phone"), ("carol", "phone")):
        assert events(await fetch_all(store, user, device))[-2:] == [
            ("team", "added", ("carol",)),
            ("team", "removed", ("bob",)),
        ]
    assert all(not urgent for _, _, urgent in rings)  # events never cause an alert
    assert {(u, d) for u, d, _ in rings} == {
        ("alice", "phone"), ("alice", "laptop"), ("bob", "phone"), ("carol", "phone"),
    }  # fmt: skip

    await store.remove_group_member("team", "carol", T0 + 2)
    assert events(await fetch_all(store, "carol", "phone"))[-1] == ("team", "removed", ("carol",))
    await store.add_group_members("team", ("bob",), T0 + 3, GROUP_LIMIT)
    assert events(await fetch_all(store, "bob", "phone"))[-1] == ("team", "added", ("bob",))
    await store.delete_group("team", T0 + 4)
    assert events(await fetch_all(store, "alice", "laptop"))[-1] == (
        "team", "deleted", ("alice", "bob"),
    )  # fmt: skip
    [event] = [i for i in await fetch_all(store, "bob", "phone") if i.msg_id == "deleted"]
    assert (event.ts, event.urgent) == (T0 + 4, False)


async def test_a_change_that_changes_nothing_queues_nothing(store):
    await register(store, "alice", "phone")
    await store.set_group("team", ("alice",), T0, GROUP_LIMIT)
    await store.set_group("team", ("alice",), T0, GROUP_LIMIT)
    await store.add_group_members("team", ("alice",), T0, GROUP_LIMIT)
    assert len(await fetch_all(store, "alice", "phone")) == 1


async def test_a_group_message_reaches_every_member_device_but_the_sending_one(store, rings):
    await register(store, "alice", "phone", "laptop")
    await register(store, "bob", "phone", "tablet")
    await register(store, "carol", "phone")
    await register(store, "dave", "phone")  # not a member
    await store.set_group("team", ("alice", "bob", "carol"), T0, GROUP_LIMIT)
    for user, device in (("alice", "phone"), ("alice", "laptop"), ("bob", "phone"),
                         ("bob", "tablet"), ("carol", "phone")):  # fmt: skip
        for item in await fetch_all(store, user, device):
            await (await store.submit_ack(user, device, (item.sid,), T0)).result()
    rings.clear()

    outcome = await group_send(store, group_envelope(body=b"once", ts=T0 + 5))

    assert (outcome.ts, outcome.devices, outcome.duplicate, outcome.not_member) == (
        T0 + 5, 4, False, False,
    )  # fmt: skip
    assert sorted((u, d) for u, d, _ in rings) == [
        ("alice", "laptop"), ("bob", "phone"), ("bob", "tablet"), ("carol", "phone"),
    ]  # fmt: skip
    assert await fetch_all(store, "alice", "phone") == []
    assert await fetch_all(store, "dave", "phone") == []
    for user, device in (("alice", "laptop"), ("bob", "tablet"), ("carol", "phone")):
        [item] = await fetch_all(store, user, device)
        assert (item.kind, item.msg_id, item.sender, item.sender_device) == (
            ItemKind.MESSAGE, "g1", "alice", "phone",
        )  # fmt: skip
        assert (item.body, item.group, item.ts, item.urgent) == (b"once", "team", T0 + 5, True)
    opening = await store.open_session("bob", "phone", issued_at=None, now=T0 + 6, limit=10)
    assert [(i.body, i.group) for i in opening.items] == [(b"once", "team")]


async def test_a_group_message_follows_every_membership_change_before_it(store, rung):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone", "tablet")
    await register(store, "carol", "phone")
    await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)

    async def send_and_ring(msg_id: str) -> list[tuple[str, str]]:
        rung.clear()
        await group_send(store, group_envelope(msg_id))
        for user, device, item in rung:  # each ring names the item stored for that device
            [stored] = [i for i in await fetch_all(store, user, device) if i.msg_id == msg_id]
            assert stored.sid == item.sid
        return sorted((u, d) for u, d, _ in rung)

    assert await send_and_ring("g1") == [("bob", "phone"), ("bob", "tablet")]
    await store.remove_group_member("team", "bob", T0)
    assert await send_and_ring("g2") == []
    await store.add_group_members("team", ("carol", "bob"), T0, GROUP_LIMIT)
    assert await send_and_ring("g3") == [("bob", "phone"), ("bob", "tablet"), ("carol", "phone")]
    await store.set_group("team", ("alice", "carol"), T0, GROUP_LIMIT)
    assert await send_and_ring("g4") == [("carol", "phone")]
    await store.delete_group("team", T0)
    assert (await group_send(store, group_envelope("g5"))).not_member


async def test_a_group_message_from_a_non_member_or_to_no_group_is_refused(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await store.set_group("team", ("bob",), T0, GROUP_LIMIT)

    assert (await group_send(store, group_envelope())).not_member
    assert (await group_send(store, group_envelope(group="nowhere"))).not_member
    assert [i for i in await fetch_all(store, "bob", "phone") if i.kind is ItemKind.MESSAGE] == []

    # Refused is not remembered: once a member, the same id is stored.
    await store.add_group_members("team", ("alice",), T0, GROUP_LIMIT)
    outcome = await group_send(store, group_envelope())
    assert (outcome.not_member, outcome.duplicate, outcome.devices) == (False, False, 1)


async def test_a_group_message_resent_with_the_same_id_is_stored_once(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)

    first = await group_send(store, group_envelope(ts=T0))
    again = await group_send(store, group_envelope(ts=T0 + 50))

    assert (again.duplicate, again.ts) == (True, first.ts)
    assert again.members == ("alice", "bob")  # whose devices the resend rings again
    assert [i.msg_id for i in await fetch_all(store, "bob", "phone")] == ["added", "g1"]


async def test_acking_a_group_message_sends_delivered_and_read_works_as_for_one_to_one(store):
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)
    await group_send(store, group_envelope())
    [_, item] = await fetch_all(store, "bob", "phone")

    assert await (await store.submit_ack("bob", "phone", (item.sid,), T0 + 1)).result() == 1
    read = await (
        await store.submit_read("bob", "phone", "alice", ("g1", "other"), T0 + 2, T0 + DAY_MS)
    ).result()

    assert read == 1
    receipts = [i for i in await fetch_all(store, "alice", "phone") if i.kind is not ItemKind.GROUP]
    assert [(r.kind, r.ids, r.sender) for r in receipts] == [
        (ItemKind.DELIVERED, ("g1",), "bob"),
        (ItemKind.READ, ("g1",), "bob"),
    ]


async def test_a_group_message_may_be_read_by_who_was_a_member_when_it_was_sent(store):
    for user in ("alice", "bob", "carol"):
        await register(store, user, "phone")
    await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)
    await group_send(store, group_envelope(msg_id="before", ts=T0 + 1))
    await store.remove_group_member("team", "bob", T0 + 2)  # bob leaves, carol joins
    await store.add_group_members("team", ("carol",), T0 + 3, GROUP_LIMIT)
    await group_send(store, group_envelope(msg_id="after", ts=T0 + 4))

    async def readable(reader: str) -> tuple[str, ...]:
        before = {i.sid for i in await fetch_all(store, "alice", "phone")}
        ticket = await store.submit_read(
            reader, "phone", "alice", ("before", "after"), T0 + 5, T0 + DAY_MS
        )
        await ticket.result()
        fresh = [i for i in await fetch_all(store, "alice", "phone") if i.sid not in before]
        return tuple(i for r in fresh if r.kind is ItemKind.READ for i in r.ids)

    assert await readable("bob") == ("before",)  # received while a member, read after leaving
    assert await readable("carol") == ("after",)  # never sent what came before she joined


async def test_a_group_body_is_stored_once_and_freed_by_the_last_ack(store, backend, db_path):
    if backend == "memory":
        pytest.skip("the memory backend shares one bytes object; nothing to count")
    await register(store, "alice", "phone")
    await register(store, "bob", "phone", "tablet")
    await register(store, "carol", "phone")
    await store.set_group("team", ("alice", "bob", "carol"), T0, GROUP_LIMIT)
    await group_send(store, group_envelope())
    assert await stored_bodies(store, backend, db_path) == 1

    holders = (("bob", "phone"), ("bob", "tablet"), ("carol", "phone"))
    for n, (user, device) in enumerate(holders):
        items = await fetch_all(store, user, device)
        [message] = [i for i in items if i.kind is ItemKind.MESSAGE]
        sids = (message.sid, message.sid)  # a repeated sid releases the body once
        await (await store.submit_ack(user, device, sids, T0 + 1)).result()
        await (await store.submit_ack(user, device, (message.sid,), T0 + 1)).result()
        assert await stored_bodies(store, backend, db_path) == (1 if n < 2 else 0)


async def test_a_group_body_is_freed_with_the_last_device_that_held_it(store, backend, db_path):
    if backend == "memory":
        pytest.skip("the memory backend shares one bytes object; nothing to count")
    await register(store, "alice", "phone")
    await register(store, "bob", "phone", "tablet")
    await register(store, "carol", "phone")
    await store.set_group("team", ("alice", "bob", "carol"), T0, GROUP_LIMIT)
    await group_send(store, group_envelope("g1"))
    await group_send(store, group_envelope("g2"))
    assert await stored_bodies(store, backend, db_path) == 2

    assert await store.remove_device("bob", "phone")
    assert await store.revoke_device("bob", "tablet", T0 + 1)
    assert await stored_bodies(store, backend, db_path) == 2  # carol's items still hold them
    assert await store.remove_device("carol", "phone")
    assert await stored_bodies(store, backend, db_path) == 0


async def test_an_expired_group_body_is_swept(store, backend, db_path):
    if backend != "sqlite":
        pytest.skip("Redis lets a body key expire by its own TTL; memory holds none")
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)
    await group_send(store, group_envelope(ttl_ms=1000))

    assert await store.sweep_expired(T0 + 1000) >= 1
    assert await stored_bodies(store, backend, db_path) == 0
    assert [i.kind for i in await fetch_all(store, "bob", "phone", T0 + 1000)] == [ItemKind.GROUP]


async def test_a_past_membership_is_forgotten_once_nothing_from_it_can_be_read(
    store, backend, db_path
):
    if backend != "sqlite":
        pytest.skip("Redis and memory remember the readers of each message instead")
    for user in ("alice", "bob"):
        await register(store, user, "phone")
    await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)
    await group_send(store, group_envelope(ttl_ms=1000))
    await store.remove_group_member("team", "bob", T0 + 1)

    def spans() -> int:
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            return int(conn.execute("SELECT count(*) FROM group_left").fetchone()[0])

    await store.sweep_expired(T0 + 999)
    assert spans() == 1  # bob may still read the message
    await store.sweep_expired(T0 + 1000)
    assert spans() == 0


async def test_a_group_body_key_expires_with_its_message_on_redis(store, backend):
    if backend not in ("redis", "redis-cluster"):
        pytest.skip("a Redis key TTL")
    assert isinstance(store, RedisStore)
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)
    await group_send(store, group_envelope(ttl_ms=60_000))
    [key] = [key async for key in store.client.scan_iter(match="gwg:{*}:b:*")]
    assert 0 < await store.client.pttl(key) <= 60_000 + 3_600_000


async def test_sixteen_kib_to_two_hundred_members_grows_the_store_by_about_one_body(
    store, backend, db_path
):
    if backend == "memory":
        pytest.skip("the memory backend shares one bytes object; nothing to measure")
    body = bytes(range(256)) * 64  # 16 KiB
    members = tuple(f"user{n:03}" for n in range(200))
    for user in members:
        await register(store, user, "phone", "tablet")
    await store.set_group("big", members, T0, GROUP_LIMIT)
    for _ in range(2):  # settle the allocator and the file on group-event items first
        await group_send(store, group_envelope("warm", sender="user000", group="big", body=b"x"))

    before = await store_size(store, backend, db_path)
    outcome = await group_send(store, group_envelope(sender="user000", group="big", body=body))
    grown = await store_size(store, backend, db_path) - before

    assert outcome.devices == 399
    assert grown < 400 * len(body) / 20, grown  # 400 copies would be 6.4 MiB


async def store_size(store: MessageStore, backend: str, db_path: Any) -> int:
    """Bytes the store holds: the SQLite file's pages (WAL included), or the sum of what
    Redis says each of the gateway's keys uses (on every node of a cluster)."""
    if backend == "sqlite":
        conn = sqlite3.connect(db_path)
        try:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            return int((pages - free) * size)
        finally:
            conn.close()
    assert isinstance(store, RedisStore)
    total = 0
    async for key in store.client.scan_iter(match="gw*"):
        total += await store.client.memory_usage(key, samples=0) or 0
    return total


async def test_a_file_from_before_groups_gains_the_body_and_group_columns(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE devices (did INTEGER PRIMARY KEY, user TEXT NOT NULL, device TEXT NOT NULL,"
        " created INTEGER NOT NULL, last_seen INTEGER, push_provider TEXT, push_token TEXT,"
        " push_topic TEXT, push_sandbox INTEGER NOT NULL DEFAULT 0, push_registered_at INTEGER,"
        " UNIQUE (user, device));"
        "CREATE TABLE queue (sid INTEGER PRIMARY KEY AUTOINCREMENT, did INTEGER NOT NULL,"
        " kind INTEGER NOT NULL, msg_id TEXT NOT NULL, sender TEXT NOT NULL,"
        " sender_device TEXT NOT NULL, ts INTEGER NOT NULL, expires INTEGER NOT NULL,"
        " urgent INTEGER NOT NULL, body BLOB NOT NULL);"
        f"INSERT INTO devices (did, user, device, created) VALUES (1, 'bob', 'phone', {T0});"
        "INSERT INTO queue (did, kind, msg_id, sender, sender_device, ts, expires, urgent, body)"
        f" VALUES (1, 0, 'old', 'alice', 'phone', {T0}, {T0 + DAY_MS}, 1, x'6f6c64');"
    )
    old.close()

    async with open_backend("sqlite", path, lambda *a: None) as store:
        await register(store, "alice", "phone")
        await store.set_group("team", ("alice", "bob"), T0, GROUP_LIMIT)
        await group_send(store, group_envelope("new", body=b"new"))
        items = await fetch_all(store, "bob", "phone")
    assert [(i.msg_id, i.body, i.group) for i in items if i.kind is ItemKind.MESSAGE] == [
        ("old", b"old", ""),
        ("new", b"new", "team"),
    ]


async def test_a_group_send_retried_after_failing_half_way_fills_in_only_what_is_missing(
    store, backend
):
    if backend not in ("redis", "redis-cluster"):
        pytest.skip("on SQLite and in memory a group send is one transaction")
    from gateway.store.redis import _group_send_steps

    assert isinstance(store, RedisStore)
    for user in ("alice", "bob", "carol"):
        await register(store, user, "phone")
    await store.set_group("team", ("alice", "bob", "carol"), T0, GROUP_LIMIT)
    env = group_envelope(body=b"first attempt")
    # The first attempt stores the body and queues for alice and bob, then Redis fails:
    # the client got no `sent`.
    steps = _group_send_steps(env, "")
    begin = await store.run_scripts(next(steps))
    members = steps.send(begin)
    await store.run_scripts(members[:2])
    steps.close()

    outcome = await group_send(store, group_envelope(body=b"first attempt"))

    assert (outcome.duplicate, outcome.devices) == (False, 1)  # carol's, the one missing
    for user in ("bob", "carol"):
        [item] = [i for i in await fetch_all(store, user, "phone") if i.kind is ItemKind.MESSAGE]
        assert (item.msg_id, item.body) == ("g1", b"first attempt")
    again = await group_send(store, group_envelope(ts=T0 + 1))
    assert (again.duplicate, again.ts) == (True, T0)


async def test_group_events_lost_to_a_failure_half_way_are_queued_by_the_next_change(
    store, backend
):
    if backend not in ("redis", "redis-cluster"):
        pytest.skip("on SQLite and in memory a change and its events are one transaction")
    from gateway.store.redis import _group_change_steps

    assert isinstance(store, RedisStore)
    await register(store, "alice", "phone")
    await register(store, "bob", "phone")
    # The change is made in the group's slot, then Redis fails before the events are
    # queued in the members' slots: the API answered 503.
    steps = _group_change_steps("team", "set", ("alice", "bob"), T0, GROUP_LIMIT, DAY_MS, "")
    await store.run_scripts(next(steps))
    steps.close()
    assert await store.group_members("team") == ("alice", "bob")
    assert events(await fetch_all(store, "bob", "phone")) == []

    retry = await store.set_group("team", ("alice", "bob"), T0 + 5, GROUP_LIMIT)  # no change

    assert (retry.created, retry.members) == (False, ("alice", "bob"))
    for user in ("alice", "bob"):
        [event] = [i for i in await fetch_all(store, user, "phone") if i.kind is ItemKind.GROUP]
        assert (event.msg_id, event.ids, event.ts) == ("added", ("alice", "bob"), T0)
    await store.delete_group("team", T0 + 6)  # nothing pending is queued twice
    assert events(await fetch_all(store, "bob", "phone")) == [
        ("team", "added", ("alice", "bob")),
        ("team", "deleted", ("alice", "bob")),
    ]
