"""The SQLite store's tables and indexes, and what a file made by an earlier version gains
when it is opened."""

from __future__ import annotations

import sqlite3

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


def create_schema(conn: sqlite3.Connection) -> None:
    """Create whatever the file lacks: tables, the columns added since it was made, and
    the indexes (some of which need those columns)."""
    conn.executescript(SCHEMA)
    for table, column, alter in MIGRATIONS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(alter)
    conn.executescript(INDEXES)
