"""Groups in the store: the values group operations take and give, and which `group`
events a membership change queues.

A group is a durable member list owned by the backend API. A group message is stored for
every device of every member (the sending device excluded) with its body stored once:
queue items reference it, and it is deleted when the last of them is acked or expires.
Every membership change queues a `group` event item to every device of every member,
added and removed users included, so clients can rotate their group keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: The events a `group` item carries.
ADDED, REMOVED, DELETED = "added", "removed", "deleted"


@dataclass(frozen=True, slots=True)
class GroupEnvelope:
    """A message to store for every member device of `group`: one body for all."""

    sender: str
    sender_device: str
    msg_id: str
    group: str
    body: bytes
    urgent: bool
    ts: int
    expires: int


@dataclass(frozen=True, slots=True)
class GroupChange:
    """What a membership operation found and did.

    Attributes:
        members: The members after the operation (sorted); empty when `found` is False.
        created: The group did not exist before (a `set`).
        found: The group existed (for a removal: and the user was a member).
        over_limit: Nothing changed: the group would have had more than the limit.
    """

    members: tuple[str, ...] = ()
    created: bool = False
    found: bool = True
    over_limit: bool = False


@dataclass(frozen=True, slots=True)
class GroupEvent:
    """One `group` event: `event` about `users`, queued to every device of `recipients`."""

    event: str
    users: tuple[str, ...]
    recipients: tuple[str, ...]


def membership_events(old: Iterable[str], new: Iterable[str]) -> list[GroupEvent]:
    """The events that a change of a member list from `old` to `new` queues: ``added``
    (if any user joined) and ``removed`` (if any left), each to every member of `new` and
    every removed user. No change queues nothing."""
    before, after = sorted(set(old)), sorted(set(new))
    added = tuple(u for u in after if u not in set(before))
    removed = tuple(u for u in before if u not in set(after))
    recipients = tuple(sorted({*after, *removed}))
    events = []
    if added:
        events.append(GroupEvent(ADDED, added, recipients))
    if removed:
        events.append(GroupEvent(REMOVED, removed, recipients))
    return events


def deletion_events(old: Iterable[str]) -> list[GroupEvent]:
    """The event deleting a group with members `old` queues: ``deleted``, to each of them."""
    members = tuple(sorted(set(old)))
    return [GroupEvent(DELETED, members, members)] if members else []
