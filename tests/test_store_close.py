"""Closing the SQLite store never pulls a connection out from under a read in flight."""

from __future__ import annotations

import sqlite3
import time

import pytest
import trio
import trio.testing

from gateway.errors import StoreClosed
from gateway.store.sqlite import SqliteStore


async def test_closing_waits_for_a_read_running_on_a_worker_thread(tmp_path):
    store = SqliteStore(tmp_path / "s.db", doorbell=lambda *a: None)
    results: list[int] = []

    def slow_query(conn: sqlite3.Connection) -> int:
        time.sleep(0.2)  # a long read: the store is closed meanwhile
        value: int = conn.execute("SELECT 1").fetchone()[0]
        return value

    async def reader() -> None:
        results.append(await store._read(slow_query))

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        store.close()

    assert results == [1]
    with pytest.raises(StoreClosed):
        await store.count("u", "d", 0)
