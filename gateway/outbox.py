"""A connection's bounded outbound buffer.

Entries are frames ready to send, or a store `Ticket` with a function that renders its
result as a frame once the commit is durable (how `sent` waits for the commit without
blocking the reader). Separately, a *doorbell* flag says the device's queue has new items.

The outbox does no waiting and no I/O: whoever writes for the connection takes the frames
that are ready (`take_ready`) and, when the head is a commit still in flight, waits on
its ticket (`first_pending`) before taking more, so frames leave in the order they came.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gateway.errors import Overloaded, StoreError
from gateway.store import Ticket

Frame = dict[str, Any]
Render = Callable[[Any], Frame]
OnError = Callable[[StoreError], Frame]
_Pending = tuple[Ticket[Any], Render, OnError]


class Outbox:
    """Frames and pending commits bound for one connection, at most `limit` of them."""

    __slots__ = ("_entries", "_rung", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # A list, not a deque: an empty deque costs every idle connection 600 bytes, and
        # entries leave in runs (`take_ready`), not one at a time.
        self._entries: list[Frame | _Pending] = []
        self._rung = False

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, frame: Frame) -> None:
        """Queue a frame. Raises `Overloaded` if the buffer is full."""
        self._check_room()
        self._entries.append(frame)

    def extend(self, frames: Iterable[Frame]) -> None:
        """Queue frames read from the store: bounded by the read itself, never refused."""
        self._entries.extend(frames)

    @property
    def half_full(self) -> bool:
        """Whether half the limit is taken: past it, ephemeral frames are dropped, items
        are left in the store rather than handed over, and a doorbell waits for room."""
        return len(self._entries) >= self.limit // 2

    def offer(self, frame: Frame) -> bool:
        """Queue an ephemeral frame if there is ample room; return False if it was dropped."""
        if self.half_full:
            return False
        self._entries.append(frame)
        return True

    def push_pending(self, ticket: Ticket[Any], render: Render, on_error: OnError) -> None:
        """Queue the frame that `render` makes of a ticket's result, once it is durable."""
        self._check_room()
        self._entries.append((ticket, render, on_error))

    def ring(self) -> None:
        """The device's stored queue has new items."""
        self._rung = True

    @property
    def rung(self) -> bool:
        """Whether the doorbell has been rung and not yet answered by a store read."""
        return self._rung

    def take_ring(self) -> bool:
        """Consume the doorbell; True if it had been rung."""
        rung, self._rung = self._rung, False
        return rung

    def first_pending(self) -> Ticket[Any] | None:
        """The ticket at the head, if the head is a commit still in flight."""
        if self._entries:
            head = self._entries[0]
            if not isinstance(head, dict) and not head[0].done:
                return head[0]
        return None

    def take_ready(self) -> list[Frame]:
        """Remove and return the frames up to the first commit still in flight."""
        entries = self._entries
        out: list[Frame] = []
        for entry in entries:
            if isinstance(entry, dict):
                out.append(entry)
                continue
            ticket, render, on_error = entry
            if not ticket.done:
                break
            try:
                out.append(render(ticket.outcome()))
            except StoreError as exc:
                out.append(on_error(exc))
        del entries[: len(out)]
        return out

    def _check_room(self) -> None:
        if len(self._entries) >= self.limit:
            raise Overloaded(f"outbound buffer full ({self.limit} frames)")
