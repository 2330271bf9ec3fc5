"""What the SQLite store does to rows: the operations its writer thread applies inside a
batch's transaction, and the row readers they share with the store's reads.

Each SQLite call costs two GIL hand-offs with the event loop, so operations use as few
statements as they can: an upsert for idempotency, cached device lists and group members,
one JSON array where a statement would otherwise bind a row of values per item, and sids
worked out rather than read back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import cbor2

from gateway.errors import StoreError
from gateway.store.base import (
    MAX_SID,
    Envelope,
    ItemKind,
    PushToken,
    QueueItem,
    SendOutcome,
    SessionOpening,
    decode_item,
    delivered_by_sender,
)
from gateway.store.group_commit import Ring
from gateway.store.groups import GroupEnvelope, GroupEvent

# Queue rows inserted per statement: (rows x columns) stays under SQLite's variable limit.
INSERT_ROWS = 1000

#: What an operation gives: its value, and the devices to ring once it is committed.
OpResult = tuple[Any, list[Ring]]
# Users whose device lists are cached on the writer; past this the cache starts afresh.
DEVICE_CACHE_USERS = 100_000
# Group members cached on the writer, all groups together; past this it starts afresh.
MEMBER_CACHE_ENTRIES = 100_000


class Tx:
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
        known = self._members[group] = read_members(self.conn, group)
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


@dataclass(frozen=True, slots=True)
class Ack:
    """A device's ack, kept apart so that the acks of one batch are applied together."""

    user: str
    device: str
    sids: tuple[int, ...]
    now: int
    expires: int


def delete_device(tx: Tx, user: str, device: str) -> bool:
    """Delete a device and its queue; True if it existed."""
    row = tx.conn.execute(
        "DELETE FROM devices WHERE user=? AND device=? RETURNING did", (user, device)
    ).fetchone()
    tx.forget(user)
    if row is not None:
        # The group bodies its items point to, read as one row (its queue may be long).
        bids = tx.conn.execute(
            "SELECT json_group_array(DISTINCT bid) FROM queue WHERE did=? AND bid IS NOT NULL",
            (row[0],),
        ).fetchone()[0]
        tx.conn.execute("DELETE FROM queue WHERE did=?", (row[0],))
        free_bodies(tx.conn, set(json.loads(bids)))
    return row is not None


def free_bodies(conn: sqlite3.Connection, bids: set[int]) -> None:
    """Delete those group-message bodies of `bids` that no queue item points to any more."""
    if not bids:
        return
    marks = ",".join("?" * len(bids))
    conn.execute(
        f"DELETE FROM bodies WHERE bid IN ({marks})"
        " AND NOT EXISTS (SELECT 1 FROM queue WHERE queue.bid = bodies.bid)",
        tuple(bids),
    )


