"""What nodes sharing a store say to each other, and the bus a shared backend provides.

Many gateway processes on one Redis keep a device -> node registry (claims with a TTL),
ring each other's connections, close each other's replaced or revoked connections, and
announce connects and disconnects (for presence and pending wake-ups) and the alert
wake-ups they send (for clears). `ClusterLink` and `ClusterPresence` do
that through `ClusterBus`; the Redis backend provides it (gateway/store/redis_bus.py),
so nothing above the store speaks Redis.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.store.base import QueueItem


@dataclass(frozen=True, slots=True)
class RemoteRing:
    """An item was queued for a device connected to this node, by another node."""

    user: str
    device: str
    urgent: bool
    item: QueueItem


@dataclass(frozen=True, slots=True)
class Kick:
    """Close this node's connection `conn_id` of the device: it connected again elsewhere."""

    user: str
    device: str
    conn_id: str


@dataclass(frozen=True, slots=True)
class Revocation:
    """Close this node's connection `conn_id` of the device with 4001: it was revoked."""

    user: str
    device: str
    conn_id: str


class EventKind(enum.Enum):
    """What a cluster event announces."""

    CONNECTED = "c"
    DISCONNECTED = "d"
    HIDDEN = "h"  # a user hid or showed their presence (device is "")
    ALERTED = "a"  # a node sent the device an alert wake-up


@dataclass(frozen=True, slots=True)
class Event:
    """A device connected or disconnected on some node, got an alert wake-up from one, or
    a user's hidden flag changed."""

    kind: EventKind
    user: str
    device: str


BusMessage = RemoteRing | Kick | Revocation | Event


@dataclass(frozen=True, slots=True)
class Claim:
    """A device held by one of this node's connections."""

    user: str
    device: str
    conn_id: int


class Renewal(enum.IntEnum):
    """What renewing a claim found."""

    TAKEN = 0  # another connection claimed the device since: this one was replaced
    RENEWED = 1
    RESTORED = 2  # the claim had expired (Redis was unreachable) and is set again


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    """A user's presence as the shared store holds it."""

    connected: int  # devices claimed by live nodes
    grace_ms: int  # what is left of the grace period after the last disconnect
    last_seen: int | None
    hidden: bool


class ClusterBus(Protocol):
    """The shared backend's side of the cluster. Every call raises `StoreError` when
    the backend does not answer."""

    @property
    def node_id(self) -> str:
        """This node's name among the nodes sharing the backend."""

    async def claim(self, claim: Claim, ttl_ms: int) -> bool:
        """Register the device as connected here for `ttl_ms`, telling the node of its
        previous connection, if any, to close it (a `Kick`); True if that was another
        node."""

    async def renew(self, claims: Sequence[Claim], ttl_ms: int) -> list[Renewal]:
        """Renew claims of this node, in order."""

    async def release(self, claims: Sequence[Claim], now: int, grace_ms: int) -> None:
        """Let go of devices whose connection ended (a claim taken over since is kept);
        their users stay online for `grace_ms` after the last one."""

    async def close_revoked(self, user: str, device: str) -> bool:
        """Tell the node holding the device, if it is another, to close it with 4001;
        True if one was told."""

    async def announce_alerts(self, devices: Sequence[tuple[str, str]]) -> None:
        """Tell every node that these (user, device) pairs got an alert wake-up (an
        `Event` of kind ALERTED, this node included)."""

    async def listen(
        self, on_message: Callable[[BusMessage], None], on_listening: Callable[[], None]
    ) -> None:
        """Receive this node's messages and every node's events, calling `on_listening`
        once subscribed, until the subscription is lost (`StoreError`)."""

    async def set_hidden(self, changes: Sequence[tuple[str, bool]]) -> None:
        """Record users' hidden flags, in order, and announce them as events."""

    async def read_presence(self, users: Sequence[str]) -> list[PresenceRecord | None]:
        """The presence of each of `users` (None where that one read failed)."""
