"""The embedded backend: SQLite in WAL mode, group commit on a worker thread.

Submissions queue up in a bounded channel. The writer task takes everything waiting (up
to `max_batch`) and applies it in one transaction on a worker thread, one savepoint per
operation so that a failing operation fails alone. While a batch commits, the next one
gathers: under load, many sends share one fsync. Reads use a small pool of separate
connections, which WAL lets run alongside the writer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import trio

from gateway.errors import StoreClosed, StoreError
from gateway.store.base import (
    DeviceRecord,
    Doorbell,
    Envelope,
    ItemKind,
    PushToken,
    QueueItem,
    SendOutcome,
    SessionOpening,
    Ticket,
)
from gateway.store.group_commit import GroupCommitStore, Outcome
from gateway.store.groups import (
    GroupChange,
    GroupEnvelope,
    deletion_events,
    membership_events,
)
from gateway.store.sqlite_rows import (
    Ack,
    OpResult,
    Tx,
    add_members,
    apply_acks,
    apply_group_send,
    apply_open,
    apply_send,
    count_items,
    delete_device,
    fetch_items,
    insert_group_events,
    insert_receipts,
    leave,
    push_token_of_row,
    read_members,
    read_opening,
    received_ids,
)
from gateway.store.sqlite_schema import create_schema

log = logging.getLogger(__name__)

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

Apply = Callable[[Tx], OpResult]


@dataclass(slots=True)
class _Op:
    apply: Apply
    ticket: Ticket[Any]
    ack: Ack | None = None


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
        self._tx: Tx | None = None
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
        create_schema(writer)
        self._tx = Tx(writer)
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

    async def _submit(self, apply: Apply, ack: Ack | None = None) -> Ticket[Any]:
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
        tx: Tx,
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
        return await self._submit(lambda tx: apply_send(tx, envelope))

    async def submit_ack(
        self, user: str, device: str, sids: tuple[int, ...], now: int
    ) -> Ticket[int]:
        ack = Ack(user, device, sids, now, now + self._receipt_ttl_ms)
        return await self._submit(lambda tx: apply_acks(tx, [ack])[0], ack)

    async def submit_read(
        self,
        reader: str,
        reader_device: str,
        to: str,
        ids: tuple[str, ...],
        now: int,
        expires: int,
    ) -> Ticket[int]:
        def apply(tx: Tx) -> OpResult:
            received = received_ids(tx.conn, reader, to, ids, now)
            rings = insert_receipts(
                tx, ItemKind.READ, to, reader, reader_device, received, now, expires
            )
            if to != reader:  # the reader's other devices learn what was read
                rings += insert_receipts(
                    tx, ItemKind.READ, reader, reader, reader_device, received, now, expires,
                    skip=reader_device,
                )  # fmt: skip
            return len(rings), rings

        return await self._submit(apply)

    async def submit_group_send(self, envelope: GroupEnvelope) -> Ticket[SendOutcome]:
        return await self._submit(lambda tx: apply_group_send(tx, envelope))

    async def set_group(
        self, group: str, members: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        expires = now + self._receipt_ttl_ms

        def apply(tx: Tx) -> OpResult:
            new = set(members)
            if len(new) > limit:
                return GroupChange(over_limit=True), []
            old = tx.members(group)
            if old is None:
                tx.conn.execute("INSERT INTO groups (grp, created) VALUES (?,?)", (group, now))
                tx.forget_group(group)
            leave(tx, group, (old or set()) - new, now)
            add_members(tx, group, new - (old or set()), now)
            events = membership_events(old or (), new)
            rings = insert_group_events(tx, group, events, now, expires)
            return GroupChange(tuple(sorted(new)), created=old is None), rings

        result: GroupChange = await (await self._submit(apply)).result()
        return result

    async def add_group_members(
        self, group: str, users: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        expires = now + self._receipt_ttl_ms

        def apply(tx: Tx) -> OpResult:
            old = tx.members(group)
            if old is None:
                return GroupChange(found=False), []
            new = old | set(users)
            if len(new) > limit:
                return GroupChange(tuple(sorted(old)), over_limit=True), []
            add_members(tx, group, new - old, now)
            events = membership_events(old, new)
            return GroupChange(tuple(sorted(new))), insert_group_events(
                tx, group, events, now, expires
            )

        result: GroupChange = await (await self._submit(apply)).result()
        return result

    async def remove_group_member(self, group: str, user: str, now: int) -> GroupChange:
        expires = now + self._receipt_ttl_ms

        def apply(tx: Tx) -> OpResult:
            old = tx.members(group)
            if old is None or user not in old:
                return GroupChange(found=False), []
            leave(tx, group, {user}, now)
            new = old - {user}
            events = membership_events(old, new)
            return GroupChange(tuple(sorted(new))), insert_group_events(
                tx, group, events, now, expires
            )

        result: GroupChange = await (await self._submit(apply)).result()
        return result

    async def delete_group(self, group: str, now: int) -> bool:
        expires = now + self._receipt_ttl_ms

        def apply(tx: Tx) -> OpResult:
            old = tx.members(group)
            if old is None:
                return False, []
            leave(tx, group, old, now)
            tx.conn.execute("DELETE FROM groups WHERE grp=?", (group,))
            tx.forget_group(group)
            return True, insert_group_events(tx, group, deletion_events(old), now, expires)

        result: bool = await (await self._submit(apply)).result()
        return result

    async def group_members(self, group: str) -> tuple[str, ...] | None:
        def query(conn: sqlite3.Connection) -> tuple[str, ...] | None:
            members = read_members(conn, group)
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
                return read_opening(self._loop_conn, user, device, now, min(limit, LOOP_PAGE))
            except sqlite3.Error as exc:
                raise StoreError(f"read failed: {exc}") from None

        def apply(tx: Tx) -> OpResult:
            return apply_open(tx, user, device, issued_at, now, limit), []

        opening: SessionOpening = await (await self._submit(apply)).result()
        if not opening.refused:
            self._known.add((user, device))
        return opening

    async def register_device(self, user: str, device: str, now: int) -> bool:
        if (user, device) in self._known:
            return False  # known devices cost no commit on every hello

        def apply(tx: Tx) -> OpResult:
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

        def apply(tx: Tx) -> OpResult:
            return delete_device(tx, user, device), []

        result: bool = await (await self._submit(apply)).result()
        return result

    async def revoke_device(self, user: str, device: str, now: int) -> bool:
        self._known.discard((user, device))
        self._revoked.discard((user, device))

        def apply(tx: Tx) -> OpResult:
            existed = delete_device(tx, user, device)
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
        def apply(tx: Tx) -> OpResult:
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
        def apply(tx: Tx) -> OpResult:
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
        def apply(tx: Tx) -> OpResult:
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
            lambda conn: fetch_items(conn, user, device, after_sid, limit, now)
        )
        return result

    async def count(self, user: str, device: str, now: int) -> int:
        result: int = await self._read(lambda conn: count_items(conn, user, device, now))
        return result

    async def devices(self, user: str) -> list[DeviceRecord]:
        def query(conn: sqlite3.Connection) -> list[DeviceRecord]:
            rows = conn.execute(
                "SELECT user, device, created, last_seen, push_provider, push_token, push_topic,"
                " push_sandbox, push_registered_at FROM devices WHERE user=? ORDER BY device",
                (user,),
            ).fetchall()
            return [DeviceRecord(r[0], r[1], r[2], r[3], push_token_of_row(r[4:])) for r in rows]

        result: list[DeviceRecord] = await self._read(query)
        return result

    async def push_token(self, user: str, device: str) -> PushToken | None:
        def query(conn: sqlite3.Connection) -> PushToken | None:
            row = conn.execute(
                "SELECT push_provider, push_token, push_topic, push_sandbox, push_registered_at"
                " FROM devices WHERE user=? AND device=?",
                (user, device),
            ).fetchone()
            return None if row is None else push_token_of_row(row)

        result: PushToken | None = await self._read(query)
        return result


# -- applying a batch, on the writer thread (the operations are in sqlite_rows) -----------


def _apply_isolated(tx: Tx, op: _Op) -> Outcome:
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


def _apply_together(tx: Tx, batch: Sequence[_Op]) -> list[OpResult]:
    """Apply a batch in order, each run of acks in it as one (`apply_acks`)."""
    results: list[OpResult] = []
    acks: list[Ack] = []
    for op in batch:
        if op.ack is not None:
            acks.append(op.ack)
            continue
        if acks:
            results += apply_acks(tx, acks)
            acks = []
        results.append(op.apply(tx))
    if acks:
        results += apply_acks(tx, acks)
    return results


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
