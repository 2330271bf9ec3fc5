"""A store-and-forward relay on `websockets` (asyncio) and SQLite: what a Python team
would write instead of the gateway. It is the benchmark's third system.

    python -m scripts.peers.ws_relay --port 9000 --db relay.db --secret S

It speaks the subset of protocol v1 the benchmark uses, in CBOR over binary WebSocket
messages: ``hello`` (an HS256 JWT, verified) → ``welcome``, the queued items, ``drained``;
``send`` → ``sent`` once the message is committed, and a ``msg`` to the recipient;
``ack`` → the items are deleted and a ``receipt`` (kind ``delivered``) is queued for each
sender, committed and delivered like a message. One device per user.

Tuned, not a strawman:

- SQLite in WAL mode with ``synchronous = FULL`` (a `sent` survives power loss, as the
  gateway's default does), one writer connection on one thread, **group commit**: every
  operation that arrives while a commit runs goes into the next one, so one fsync covers
  a whole batch; the asyncio loop never blocks on SQLite;
- a committed item goes straight from memory to a connected recipient; only a
  reconnecting device reads its backlog from the database, 256 items per query, in the
  same order (by row id);
- per connection, everything ready is sent as one CBOR array in one WebSocket message;
- no permessage-deflate, no per-frame JSON, one small handler per frame type.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import jwt
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

FETCH = 256
MAX_BATCH = 1024
MSG, RECEIPT = 0, 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    kind INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    ts INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_by_device ON queue (device, id);
"""


@dataclass(slots=True)
class Item:
    """One queued item, as stored and as delivered."""

    id: int
    device: str
    kind: int
    msg_id: str
    sender: str
    ts: int
    body: bytes

    def frame(self) -> dict[str, Any]:
        """The frame that delivers it."""
        if self.kind == MSG:
            return {
                "t": "msg",
                "sid": self.id,
                "id": self.msg_id,
                "from": self.sender,
                "ts": self.ts,
                "body": self.body,
            }
        return {
            "t": "receipt",
            "sid": self.id,
            "kind": "delivered",
            "ids": cbor2.loads(self.body),
            "by": self.sender,
            "ts": self.ts,
        }


@dataclass(slots=True)
class Op:
    """A write for the next group commit: inserts and/or deletes."""

    inserts: list[tuple[str, int, str, str, int, bytes]] = field(default_factory=list)
    deletes: list[tuple[int, str]] = field(default_factory=list)  # (id, device)
    done: asyncio.Future[tuple[list[Item], list[tuple[str, str]]]] | None = None