def apply_open(
    tx: Tx, user: str, device: str, issued_at: int | None, now: int, limit: int
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
    return read_opening(conn, user, device, now, limit)


def read_opening(
    conn: sqlite3.Connection, user: str, device: str, now: int, limit: int
) -> SessionOpening:
    """The first `limit` items of a known device's queue and how many it holds."""
    items = tuple(fetch_items(conn, user, device, 0, limit, now))
    if len(items) < limit:
        return SessionOpening(refused=False, items=items, queued=len(items))
    return SessionOpening(refused=False, items=items, queued=count_items(conn, user, device, now))


def fetch_items(
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
    return [item_of_row(row) for row in rows]


def count_items(conn: sqlite3.Connection, user: str, device: str, now: int) -> int:
    """How many unexpired items a device has queued."""
    row = conn.execute(
        "SELECT count(*) FROM devices d JOIN queue q ON q.did = d.did"
        " WHERE d.user=? AND d.device=? AND q.expires>?",
        (user, device, now),
    ).fetchone()
    return int(row[0])


def claim_id(conn: sqlite3.Connection, env: Envelope | GroupEnvelope, recipient: str) -> int | None:
    """Claim the sender device's message id; None if claimed now, else the `ts` of the
    live earlier send that holds it (an expired claim is taken over, as if swept)."""
    claimed = conn.execute(
        "INSERT INTO sent_ids (sender, sender_device, msg_id, ts, expires, recipient)"
        " VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET ts=excluded.ts,"
        " expires=excluded.expires, recipient=excluded.recipient"
        " WHERE sent_ids.expires <= excluded.ts",
        (env.sender, env.sender_device, env.msg_id, env.ts, env.expires, recipient),
    ).rowcount
    if claimed:
        return None
    row = conn.execute(
        "SELECT ts FROM sent_ids WHERE sender=? AND sender_device=? AND msg_id=?",
        (env.sender, env.sender_device, env.msg_id),
    ).fetchone()
    return int(row[0])


def release_id(conn: sqlite3.Connection, env: Envelope | GroupEnvelope) -> None:
    """Give up a claim made by `claim_id`: a later retry of a refused send must be stored."""
    conn.execute(
        "DELETE FROM sent_ids WHERE sender=? AND sender_device=? AND msg_id=?",
        (env.sender, env.sender_device, env.msg_id),
    )


def apply_send(tx: Tx, env: Envelope) -> OpResult:
    conn = tx.conn
    if (earlier := claim_id(conn, env, env.to)) is not None:
        return SendOutcome(ts=earlier, duplicate=True), []
    known = tx.devices(env.to)
    if not known:  # a retry, once the recipient exists, is stored
        release_id(conn, env)
        return SendOutcome(ts=env.ts, unknown_recipient=True), []
    own = env.sender_device if env.to == env.sender else None
    targets = [(did, dev) for did, dev in known if dev != own]
    skipped: tuple[str, ...] = ()
    if env.bodies is not None:
        names = {dev for _, dev in known}
        skipped = tuple(sorted(d for d in env.bodies if d not in names or d == own))
        targets = [(did, dev) for did, dev in targets if dev in env.bodies]
    bodies = [(env.body or b"") if env.bodies is None else env.bodies[dev] for _, dev in targets]
    sids = insert_items(
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


def read_members(conn: sqlite3.Connection, group: str) -> frozenset[str] | None:
    """The members of a group, or None if it does not exist (one row, however many)."""
    exists, listed = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM groups WHERE grp=?),"
        " (SELECT json_group_array(user) FROM group_members WHERE grp=?)",
        (group, group),
    ).fetchone()
    return frozenset(json.loads(listed)) if exists else None


def add_members(tx: Tx, group: str, users: AbstractSet[str], now: int) -> None:
    tx.conn.executemany(
        "INSERT OR IGNORE INTO group_members (grp, user, joined) VALUES (?,?,?)",
        [(group, user, now) for user in sorted(users)],
    )
    tx.forget_group(group)


def leave(tx: Tx, group: str, users: AbstractSet[str], now: int) -> None:
    """End the membership of `users`, keeping its span for their later reads."""
    for user in sorted(users):
        tx.conn.execute(
            "INSERT OR REPLACE INTO group_left (grp, user, joined, left)"
            " SELECT grp, user, joined, ? FROM group_members WHERE grp=? AND user=?",
            (now, group, user),
        )
        tx.conn.execute("DELETE FROM group_members WHERE grp=? AND user=?", (group, user))
    tx.forget_group(group)


def insert_group_events(
    tx: Tx, group: str, events: list[GroupEvent], now: int, expires: int
) -> list[Ring]:
    """Queue each `group` event to every device of its recipients."""
    rings: list[Ring] = []
    for e in events:
        targets = [(user, did, dev) for user in e.recipients for did, dev in tx.devices(user)]
        sids = insert_copies(
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


def apply_group_send(tx: Tx, env: GroupEnvelope) -> OpResult:
    """Claim the id, check membership, store the body once and one item per member device
    pointing to it, in the batch's transaction."""
    conn = tx.conn
    members = tx.members(env.group)
    if (earlier := claim_id(conn, env, "")) is not None:
        listed = tuple(sorted(members or ()))
        return SendOutcome(ts=earlier, duplicate=True, members=listed), []
    if members is None or env.sender not in members:
        release_id(conn, env)
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
    sids = insert_copies(
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


def apply_acks(tx: Tx, acks: Sequence[Ack]) -> list[OpResult]:
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
        free_bodies(tx.conn, {row[5] for row in gone if row[5] is not None})
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
    for (n, to, dev, ids), sid in zip(targets, insert_items(tx.conn, receipts), strict=True):
        by = acks[n]
        item = QueueItem(sid, ItemKind.DELIVERED, "", by.user, by.device, by.now, False, b"", ids)
        rings[n].append((to, dev, False, item))
    return [(len(rows), rung) for rows, rung in zip(taken, rings, strict=True)]


def received_ids(
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


def insert_receipts(
    tx: Tx,
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
    sids = insert_copies(
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


def insert_items(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int]:
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
        sids += inserted(cursor, len(chunk))
    return sids


def insert_copies(conn: sqlite3.Connection, dids: Sequence[int], item: tuple[Any, ...]) -> range:
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
    return inserted(cursor, len(dids))


def inserted(cursor: sqlite3.Cursor, count: int) -> range:
    """The sids of the `count` rows the INSERT just run on `cursor` added."""
    if cursor.rowcount != count or cursor.lastrowid is None:
        raise StoreError(f"inserted {cursor.rowcount} queue rows of {count}")
    return range(cursor.lastrowid - count + 1, cursor.lastrowid + 1)


def item_of_row(row: tuple[Any, ...]) -> QueueItem:
    """A queue row back into its item (a receipt's ids are stored as a CBOR list)."""
    sid, kind, msg_id, sender, sender_device, ts, urgent, body, group = row
    return decode_item(
        sid, kind, msg_id, sender, sender_device, ts, urgent,
        body if kind == ItemKind.MESSAGE else cbor2.loads(body), group,
    )  # fmt: skip


def push_token_of_row(row: Sequence[Any]) -> PushToken | None:
    provider, token, topic, sandbox, registered_at = row
    if provider is None or token is None:
        return None
    return PushToken(provider, token, topic, bool(sandbox), registered_at)
