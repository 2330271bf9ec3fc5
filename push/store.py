"""What push needs from the message store: four calls, and the types they share.

The dispatcher reads a device's push token, clears a token that a provider called invalid,
and, when a disconnected device's linger time is up, counts its queue and peeks at the
first items to choose between an alert and a background wake-up; before an alert retry it
peeks the same way for an urgent message still unanswered. Any store with these calls
serves; a call that cannot complete raises `push.errors.StoreFailure`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ItemKind(enum.IntEnum):
    """What a queue item carries."""

    MESSAGE = 0
    DELIVERED = 1
    READ = 2
    GROUP = 3  # a group membership change


@dataclass(frozen=True, slots=True)
class PushToken:
    """A device's push registration."""

    provider: str
    token: str
    topic: str | None
    sandbox: bool
    registered_at: int


class QueuedItem(Protocol):
    """What a linger check or an alert retry reads of a queued item."""

    @property
    def kind(self) -> ItemKind:
        """What the item carries: only an urgent message makes the wake-up an alert."""
        ...

    @property
    def urgent(self) -> bool:
        """Whether the sender marked it urgent."""
        ...

    @property
    def msg_id(self) -> str:
        """The message's id (a message item)."""
        ...

    @property
    def sender(self) -> str:
        """Who sent it: for a read receipt, the reader."""
        ...

    @property
    def ids(self) -> tuple[str, ...]:
        """The message ids a receipt covers."""
        ...


class PushStore(Protocol):
    """The store calls push makes; each raises `StoreFailure` when it cannot complete."""

    async def push_token(self, user: str, device: str) -> PushToken | None:
        """A device's push token, if any."""
        ...

    async def clear_push_token(self, user: str, device: str, token: str, sent_at: int) -> bool:
        """Remove `token` unless it was re-registered after `sent_at` (ms); True if removed."""
        ...

    async def count(self, user: str, device: str, now: int) -> int:
        """How many unexpired items a device has queued at `now` (ms)."""
        ...

    async def fetch(
        self, user: str, device: str, after_sid: int, limit: int, now: int
    ) -> Sequence[QueuedItem]:
        """Up to `limit` unexpired items of a device with sid > `after_sid`, in sid order."""
        ...
