"""The embedded backend: SQLite in WAL mode, group commit on a worker thread.

Submissions queue up in a bounded channel. The writer task takes everything waiting (up
to `max_batch`) and applies it in one transaction on a worker thread, one savepoint per
operation so that a failing operation fails alone. While a batch commits, the next one
gathers: under load, many sends share one fsync. Reads use a small pool of separate
connections, which WAL lets run alongside the writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cbor2
import trio

from gateway.errors import StoreClosed, StoreError
from gateway.store.base import (
    MAX_SID,
    DeviceRecord,
    Doorbell,
    Envelope,
    ItemKind,
    PushToken,
    QueueItem,
    SendOutcome,
    SessionOpening,
    Ticket,
    decode_item,
    delivered_by_sender,
)
from gateway.store.group_commit import GroupCommitStore, Outcome, Ring
from gateway.store.groups import (
    GroupChange,
    GroupEnvelope,
    GroupEvent,
    deletion_events,
    membership_events,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    did INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    created INTEGER NOT NULL,
    last_seen INTEGER,
    push_provider TEXT,
    push_token TEXT,
    push_topic TEXT,
    push_sandbox INTEGER NOT NULL DEFAULT 0,
    push_registered_at INTEGER,
    UNIQUE (user, device)
);
-- AUTOINCREMENT: a sid is never reused, so a late ack can never delete a newer item.
CREATE TABLE IF NOT EXISTS queue (
    sid INTEGER PRIMARY KEY AUTOINCREMENT,
    did INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    ts INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    urgent INTEGER NOT NULL,
    body BLOB NOT NULL,
    bid INTEGER,
    grp TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS queue_by_device ON queue (did, sid);
CREATE INDEX IF NOT EXISTS queue_by_expiry ON queue (expires);
-- A group message's body, stored once; its queue items point to it by `bid` (their own
-- `body` is empty). Deleted with the last item that points to it, or when it expires.
CREATE TABLE IF NOT EXISTS bodies (
    bid INTEGER PRIMARY KEY AUTOINCREMENT,
    expires INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS bodies_by_expiry ON bodies (expires);
CREATE TABLE IF NOT EXISTS groups (
    grp TEXT PRIMARY KEY,
    created INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    grp TEXT NOT NULL,
    user TEXT NOT NULL,
    joined INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, user)
) WITHOUT ROWID;
-- Past membership: a user who left may still `read` what was sent to the group while a
-- member. Kept while an unexpired group message from that time remains.
CREATE TABLE IF NOT EXISTS group_left (
    grp TEXT NOT NULL,
    user TEXT NOT NULL,
    joined INTEGER NOT NULL,
    left INTEGER NOT NULL,
    PRIMARY KEY (grp, user, joined)
) WITHOUT ROWID;
-- Group messages, one row each whatever the member count: what a member's `read` may name
-- (a member at `ts`).
CREATE TABLE IF NOT EXISTS group_sent (
    sender TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    grp TEXT NOT NULL,
    expires INTEGER NOT NULL,
    ts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sender, msg_id, grp)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS group_sent_by_expiry ON group_sent (expires);
CREATE TABLE IF NOT EXISTS sent_ids (
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    recipient TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (sender, sender_device, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sent_ids_by_expiry ON sent_ids (expires);
-- Devices revoked through the backend API: tokens issued before `at` are refused.
CREATE TABLE IF NOT EXISTS revoked (
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (user, device)
) WITHOUT ROWID;
"""
# `recipient` came later: a file made before it gains the column (older ids match no reader);
# so did groups: the queue's body reference and group columns, then the times that bound
# who may read a group message (0 in older rows: members since the start).
MIGRATIONS = (
    ("sent_ids", "recipient", "ALTER TABLE sent_ids ADD COLUMN recipient TEXT NOT NULL DEFAULT ''"),
    ("queue", "bid", "ALTER TABLE queue ADD COLUMN bid INTEGER"),
    ("queue", "grp", "ALTER TABLE queue ADD COLUMN grp TEXT NOT NULL DEFAULT ''"),
    ("group_members", "joined",
     "ALTER TABLE group_members ADD COLUMN joined INTEGER NOT NULL DEFAULT 0"),
    ("group_sent", "ts", "ALTER TABLE group_sent ADD COLUMN ts INTEGER NOT NULL DEFAULT 0"),
)  # fmt: skip
# A `read` may name only ids the reader's user was sent by `to`; the first finds them. The
# second finds whether any item still points to a group message's body.
INDEXES = (
    "CREATE INDEX IF NOT EXISTS sent_ids_by_recipient ON sent_ids (recipient, sender, msg_id);"
    "CREATE INDEX IF NOT EXISTS queue_by_body ON queue (bid) WHERE bid IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS group_sent_by_group ON group_sent (grp, ts);"
)
# Queue rows inserted per statement: (rows x columns) stays under SQLite's variable limit.
INSERT_ROWS = 1000

# Sweeps delete in slices so one sweep never holds the write lock for long.
SWEEP_SLICE = 5000
READERS = 2
# How long closing the store waits for reads in flight on worker threads.
READER_CLOSE_TIMEOUT = 5.0
# Last-seen times are informational: they ride with the next commit, and when nothing
# else is committed, they go in one commit at most this many seconds after the first.
TOUCH_DELAY = 1.0
# The first page a known device's `hello` reads on the event loop's own thread (the rest
# of its backlog is fetched on a reader thread), so the loop is never held long.
LOOP_PAGE = 32

OpResult = tuple[Any, list[Ring]]
# Users whose device lists are cached on the writer; past this the cache starts afresh.
DEVICE_CACHE_USERS = 100_000
# Group members cached on the writer, all groups together; past this it starts afresh.
MEMBER_CACHE_ENTRIES = 100_000


