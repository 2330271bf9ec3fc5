"""The SQLite backend's two shortcuts: a known device's `hello` read on the event loop's
thread when nothing is uncommitted, and last-seen times that ride with the next commit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.store.sqlite import LOOP_PAGE, TOUCH_DELAY, SqliteStore
from tests.test_store import T0, envelope, open_backend, register, send


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with open_backend("sqlite", tmp_path / "gateway.db", lambda *ring: None) as s:
        assert isinstance(s, SqliteStore)
        yield s


async def opening(store: SqliteStore, limit: int = 256):  # type: ignore[no-untyped-def]
    return await store.open_session("bob", "phone", issued_at=T0, now=T0, limit=limit)


async def test_a_known_device_with_nothing_uncommitted_opens_without_a_commit(store):
    await register(store, "bob", "phone")
    for n in range(LOOP_PAGE + 8):
        await send(store, envelope(f"m{n}"))
    commits = store.commits

    first = await opening(store)

    assert store.commits == commits
    assert [item.msg_id for item in first.items] == [f"m{n}" for n in range(LOOP_PAGE)]
    assert first.queued == LOOP_PAGE + 8  # more than the page: the connection reads on


async def test_with_an_ack_uncommitted_the_opening_waits_for_it(store):
    await register(store, "bob", "phone")
    for n in range(3):
        await send(store, envelope(f"m{n}"))
    first = await opening(store)
    await store.submit_ack("bob", "phone", tuple(i.sid for i in first.items[:2]), T0)
    commits = store.commits

    again = await opening(store)

    assert store.commits > commits  # through the writer, after the ack
    assert [item.msg_id for item in again.items] == ["m2"] and again.queued == 1


async def test_a_last_seen_time_rides_with_the_next_commit(store):
    await register(store, "bob", "phone")
    commits = store.commits
    await store.touch_device("bob", "phone", T0 + 1234)
    assert store.commits == commits  # nothing committed for it alone yet

    await register(store, "carol", "phone")

    assert store.commits == commits + 1
    [record] = await store.devices("bob")
    assert record.last_seen == T0 + 1234


async def test_a_last_seen_time_alone_is_committed_after_the_delay(store, autojump_clock):
    # The virtual clock jumps only after 0.1 s of real idleness: never while a commit
    # runs on its thread.
    autojump_clock.autojump_threshold = 0.1
    await register(store, "bob", "phone")
    commits = store.commits
    await store.touch_device("bob", "phone", T0 + 99)
    with trio.fail_after(TOUCH_DELAY * 10):
        while store.commits == commits:
            await trio.sleep(TOUCH_DELAY / 10)  # virtual time
    [record] = await store.devices("bob")
    assert record.last_seen == T0 + 99


async def test_last_seen_times_pending_at_close_are_committed(tmp_path):
    async with open_backend("sqlite", tmp_path / "gateway.db", lambda *ring: None) as store:
        await register(store, "bob", "phone")
        await store.touch_device("bob", "phone", T0 + 7)
    async with open_backend("sqlite", tmp_path / "gateway.db", lambda *ring: None) as store:
        [record] = await store.devices("bob")
    assert record.last_seen == T0 + 7
