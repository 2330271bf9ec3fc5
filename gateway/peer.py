"""How the rest of the gateway sees a device connection: identity, deliver, ring, close.

The registry, the router, presence and the cluster link hold connections through this
protocol and never through the I/O class, which keeps the edge replaceable and the
import graph one-way (`gateway.connection` imports them, not the other way round).
Every method is synchronous and cheap: it queues output and makes sure a writer will
send it.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.outbox import OnError, Render
from gateway.ratelimit import SendLimiter
from gateway.session import CloseCode
from gateway.store.base import QueueItem, Ticket

Frame = dict[str, Any]


class Peer(Protocol):
    """A live device connection, as its collaborators see it."""

    @property
    def id(self) -> int:
        """Unique within the process."""
        ...

    @property
    def user(self) -> str:
        """The authenticated user ("" before `hello`)."""
        ...

    @property
    def device(self) -> str:
        """The authenticated device ("" before `hello`)."""
        ...

    active: bool  # the client's `state`: inactive devices get no typing, held presence

    def deliver(self, item: QueueItem) -> None:
        """An item was just committed for this device: send it, or read the queue."""
        ...

    def ring(self) -> None:
        """The device's queue has new items: read it from the store."""
        ...

    def push(self, frame: Frame) -> None:
        """Send a frame that must not be dropped.

        Raises:
            Overloaded: The connection's outbox is full (the caller closes with 1013).
        """
        ...

    def push_pending(self, ticket: Ticket[Any], render: Render, on_error: OnError) -> None:
        """Send what `render` makes of a commit's result, in order, once it is durable.

        Raises:
            Overloaded: The connection's outbox is full.
        """
        ...

    def offer(self, frame: Frame) -> bool:
        """Send an ephemeral frame if there is ample room; False if it was dropped."""
        ...

    def request_close(self, code: CloseCode, reason: str) -> None:
        """Close the connection with `code` (the first request wins)."""
        ...


class Sender(Peer, Protocol):
    """A connection whose frames the router carries out: a peer with its send limiter
    and the merged receipts its acks stand for."""

    send_limit: SendLimiter

    def expand_acks(self, sids: tuple[int, ...]) -> tuple[int, ...]:
        """The stored items an ack stands for: merged receipts bring their absorbed sids."""
        ...