class _Tx:
    """What an operation sees on the writer thread: the connection, plus caches of each
    user's devices and each group's members (every change to either goes through this
    writer, and a group operation calls `forget_group`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._devices: dict[str, list[tuple[int, str]]] = {}
        self._members: dict[str, frozenset[str] | None] = {}
        self._member_entries = 0

    def devices(self, user: str) -> list[tuple[int, str]]:
        """(did, device) of every known device of `user`."""
        known = self._devices.get(user)
        if known is None:
            if len(self._devices) >= DEVICE_CACHE_USERS:
                self._devices.clear()
            known = self._devices[user] = self.conn.execute(
                "SELECT did, device FROM devices WHERE user=?", (user,)
            ).fetchall()
        return known

    def members(self, group: str) -> frozenset[str] | None:
        """The members of `group`, or None if it does not exist."""
        if group in self._members:
            return self._members[group]
        if self._member_entries >= MEMBER_CACHE_ENTRIES:
            self._members.clear()
            self._member_entries = 0
        known = self._members[group] = _members(self.conn, group)
        self._member_entries += 1 + len(known or ())
        return known

    def forget_group(self, group: str) -> None:
        """Drop the cached members of `group` (it was created, changed or deleted)."""
        if group in self._members:
            known = self._members.pop(group)
            self._member_entries -= 1 + len(known or ())

    def forget(self, user: str | None = None) -> None:
        """Drop cached devices of `user` (or every cache, after a rollback)."""
        if user is None:
            self._devices.clear()
            self._members.clear()
            self._member_entries = 0
        else:
            self._devices.pop(user, None)


Apply = Callable[[_Tx], OpResult]


@dataclass(frozen=True, slots=True)
class _Ack:
    """A device's ack, kept apart so that the acks of one batch are applied together."""

    user: str
    device: str
    sids: tuple[int, ...]
    now: int
    expires: int


@dataclass(slots=True)
class _Op:
    apply: Apply
    ticket: Ticket[Any]
    ack: _Ack | None = None


class _OperationFailed(Exception):
    """An operation of a batch raised; the batch is redone with each one isolated."""


