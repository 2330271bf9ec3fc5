"""Receipts to one device are coalesced at delivery, however the acks arrived."""

from __future__ import annotations

from gateway.client import connect
from gateway.coalesce import MAX_MERGED_IDS, coalesce
from gateway.store.base import ItemKind, QueueItem
from tests.rawws import hello, raw_ws, recv, send


def receipt(sid: int, by: str, ids: tuple[str, ...], kind=ItemKind.DELIVERED) -> QueueItem:
    return QueueItem(sid, kind, "", by, "phone", 1000 + sid, False, b"", ids)


def message(sid: int) -> QueueItem:
    return QueueItem(sid, ItemKind.MESSAGE, f"m{sid}", "bob", "phone", 1000, True, b"x")


def test_receipts_of_one_origin_merge_at_the_place_of_the_last():
    items = [receipt(1, "bob", ("a",)), message(2), receipt(3, "bob", ("b", "c")),
             receipt(4, "carol", ("d",)), receipt(5, "bob", ("e",), ItemKind.READ)]  # fmt: skip
    frames, merged = coalesce(items)
    assert [(f["t"], f["sid"]) for f in frames] == [
        ("msg", 2), ("receipt", 3), ("receipt", 4), ("receipt", 5)
    ]  # fmt: skip
    assert frames[1]["ids"] == ["a", "b", "c"]
    assert merged == {3: (1,)}


def test_group_events_are_never_merged():
    events = [QueueItem(sid, ItemKind.GROUP, "added", "", "", 1000, False, b"", (f"u{sid}",),
                        "team") for sid in (1, 2)]  # fmt: skip
    frames, merged = coalesce(events)
    assert [(f["t"], f["sid"], f["users"]) for f in frames] == [
        ("group", 1, ["u1"]), ("group", 2, ["u2"]),
    ]  # fmt: skip
    assert merged == {}


def test_a_merged_receipt_stays_within_the_id_limit():
    items = [receipt(i, "bob", tuple(f"{i}-{j}" for j in range(400))) for i in range(1, 6)]
    frames, merged = coalesce(items)
    assert all(len(f["ids"]) <= MAX_MERGED_IDS for f in frames)
    assert sum(len(f["ids"]) for f in frames) == 2000
    assert sorted(s for f in frames for s in (f["sid"], *merged.get(f["sid"], ()))) == [
        1,
        2,
        3,
        4,
        5,
    ]


async def test_acks_one_by_one_still_give_one_receipt_and_its_ack_clears_all(server, token):
    async with connect(server.url, token("bob", "phone")):
        pass
    async with connect(server.url, token("alice", "phone")) as alice:
        ids = [(await alice.send("bob", bytes([i]))).id for i in range(5)]
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("bob", "phone"))
        for frame in frames:
            if frame["t"] == "msg":
                await send(ws, {"t": "ack", "sids": [frame["sid"]]})  # five separate acks
        await send(ws, {"t": "send", "id": "sync", "to": "bob", "body": b""})
        while not any(f["t"] == "sent" for f in await recv(ws)):
            pass
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("alice", "phone"))
        receipts = [f for f in frames if f["t"] == "receipt"]
        assert len(receipts) == 1 and receipts[0]["ids"] == ids
        await send(ws, {"t": "ack", "sids": [receipts[0]["sid"]]})
        await send(ws, {"t": "send", "id": "sync", "to": "alice", "body": b""})
        while not any(f["t"] == "sent" for f in await recv(ws)):
            pass
    async with raw_ws(server.url) as ws:
        frames = await hello(ws, token("alice", "phone"))
    assert frames[0]["queued"] == 0
