"""Receipt coalescing at delivery: many stored receipt items, one `receipt` frame.

Receipts for one device from the same (kind, user, device) are merged when they are
delivered together, however the acks that caused them arrived. The merged frame carries
the sid of the last item; an ack of that sid stands for all of the merged items, which
the connection remembers until then.
"""

from __future__ import annotations

from typing import Any

from gateway.frames import delivery
from gateway.store.base import ItemKind, QueueItem

RECEIPTS = (ItemKind.DELIVERED, ItemKind.READ)  # messages and group events stay one a frame
MAX_MERGED_IDS = 1000  # keeps one receipt frame within what any client parses comfortably


def coalesce(items: list[QueueItem]) -> tuple[list[dict[str, Any]], dict[int, tuple[int, ...]]]:
    """Frames for `items` in store order, with receipts of one origin merged.

    Returns:
        The frames, and for each merged frame's sid the other sids it stands for. A merged
        receipt takes the place of the last item it absorbed, so no id is delivered
        earlier than it would have been alone.
    """
    groups: list[list[QueueItem]] = []
    open_groups: dict[tuple[ItemKind, str, str], list[QueueItem]] = {}
    for item in items:
        if item.kind not in RECEIPTS:
            continue
        key = (item.kind, item.sender, item.sender_device)
        group = open_groups.get(key)
        if group is None or sum(len(i.ids) for i in group) + len(item.ids) > MAX_MERGED_IDS:
            group = open_groups[key] = []
            groups.append(group)
        group.append(item)
    emit_at = {group[-1].sid: group for group in groups}
    out: list[dict[str, Any]] = []
    merged: dict[int, tuple[int, ...]] = {}
    for item in items:
        if item.kind not in RECEIPTS:
            out.append(delivery(item))
            continue
        group = emit_at.get(item.sid)
        if group is None:
            continue  # absorbed into a later frame of its group
        out.append(delivery(item, ids=[i for member in group for i in member.ids]))
        if len(group) > 1:
            merged[item.sid] = tuple(member.sid for member in group[:-1])
    return out, merged