class Store:
    """SQLite with a single writer thread and group commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = self._open()
        self._writer.executescript(SCHEMA)
        self._reader = self._open()
        self._ops: list[Op] = []
        self._wake = asyncio.Event()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        return db

    async def run(self) -> None:
        """Commit whatever has accumulated, again and again."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                batch, self._ops = self._ops[:MAX_BATCH], self._ops[MAX_BATCH:]
                try:
                    results = await asyncio.to_thread(self._commit, batch)
                except sqlite3.Error as exc:
                    for op in batch:
                        if op.done is not None and not op.done.done():
                            op.done.set_exception(exc)
                    continue
                for op, result in zip(batch, results, strict=True):
                    if op.done is not None and not op.done.done():
                        op.done.set_result(result)

    def submit(self, op: Op) -> asyncio.Future[tuple[list[Item], list[tuple[str, str]]]]:
        """Queue a write; the future has the inserted items and, for deletes, the
        (sender, msg_id) of each deleted message."""
        op.done = asyncio.get_running_loop().create_future()
        self._ops.append(op)
        self._wake.set()
        return op.done

    def _commit(self, batch: list[Op]) -> list[tuple[list[Item], list[tuple[str, str]]]]:
        db = self._writer
        out: list[tuple[list[Item], list[tuple[str, str]]]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                items = []
                for row in op.inserts:
                    cursor = db.execute(
                        "INSERT INTO queue (device, kind, msg_id, sender, ts, body) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    assert cursor.lastrowid is not None
                    items.append(Item(cursor.lastrowid, *row))
                deleted = []
                for item_id, device in op.deletes:
                    gone = db.execute(
                        "DELETE FROM queue WHERE id = ? AND device = ? "
                        "RETURNING kind, sender, msg_id",
                        (item_id, device),
                    ).fetchone()
                    if gone is not None and gone[0] == MSG:
                        deleted.append((gone[1], gone[2]))
                out.append((items, deleted))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    async def backlog(self, device: str, after: int) -> list[Item]:
        """Up to FETCH queued items of `device` after row id `after`."""

        def read() -> list[Item]:
            rows = self._reader.execute(
                "SELECT id, device, kind, msg_id, sender, ts, body FROM queue "
                "WHERE device = ? AND id > ? ORDER BY id LIMIT ?",
                (device, after, FETCH),
            ).fetchall()
            return [Item(*row) for row in rows]

        return await asyncio.to_thread(read)


class Device:
    """A connected device: its outbox and its delivery cursor."""

    def __init__(self, ws: ServerConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        self.out: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        self.live = False  # backlog read: committed items may be sent straight away
        self.cursor = 0
        self.waiting: list[Item] = []  # committed while the backlog was being read

    def push(self, frame: dict[str, Any]) -> None:
        self.out.append(frame)
        self.ready.set()

    def deliver(self, item: Item) -> None:
        if not self.live:
            self.waiting.append(item)
        elif item.id > self.cursor:
            self.cursor = item.id
            self.push(item.frame())

    async def writer(self) -> None:
        """Send everything ready as one message, until the connection ends."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            frames, self.out = self.out, []
            if frames:
                await self.ws.send(cbor2.dumps(frames[0] if len(frames) == 1 else frames))


class Relay:
    """The handlers: hello, send, ack."""

    def __init__(self, store: Store, secret: str) -> None:
        self.store = store
        self.secret = secret
        self.devices: dict[str, Device] = {}

    async def handle(self, ws: ServerConnection) -> None:
        """One connection, from `hello` to close."""
        try:
            raw = await asyncio.wait_for(ws.recv(), 10)
            first = cbor2.loads(raw if isinstance(raw, bytes) else b"")
            claims = jwt.decode(first["token"], self.secret, algorithms=["HS256"])
            name = str(claims["sub"])
        except (TimeoutError, ValueError, KeyError, TypeError, jwt.PyJWTError, ConnectionClosed):
            await ws.close(4001, "unauthorized")
            return
        old = self.devices.get(name)
        if old is not None:
            await old.ws.close(4009, "replaced")
        device = self.devices[name] = Device(ws, name)
        writer = asyncio.create_task(device.writer())
        try:
            device.push({"t": "welcome", "device": name})
            await self._send_backlog(device)
            async for message in ws:
                if isinstance(message, str):
                    await ws.close(1003, "binary messages only")
                    return
                item = cbor2.loads(message)
                for frame in item if isinstance(item, list) else [item]:
                    await self._on_frame(device, frame)
        except (ConnectionClosed, ValueError, KeyError, TypeError, cbor2.CBORDecodeError):
            pass
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            if self.devices.get(name) is device:
                del self.devices[name]

    async def _send_backlog(self, device: Device) -> None:
        while True:
            items = await self.store.backlog(device.name, device.cursor)
            for item in items:
                device.cursor = item.id
                device.push(item.frame())
            if len(items) < FETCH:
                break
        device.live = True
        for item in device.waiting:
            device.deliver(item)
        device.waiting.clear()
        device.push({"t": "drained"})

    async def _on_frame(self, device: Device, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if kind == "send":
            ts = _now_ms()
            row = (str(frame["to"]), MSG, str(frame["id"]), device.name, ts, bytes(frame["body"]))
            done = self.store.submit(Op(inserts=[row]))
            done.add_done_callback(lambda f: self._stored(device, frame["id"], ts, f))
        elif kind == "ack":
            op = Op(deletes=[(int(sid), device.name) for sid in frame["sids"]])
            self.store.submit(op).add_done_callback(lambda f: self._acked(device, f))

    def _stored(self, device: Device, msg_id: str, ts: int, done: asyncio.Future[Any]) -> None:
        if done.exception() is not None:
            device.push({"t": "error", "code": "internal", "ref": msg_id})
            return
        items, _ = done.result()
        device.push({"t": "sent", "id": msg_id, "ts": ts})
        self._fan_out(items)

    def _acked(self, device: Device, done: asyncio.Future[Any]) -> None:
        if done.exception() is not None:
            return  # the items stay queued and are delivered again
        _, deleted = done.result()
        by_sender: dict[str, list[str]] = {}
        for sender, msg_id in deleted:
            by_sender.setdefault(sender, []).append(msg_id)
        if not by_sender:
            return
        ts = _now_ms()
        rows = [
            (sender, RECEIPT, ids[0], device.name, ts, cbor2.dumps(ids))
            for sender, ids in by_sender.items()
        ]
        self.store.submit(Op(inserts=rows)).add_done_callback(
            lambda f: None if f.exception() else self._fan_out(f.result()[0])
        )

    def _fan_out(self, items: list[Item]) -> None:
        for item in items:
            target = self.devices.get(item.device)
            if target is not None:
                target.deliver(item)


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


async def serve_relay(port: int, database: Path, secret: str) -> None:
    """Serve on 127.0.0.1:`port` until cancelled."""
    store = Store(database)
    relay = Relay(store, secret)
    committer = asyncio.create_task(store.run())
    async with serve(
        relay.handle, "127.0.0.1", port, compression=None, max_size=1 << 20,
        subprotocols=["gateway.v1"],  # type: ignore[list-item]
    ) as server:  # fmt: skip
        print(f"relay listening on 127.0.0.1:{port}", flush=True)
        try:
            await server.serve_forever()
        finally:
            committer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_relay(args.port, args.db, args.secret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