class SqliteStore(GroupCommitStore[_Op]):
    """SQLite-backed `MessageStore`; see the module docstring for the commit model."""

    def __init__(
        self,
        path: Path,
        *,
        doorbell: Doorbell,
        synchronous: str = "full",
        max_batch: int = 512,
        receipt_ttl_ms: int = 30 * 24 * 3600 * 1000,
    ) -> None:
        super().__init__(doorbell=doorbell, max_batch=max_batch, receipt_ttl_ms=receipt_ttl_ms)
        self.path = path
        self._synchronous = synchronous.upper()
        self._tx: _Tx | None = None
        self._readers_send, self._readers = trio.open_memory_channel[sqlite3.Connection](READERS)
        self._reader_conns: list[sqlite3.Connection] = []
        self._write_limiter = trio.CapacityLimiter(1)
        self._known: set[tuple[str, str]] = set()  # devices known to be registered
        self._revoked: set[tuple[str, str]] = set()  # revoked by this process
        self._loop_conn: sqlite3.Connection | None = None  # reads on the event loop's thread
        self._touches: dict[tuple[str, str], int] = {}  # last-seen times not yet committed
        self._touched = trio.Event()  # set when the first of `_touches` arrives

    # -- lifecycle ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        return conn

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = self._connect()
        mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot enable WAL mode (got {mode})")
        writer.executescript(SCHEMA)
        for table, column, alter in MIGRATIONS:
            columns = {row[1] for row in writer.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                writer.execute(alter)
        writer.executescript(INDEXES)
        self._tx = _Tx(writer)
        self._reader_conns = [self._connect() for _ in range(READERS)]
        self._loop_conn = self._connect()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[None]:
        """The database file open while the store runs; on the way out, the last-seen
        times still pending are committed and every connection is closed."""
        try:
            await trio.to_thread.run_sync(self._open)
        except sqlite3.Error as exc:
            raise StoreError(
                f"{self.path}: cannot open the store: {exc}{_unwritable(self.path)}"
            ) from None
        for conn in self._reader_conns:
            self._readers_send.send_nowait(conn)
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                if self._touches:
                    await self._commit([])
                idle = await self._take_back_readers()
                await trio.to_thread.run_sync(self._close_connections, idle)

    async def _background(self) -> None:
        """Commit last-seen times that no other commit took along, `TOUCH_DELAY` after
        the first of them."""
        while True:
            await self._touched.wait()
            await trio.sleep(TOUCH_DELAY)
            self._touched = trio.Event()
            if self._touches:
                try:
                    await self._submit(lambda tx: (None, []))  # the touches ride with it
                except StoreClosed:
                    return

    async def _take_back_readers(self) -> list[sqlite3.Connection]:
        """Wait (briefly) until no read is running, and stop lending reader connections.

        A read runs on a worker thread that cancellation cannot stop; closing its
        connection under it would crash SQLite. Readers still busy after
        `READER_CLOSE_TIMEOUT` are left open for the garbage collector.
        """
        idle: list[sqlite3.Connection] = []
        with trio.move_on_after(READER_CLOSE_TIMEOUT):
            while len(idle) < len(self._reader_conns):
                idle.append(await self._readers.receive())
        self._readers_send.close()
        return idle

    def _close_connections(self, readers: list[sqlite3.Connection]) -> None:
        for conn in [self._tx.conn if self._tx else None, self._loop_conn, *readers]:
            if conn is not None:
                conn.close()

    # -- group commit ---------------------------------------------------------------------

    async def _submit(self, apply: Apply, ack: _Ack | None = None) -> Ticket[Any]:
        op = _Op(apply, Ticket(), ack)
        await self._enqueue(op)
        return op.ticket

    async def _apply(self, batch: Sequence[_Op]) -> list[Outcome]:
        """Commit `batch`, with the last-seen times waiting, on the writer thread. If the
        commit fails, every operation fails and the last-seen times wait for the next."""
        touches, self._touches = self._touches, {}
        try:
            return await trio.to_thread.run_sync(
                self._apply_batch, batch, touches, limiter=self._write_limiter
            )
        except sqlite3.Error as exc:
            log.error("store commit of %d operations failed: %s", len(batch), exc)
            for key, seen in touches.items():
                self._touches.setdefault(key, seen)
            self._touched.set()
            return [StoreError(f"commit failed: {exc}")] * len(batch)

    def _apply_batch(
        self, batch: Sequence[_Op], touches: dict[tuple[str, str], int]
    ) -> list[Outcome]:
        """Apply a batch, and the last-seen times that ride with it, in one transaction.
        Every SQLite call hands the GIL back and forth with the event loop, so the common
        case runs with no per-operation savepoints, and each run of acks as one; if an
        operation fails, the batch is rolled back and redone with one savepoint each (and
        each ack alone), so that only it fails."""
        tx = self._tx
        assert tx is not None
        try:
            return self._run_batch(tx, batch, touches, isolate=False)
        except _OperationFailed:
            return self._run_batch(tx, batch, touches, isolate=True)

    def _run_batch(
        self,
        tx: _Tx,
        batch: Sequence[_Op],
        touches: dict[tuple[str, str], int],
        *,
        isolate: bool,
    ) -> list[Outcome]:
        conn = tx.conn
        outcomes: list[Outcome] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            if touches:
                conn.executemany(
                    "UPDATE devices SET last_seen=? WHERE user=? AND device=?",
                    [(seen, user, device) for (user, device), seen in touches.items()],
                )
            if isolate:
                outcomes += [_apply_isolated(tx, op) for op in batch]
            else:
                try:
                    outcomes += _apply_together(tx, batch)
                except Exception as exc:
                    raise _OperationFailed from exc
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            tx.forget()
            raise
        return outcomes

    # -- mutations ------------------------------------------------------------------------

    async def submit_send(self, envelope: Envelope) -> Ticket[SendOutcome]:
        return await self._submit(lambda tx: _apply_send(tx, envelope))

    async def submit_ack(
        self, user: str, device: str, sids: tuple[int, ...], now: int
    ) -> Ticket[int]:
        ack = _Ack(user, device, sids, now, now + self._receipt_ttl_ms)
        return await self._submit(lambda tx: _apply_acks(tx, [ack])[0], ack)

    async def submit_read(
        self,
        reader: str,
        reader_device: str,
        to: str,
        ids: tuple[str, ...],
        now: int,
        expires: int,
    ) -> Ticket[int]:
        def apply(tx: _Tx) -> OpResult:
            received = _received_ids(tx.conn, reader, to, ids, now)
            rings = _insert_receipts(
                tx, ItemKind.READ, to, reader, reader_device, received, now, expires
            )
            if to != reader:  # the reader's other devices learn what was read
                rings += _insert_receipts(
                    tx, ItemKind.READ, reader, reader, reader_device, received, now, expires,
                    skip=reader_device,
                )  # fmt: skip
            return len(rings), rings

        return await self._submit(apply)

    async def submit_group_send(self, envelope: GroupEnvelope) -> Ticket[SendOutcome]:
        return await self._submit(lambda tx: _apply_group_send(tx, envelope))

    async def set_group(
        self, group: str, members: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        expires = now + self._receipt_ttl_ms

        def apply(tx: _Tx) -> OpResult:
            new = set(members)
            if len(new) > limit:
                return GroupChange(over_limit=True), []
            old = tx.members(group)
            if old is None:
                tx.conn.execute("INSERT INTO groups (grp, created) VALUES (?,?)", (group, now))
                tx.forget_group(group)
            _leave(tx, group, (old or set()) - new, now)
            _add_members(tx, group, new - (old or set()), now)
            events = membership_events(old or (), new)
            rings = _insert_group_events(tx, group, events, now, expires)
            return GroupChange(tuple(sorted(new)), created=old is None), rings

        result: GroupChange = await (await self._submit(apply)).result()
        return result

    async def add_group_members(
        self, group: str, users: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        expires = now + self._receipt_ttl_ms

        def apply(tx: _Tx) -> OpResult:
            old = tx.members(group)
            if old is None:
                return GroupChange(found=False), []
            new = old | set(users)
            if len(new) > limit:
                return GroupChange(tuple(sorted(old)), over_limit=True), []
            _add_members(tx, group, new - old, now)
            events = membership_events(old, new)
            return GroupChange(tuple(sorted(new))), _insert_group_events(
                tx, group, events, now, expires
            )

        result: GroupChange = await (await self._submit(apply)).result()
        return result

    async def remove_group_member(self, group: str, user: str, now: int) -> GroupChange:
        expires = now + self._receipt_ttl_ms

        def apply(tx: _Tx) -> OpResult:
            old = tx.members(group)
            if old is None or user not in old:
                return GroupChange(found=False), []
            _leave(tx, group, {user}, now)
            new = old - {user}
            events = membership_events(old, new)
            return GroupChange(tuple(sorted(new))), _insert_group_events(
                tx, group, events, now, expires
            )

        result: GroupChange = await (await self._submit(apply)).result()
        return result

    async def delete_group(self, group: str, now: int) -> bool:
        expires = now + self._receipt_ttl_ms

        def apply(tx: _Tx) -> OpResult:
            old = tx.members(group)
            if old is None:
                return False, []
            _leave(tx, group, old, now)
            tx.conn.execute("DELETE FROM groups WHERE grp=?", (group,))
            tx.forget_group(group)
            return True, _insert_group_events(tx, group, deletion_events(old), now, expires)

        result: bool = await (await self._submit(apply)).result()
        return result

    async def group_members(self, group: str) -> tuple[str, ...] | None:
        def query(conn: sqlite3.Connection) -> tuple[str, ...] | None:
            members = _members(conn, group)
            return None if members is None else tuple(sorted(members))

        result: tuple[str, ...] | None = await self._read(query)
        return result

    async def sync(self) -> None:
        await (await self._submit(lambda tx: (None, []))).result()

    async def open_session(
        self, user: str, device: str, *, issued_at: int | None, now: int, limit: int
    ) -> SessionOpening:
        """Check the revocation, register the device and read the first page of its queue
        and its count, as one operation of the writer's batch: it runs after every
        operation submitted before it (in the same transaction or an earlier one), and its
        answer comes once the batch, and with it the registration, is committed.

        Raises:
            ValueError: `limit` is negative.
            StoreError: The batch was not committed.
        """
        if limit < 0:
            raise ValueError("limit must not be negative")
        key = (user, device)
        if key in self._known and key not in self._revoked and not self._unsettled:
            # Registered by this process and not revoked since, and nothing submitted is
            # uncommitted: what is committed is all there is, and a read of it on this
            # thread is ordered after every submission without a trip to the writer.
            assert self._loop_conn is not None
            try:
                return _read_opening(self._loop_conn, user, device, now, min(limit, LOOP_PAGE))
            except sqlite3.Error as exc:
                raise StoreError(f"read failed: {exc}") from None

        def apply(tx: _Tx) -> OpResult:
            return _apply_open(tx, user, device, issued_at, now, limit), []

        opening: SessionOpening = await (await self._submit(apply)).result()
        if not opening.refused:
            self._known.add((user, device))
        return opening

    async def register_device(self, user: str, device: str, now: int) -> bool:
        if (user, device) in self._known:
            return False  # known devices cost no commit on every hello

        def apply(tx: _Tx) -> OpResult:
            cur = tx.conn.execute(
                "INSERT OR IGNORE INTO devices (user, device, created, last_seen) VALUES (?,?,?,?)",
                (user, device, now, now),
            )
            tx.forget(user)
            return cur.rowcount == 1, []

        result: bool = await (await self._submit(apply)).result()
        self._known.add((user, device))
        return result

    async def remove_device(self, user: str, device: str) -> bool:
        self._known.discard((user, device))

        def apply(tx: _Tx) -> OpResult:
            return _delete_device(tx, user, device), []

        result: bool = await (await self._submit(apply)).result()
        return result

    async def revoke_device(self, user: str, device: str, now: int) -> bool:
        self._known.discard((user, device))
        self._revoked.discard((user, device))

        def apply(tx: _Tx) -> OpResult:
            existed = _delete_device(tx, user, device)
            tx.conn.execute(
                "INSERT INTO revoked (user, device, at) VALUES (?,?,?)"
                " ON CONFLICT DO UPDATE SET at=max(at, excluded.at)",
                (user, device, now),
            )
            return existed, []

        result: bool = await (await self._submit(apply)).result()
        self._revoked.add((user, device))
        return result

    async def revoked_at(self, user: str, device: str) -> int | None:
        if (user, device) in self._known and (user, device) not in self._revoked:
            return None  # registered in this process and not revoked since: no read

        def query(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT at FROM revoked WHERE user=? AND device=?", (user, device)
            ).fetchone()
            return None if row is None else int(row[0])

        result: int | None = await self._read(query)
        return result

    async def touch_device(self, user: str, device: str, last_seen: int) -> None:
        """Record when a device was last connected: it is committed with the next commit
        (so before anything submitted after it is answered), or `TOUCH_DELAY` later."""
        if self._queue.closed:
            raise StoreClosed("the store is shutting down")
        if not self._touches:
            self._touched.set()
        self._touches[(user, device)] = last_seen

    async def set_push_token(self, user: str, device: str, token: PushToken | None) -> None:
        def apply(tx: _Tx) -> OpResult:
            if token is None:
                values: tuple[Any, ...] = (None, None, None, 0, None)
            else:
                values = (
                    token.provider,
                    token.token,
                    token.topic,
                    int(token.sandbox),
                    token.registered_at,
                )
            tx.conn.execute(
                "UPDATE devices SET push_provider=?, push_token=?, push_topic=?, push_sandbox=?,"
                " push_registered_at=? WHERE user=? AND device=?",
                (*values, user, device),
            )
            return None, []

        await (await self._submit(apply)).result()

    async def clear_push_token(self, user: str, device: str, token: str, sent_at: int) -> bool:
        def apply(tx: _Tx) -> OpResult:
            cur = tx.conn.execute(
                "UPDATE devices SET push_provider=NULL, push_token=NULL, push_topic=NULL,"
                " push_sandbox=0, push_registered_at=NULL"
                " WHERE user=? AND device=? AND push_token=? AND push_registered_at<=?",
                (user, device, token, sent_at),
            )
            return cur.rowcount == 1, []

        result: bool = await (await self._submit(apply)).result()
        return result

    async def sweep_expired(self, now: int) -> int:
        def apply(tx: _Tx) -> OpResult:
            items: int = tx.conn.execute(
                "DELETE FROM queue WHERE sid IN (SELECT sid FROM queue WHERE expires<=? LIMIT ?)",
                (now, SWEEP_SLICE),
            ).rowcount
            ids: int = tx.conn.execute(
                "DELETE FROM sent_ids WHERE (sender, sender_device, msg_id) IN"
                " (SELECT sender, sender_device, msg_id FROM sent_ids WHERE expires<=? LIMIT ?)",
                (now, SWEEP_SLICE),
            ).rowcount
            # A body expires with its items (they share the message's expiry).
            ids += tx.conn.execute(
                "DELETE FROM bodies WHERE bid IN (SELECT bid FROM bodies WHERE expires<=? LIMIT ?)",
                (now, SWEEP_SLICE),
            ).rowcount
            ids += tx.conn.execute(
                "DELETE FROM group_sent WHERE (sender, msg_id, grp) IN"
                " (SELECT sender, msg_id, grp FROM group_sent WHERE expires<=? LIMIT ?)",
                (now, SWEEP_SLICE),
            ).rowcount
            # A past membership matters while a message sent during it can be read.
            tx.conn.execute(
                "DELETE FROM group_left WHERE NOT EXISTS (SELECT 1 FROM group_sent s"
                " WHERE s.grp=group_left.grp AND s.ts<group_left.left AND s.expires>?)",
                (now,),
            )
            return (items, ids), []

        total = 0
        while True:
            items, ids = cast(tuple[int, int], await (await self._submit(apply)).result())
            total += items
            if items < SWEEP_SLICE and ids < SWEEP_SLICE:
                return total

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            conn = await self._readers.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StoreClosed("the store is closed") from None
        try:
            return await trio.to_thread.run_sync(query, conn)
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from None
        finally:
            with contextlib.suppress(trio.ClosedResourceError):
                self._readers_send.send_nowait(conn)

    async def fetch(
        self, user: str, device: str, after_sid: int, limit: int, now: int
    ) -> list[QueueItem]:
        result: list[QueueItem] = await self._read(
            lambda conn: _fetch_items(conn, user, device, after_sid, limit, now)
        )
        return result

    async def count(self, user: str, device: str, now: int) -> int:
        result: int = await self._read(lambda conn: _count_items(conn, user, device, now))
        return result

    async def devices(self, user: str) -> list[DeviceRecord]:
        def query(conn: sqlite3.Connection) -> list[DeviceRecord]:
            rows = conn.execute(
                "SELECT user, device, created, last_seen, push_provider, push_token, push_topic,"
                " push_sandbox, push_registered_at FROM devices WHERE user=? ORDER BY device",
                (user,),
            ).fetchall()
            return [DeviceRecord(r[0], r[1], r[2], r[3], _push(r[4:])) for r in rows]

        result: list[DeviceRecord] = await self._read(query)
        return result

    async def push_token(self, user: str, device: str) -> PushToken | None:
        def query(conn: sqlite3.Connection) -> PushToken | None:
            row = conn.execute(
                "SELECT push_provider, push_token, push_topic, push_sandbox, push_registered_at"
                " FROM devices WHERE user=? AND device=?",
                (user, device),
            ).fetchone()
            return None if row is None else _push(row)

        result: PushToken | None = await self._read(query)
        return result


# -- operations, run on the writer thread inside the batch transaction -------------------
# Each SQLite call costs two GIL hand-offs with the event loop, so operations use as few
# statements as they can: an upsert for idempotency, cached device lists, RETURNING sids.


def _delete_device(tx: _Tx, user: str, device: str) -> bool:
    """Delete a device and its queue; True if it existed."""
    row = tx.conn.execute(
        "DELETE FROM devices WHERE user=? AND device=? RETURNING did", (user, device)
    ).fetchone()
    tx.forget(user)
    if row is not None:
        bids = tx.conn.execute("DELETE FROM queue WHERE did=? RETURNING bid", (row[0],)).fetchall()
        _free_bodies(tx.conn, {bid for (bid,) in bids if bid is not None})
    return row is not None


def _free_bodies(conn: sqlite3.Connection, bids: set[int]) -> None:
    """Delete those group-message bodies of `bids` that no queue item points to any more."""
    if not bids:
        return
    marks = ",".join("?" * len(bids))
    conn.execute(
        f"DELETE FROM bodies WHERE bid IN ({marks})"
        " AND NOT EXISTS (SELECT 1 FROM queue WHERE queue.bid = bodies.bid)",
        tuple(bids),
    )


def _apply_open(
    tx: _Tx, user: str, device: str, issued_at: int | None, now: int, limit: int
) -> SessionOpening:
    """`SqliteStore.open_session` on the writer: two statements for a known device (three
    when its queue holds more than a page), two for a new one."""
    conn = tx.conn
    revoked, did = conn.execute(
        "SELECT (SELECT at FROM revoked WHERE user=? AND device=?),"
        " (SELECT did FROM devices WHERE user=? AND device=?)",
        (user, device, user, device),
    ).fetchone()
    if revoked is not None and (issued_at is None or issued_at <= revoked):
        return SessionOpening(refused=True)
    if did is None:
        conn.execute(
            "INSERT OR IGNORE INTO devices (user, device, created, last_seen) VALUES (?,?,?,?)",
            (user, device, now, now),
        )
        tx.forget(user)
        # A new device has no queue: deleting a device deletes its items with it.
        return SessionOpening(refused=False)
    return _read_opening(conn, user, device, now, limit)


def _read_opening(
    conn: sqlite3.Connection, user: str, device: str, now: int, limit: int
) -> SessionOpening:
    """The first `limit` items of a known device's queue and how many it holds."""
    items = tuple(_fetch_items(conn, user, device, 0, limit, now))
    if len(items) < limit:
        return SessionOpening(refused=False, items=items, queued=len(items))
    return SessionOpening(refused=False, items=items, queued=_count_items(conn, user, device, now))


def _fetch_items(
    conn: sqlite3.Connection, user: str, device: str, after_sid: int, limit: int, now: int
) -> list[QueueItem]:
    """Up to `limit` unexpired items of a device with sid > `after_sid`, in sid order."""
    rows = conn.execute(
        "SELECT q.sid, q.kind, q.msg_id, q.sender, q.sender_device, q.ts, q.urgent,"
        " coalesce(b.body, q.body), q.grp FROM devices d JOIN queue q ON q.did = d.did"
        " LEFT JOIN bodies b ON b.bid = q.bid"
        " WHERE d.user=? AND d.device=? AND q.sid>? AND q.expires>?"
        " ORDER BY q.sid LIMIT ?",
        (user, device, after_sid, now, limit),
    ).fetchall()
    return [_item(row) for row in rows]


def _count_items(conn: sqlite3.Connection, user: str, device: str, now: int) -> int:
    """How many unexpired items a device has queued."""
    row = conn.execute(
        "SELECT count(*) FROM devices d JOIN queue q ON q.did = d.did"
        " WHERE d.user=? AND d.device=? AND q.expires>?",
        (user, device, now),
    ).fetchone()
    return int(row[0])


def _apply_send(tx: _Tx, env: Envelope) -> OpResult:
    conn = tx.conn
    # Claims the id, or finds it claimed by a live earlier send (an expired claim is
    # taken over, as if swept).
    claimed = conn.execute(
        "INSERT INTO sent_ids (sender, sender_device, msg_id, ts, expires, recipient)"
        " VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET ts=excluded.ts,"
        " expires=excluded.expires, recipient=excluded.recipient"
        " WHERE sent_ids.expires <= excluded.ts",
        (env.sender, env.sender_device, env.msg_id, env.ts, env.expires, env.to),
    ).rowcount
    if not claimed:
        row = conn.execute(
            "SELECT ts FROM sent_ids WHERE sender=? AND sender_device=? AND msg_id=?",
            (env.sender, env.sender_device, env.msg_id),
        ).fetchone()
        return SendOutcome(ts=row[0], duplicate=True), []
    known = tx.devices(env.to)
    if not known:
        # Release the claim: a later retry, once the recipient exists, must be stored.
        conn.execute(
            "DELETE FROM sent_ids WHERE sender=? AND sender_device=? AND msg_id=?",
            (env.sender, env.sender_device, env.msg_id),
        )
        return SendOutcome(ts=env.ts, unknown_recipient=True), []
    own = env.sender_device if env.to == env.sender else None
    targets = [(did, dev) for did, dev in known if dev != own]
    skipped: tuple[str, ...] = ()
    if env.bodies is not None:
        names = {dev for _, dev in known}
        skipped = tuple(sorted(d for d in env.bodies if d not in names or d == own))
        targets = [(did, dev) for did, dev in targets if dev in env.bodies]
    bodies = [(env.body or b"") if env.bodies is None else env.bodies[dev] for _, dev in targets]
    sids = _insert_items(
        conn,
        [
            (did, ItemKind.MESSAGE, env.msg_id, env.sender, env.sender_device, env.ts,
             env.expires, int(env.urgent), body, None, "")
            for (did, _), body in zip(targets, bodies, strict=True)
        ],
    )  # fmt: skip
    rings = [
        (env.to, dev, env.urgent,
         QueueItem(sid, ItemKind.MESSAGE, env.msg_id, env.sender, env.sender_device, env.ts,
                   env.urgent, body))
        for (_, dev), sid, body in zip(targets, sids, bodies, strict=True)
    ]  # fmt: skip
    return SendOutcome(ts=env.ts, devices=len(targets), skipped=skipped), rings


def _members(conn: sqlite3.Connection, group: str) -> frozenset[str] | None:
    """The members of a group, or None if it does not exist (one row, however many)."""
    exists, listed = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM groups WHERE grp=?),"
        " (SELECT json_group_array(user) FROM group_members WHERE grp=?)",
        (group, group),
    ).fetchone()
    return frozenset(json.loads(listed)) if exists else None


def _add_members(tx: _Tx, group: str, users: AbstractSet[str], now: int) -> None:
    tx.conn.executemany(
        "INSERT OR IGNORE INTO group_members (grp, user, joined) VALUES (?,?,?)",
        [(group, user, now) for user in sorted(users)],
    )
    tx.forget_group(group)


def _leave(tx: _Tx, group: str, users: AbstractSet[str], now: int) -> None:
    """End the membership of `users`, keeping its span for their later reads."""
    for user in sorted(users):
        tx.conn.execute(
            "INSERT OR REPLACE INTO group_left (grp, user, joined, left)"
            " SELECT grp, user, joined, ? FROM group_members WHERE grp=? AND user=?",
            (now, group, user),
        )
        tx.conn.execute("DELETE FROM group_members WHERE grp=? AND user=?", (group, user))
    tx.forget_group(group)


def _insert_group_events(
    tx: _Tx, group: str, events: list[GroupEvent], now: int, expires: int
) -> list[Ring]:
    """Queue each `group` event to every device of its recipients."""
    rings: list[Ring] = []
    for e in events:
        targets = [(user, did, dev) for user in e.recipients for did, dev in tx.devices(user)]
        sids = _insert_copies(
            tx.conn,
            [did for _, did, _ in targets],
            (ItemKind.GROUP, e.event, "", "", now, expires, 0, cbor2.dumps(list(e.users)), None,
             group),
        )  # fmt: skip
        rings += [
            (user, dev, False,
             QueueItem(sid, ItemKind.GROUP, e.event, "", "", now, False, b"", e.users, group))
            for (user, _, dev), sid in zip(targets, sids, strict=True)
        ]  # fmt: skip
    return rings


def _apply_group_send(tx: _Tx, env: GroupEnvelope) -> OpResult:
    """Claim the id, check membership, store the body once and one item per member device
    pointing to it, in the batch's transaction."""
    conn = tx.conn
    claimed = conn.execute(
        "INSERT INTO sent_ids (sender, sender_device, msg_id, ts, expires, recipient)"
        " VALUES (?,?,?,?,?,'') ON CONFLICT DO UPDATE SET ts=excluded.ts,"
        " expires=excluded.expires, recipient=excluded.recipient"
        " WHERE sent_ids.expires <= excluded.ts",
        (env.sender, env.sender_device, env.msg_id, env.ts, env.expires),
    ).rowcount
    if not claimed:
        row = conn.execute(
            "SELECT ts FROM sent_ids WHERE sender=? AND sender_device=? AND msg_id=?",
            (env.sender, env.sender_device, env.msg_id),
        ).fetchone()
        listed = tuple(sorted(tx.members(env.group) or ()))
        return SendOutcome(ts=row[0], duplicate=True, members=listed), []
    members = tx.members(env.group)
    if members is None or env.sender not in members:
        conn.execute(
            "DELETE FROM sent_ids WHERE sender=? AND sender_device=? AND msg_id=?",
            (env.sender, env.sender_device, env.msg_id),
        )
        return SendOutcome(ts=env.ts, not_member=True), []
    conn.execute(
        "INSERT INTO group_sent (sender, msg_id, grp, expires, ts) VALUES (?,?,?,?,?)"
        " ON CONFLICT DO UPDATE SET expires=excluded.expires, ts=excluded.ts",
        (env.sender, env.msg_id, env.group, env.expires, env.ts),
    )
    targets = [
        (user, did, dev)
        for user in sorted(members)
        for did, dev in tx.devices(user)
        if not (user == env.sender and dev == env.sender_device)
    ]
    if not targets:
        return SendOutcome(ts=env.ts), []
    bid = conn.execute(
        "INSERT INTO bodies (expires, body) VALUES (?,?) RETURNING bid", (env.expires, env.body)
    ).fetchone()[0]
    sids = _insert_copies(
        conn,
        [did for _, did, _ in targets],
        (ItemKind.MESSAGE, env.msg_id, env.sender, env.sender_device, env.ts, env.expires,
         int(env.urgent), b"", bid, env.group),
    )  # fmt: skip
    rings = [
        (user, dev, env.urgent,
         QueueItem(sid, ItemKind.MESSAGE, env.msg_id, env.sender, env.sender_device, env.ts,
                   env.urgent, env.body, (), env.group))
        for (user, _, dev), sid in zip(targets, sids, strict=True)
    ]  # fmt: skip
    return SendOutcome(ts=env.ts, devices=len(targets)), rings


def _apply_isolated(tx: _Tx, op: _Op) -> Outcome:
    """Apply one operation in a savepoint of its own: if it fails, it fails alone."""
    tx.conn.execute("SAVEPOINT op")
    try:
        value, rings = op.apply(tx)
    except Exception as exc:
        tx.conn.execute("ROLLBACK TO op")
        tx.conn.execute("RELEASE op")
        tx.forget()
        log.warning("store operation failed: %s", exc)
        return StoreError(str(exc))
    tx.conn.execute("RELEASE op")
    return value, rings


def _apply_together(tx: _Tx, batch: Sequence[_Op]) -> list[OpResult]:
    """Apply a batch in order, each run of acks in it as one (`_apply_acks`)."""
    results: list[OpResult] = []
    acks: list[_Ack] = []
    for op in batch:
        if op.ack is not None:
            acks.append(op.ack)
            continue
        if acks:
            results += _apply_acks(tx, acks)
            acks = []
        results.append(op.apply(tx))
    if acks:
        results += _apply_acks(tx, acks)
    return results


def _apply_acks(tx: _Tx, acks: Sequence[_Ack]) -> list[OpResult]:
    """Delete the items `acks` name, each only from its own device's queue, and queue the
    delivered receipts they call for: a few statements for the lot, not a few per ack.

    After a group message every member device acks it at about the same time: thousands
    of acks, each of which would otherwise take a delete, a body check and a receipt
    insert of its own. Returns, per ack, how many items it deleted and the devices its
    receipts ring.
    """
    if any(not 0 <= sid <= MAX_SID for a in acks for sid in a.sids):
        raise StoreError("sid out of range")  # in a batch, it is then redone ack by ack
    dids = [next((d for d, name in tx.devices(a.user) if name == a.device), None) for a in acks]
    wanted = [sid for a, did in zip(acks, dids, strict=True) if did is not None for sid in a.sids]
    if not wanted:
        return [(0, [])] * len(acks)
    # (sid, did, kind, msg_id, sender, bid) of every item named, read as one JSON row
    found = {
        row[0]: row
        for row in json.loads(
            tx.conn.execute(
                "SELECT json_group_array(json_array(sid, did, kind, msg_id, sender, bid))"
                " FROM queue WHERE sid IN (SELECT value FROM json_each(?))",
                (json.dumps(wanted),),
            ).fetchone()[0]
        )
    }
    taken: list[list[list[Any]]] = []  # per ack, the rows it deletes
    for ack, did in zip(acks, dids, strict=True):
        mine = [found.pop(sid) for sid in ack.sids if sid in found and found[sid][1] == did]
        taken.append(mine)
    gone = [row for rows in taken for row in rows]
    if gone:
        tx.conn.execute(
            "DELETE FROM queue WHERE sid IN (SELECT value FROM json_each(?))",
            (json.dumps([row[0] for row in gone]),),
        )
        _free_bodies(tx.conn, {row[5] for row in gone if row[5] is not None})
    receipts: list[tuple[Any, ...]] = []  # queue rows
    targets: list[tuple[int, str, str, tuple[str, ...]]] = []  # (which ack, to, device, ids)
    for n, (ack, rows) in enumerate(zip(acks, taken, strict=True)):
        for sender, ids in delivered_by_sender((r[2], r[3], r[4]) for r in rows).items():
            body = cbor2.dumps(list(ids))
            for did, dev in tx.devices(sender):
                receipts.append((did, ItemKind.DELIVERED, "", ack.user, ack.device, ack.now,
                                 ack.expires, 0, body, None, ""))  # fmt: skip
                targets.append((n, sender, dev, ids))
    rings: list[list[Ring]] = [[] for _ in acks]
    for (n, to, dev, ids), sid in zip(targets, _insert_items(tx.conn, receipts), strict=True):
        by = acks[n]
        item = QueueItem(sid, ItemKind.DELIVERED, "", by.user, by.device, by.now, False, b"", ids)
        rings[n].append((to, dev, False, item))
    return [(len(rows), rung) for rows, rung in zip(taken, rings, strict=True)]


def _received_ids(
    conn: sqlite3.Connection, reader: str, sender: str, ids: tuple[str, ...], now: int
) -> tuple[str, ...]:
    """Those of `ids` that `sender` sent to `reader` and that have not expired, in order."""
    if not ids:
        return ()
    marks = ",".join("?" * len(ids))
    found = {
        msg_id
        for (msg_id,) in conn.execute(
            "SELECT msg_id FROM sent_ids WHERE recipient=? AND sender=? AND expires>?"
            f" AND msg_id IN ({marks})"
            " UNION SELECT s.msg_id FROM group_sent s WHERE s.sender=? AND s.expires>?"
            f" AND s.msg_id IN ({marks}) AND (EXISTS (SELECT 1 FROM group_members m"
            " WHERE m.grp=s.grp AND m.user=? AND m.joined<=s.ts) OR EXISTS (SELECT 1"
            " FROM group_left l WHERE l.grp=s.grp AND l.user=? AND l.joined<=s.ts"
            " AND s.ts<l.left))",
            (reader, sender, now, *ids, sender, now, *ids, reader, reader),
        )
    }
    return tuple(dict.fromkeys(i for i in ids if i in found))


def _insert_receipts(
    tx: _Tx,
    kind: ItemKind,
    to: str,
    by: str,
    by_device: str,
    ids: tuple[str, ...],
    now: int,
    expires: int,
    skip: str = "",
) -> list[Ring]:
    """One receipt item per device of `to` (but `skip`), carrying all `ids` at once."""
    if not ids:
        return []
    known = [(did, dev) for did, dev in tx.devices(to) if dev != skip]
    sids = _insert_copies(
        tx.conn,
        [did for did, _ in known],
        (kind, "", by, by_device, now, expires, 0, cbor2.dumps(list(ids)), None, ""),
    )
    return [
        (to, dev, False, QueueItem(sid, kind, "", by, by_device, now, False, b"", ids))
        for (_, dev), sid in zip(known, sids, strict=True)
    ]


# Inserted rows' sids are worked out, not read back: one writer and AUTOINCREMENT make
# the sids of one statement consecutive, in insertion order, ending at `lastrowid`. Reading
# them back (RETURNING) would take one step per row, and the GIL with each.


def _insert_items(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int]:
    """Insert queue rows with one statement per `INSERT_ROWS`; return their sids in order."""
    sids: list[int] = []
    for start in range(0, len(rows), INSERT_ROWS):
        chunk = rows[start : start + INSERT_ROWS]
        values = ",".join(["(?,?,?,?,?,?,?,?,?,?,?)"] * len(chunk))
        cursor = conn.execute(
            "INSERT INTO queue (did, kind, msg_id, sender, sender_device, ts, expires, urgent,"
            f" body, bid, grp) VALUES {values}",
            [value for row in chunk for value in row],
        )
        sids += _inserted(cursor, len(chunk))
    return sids


def _insert_copies(conn: sqlite3.Connection, dids: Sequence[int], item: tuple[Any, ...]) -> range:
    """Insert one queue row for each of `dids`, all alike but for the device: `item` holds
    the other columns (kind, msg_id, sender, sender_device, ts, expires, urgent, body, bid,
    grp). One statement whatever the count: the dids go in as one JSON array, which SQLite
    binds and walks far faster than as many rows of placeholders. Returns their sids, in
    the order of `dids`."""
    if not dids:
        return range(0)
    cursor = conn.execute(
        "INSERT INTO queue (did, kind, msg_id, sender, sender_device, ts, expires, urgent,"
        " body, bid, grp) SELECT value, ?,?,?,?,?,?,?,?,?,? FROM json_each(?) ORDER BY key",
        (*item, json.dumps(dids)),
    )
    return _inserted(cursor, len(dids))


def _inserted(cursor: sqlite3.Cursor, count: int) -> range:
    """The sids of the `count` rows the INSERT just run on `cursor` added."""
    if cursor.rowcount != count or cursor.lastrowid is None:
        raise StoreError(f"inserted {cursor.rowcount} queue rows of {count}")
    return range(cursor.lastrowid - count + 1, cursor.lastrowid + 1)


def _unwritable(path: Path) -> str:
    """Why SQLite may have failed to open `path`, if the file system says (else "")."""
    for where in (path, path.parent):
        try:
            if os.statvfs(where).f_flag & os.ST_RDONLY:
                return f" ({where} is on a read-only file system)"
            if where.exists() and not os.access(where, os.W_OK):
                return f" ({where} is not writable)"
        except OSError:
            continue
    return ""


def _item(row: tuple[Any, ...]) -> QueueItem:
    """A queue row back into its item (a receipt's ids are stored as a CBOR list)."""
    sid, kind, msg_id, sender, sender_device, ts, urgent, body, group = row
    return decode_item(
        sid, kind, msg_id, sender, sender_device, ts, urgent,
        body if kind == ItemKind.MESSAGE else cbor2.loads(body), group,
    )  # fmt: skip


def _push(row: Sequence[Any]) -> PushToken | None:
    provider, token, topic, sandbox, registered_at = row
    if provider is None or token is None:
        return None
    return PushToken(provider, token, topic, bool(sandbox), registered_at)
