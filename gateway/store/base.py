"""The store interface: per-device queues, idempotent sends, receipts, devices, push tokens.

The store is the source of truth. Every mutation is *submitted* and answered by a
`Ticket` that resolves only after the change is durable; backends group many submissions
into one commit. After a commit the backend rings the doorbell of every device that got a
new item, so callers never have to remember to.
"""

from __future__ import annotations

import abc
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio
from prometheus_client import Histogram

from gateway.errors import StoreError
from gateway.store.groups import GroupChange, GroupEnvelope
from push.store import ItemKind as ItemKind
from push.store import PushToken as PushToken

T = TypeVar("T")

log = logging.getLogger(__name__)

#: The largest sid: what SQLite and Redis integers hold. An ack naming a larger one fails.
MAX_SID = 2**63 - 1

#: Called after a commit for each item stored: (user, device, urgent, item). The item lets
#: a connected device receive it without reading it back from the store.
Doorbell = Callable[[str, str, bool, "QueueItem"], None]


@dataclass(slots=True)
class QueueItem:
    """One item in a device's queue, as delivered in a `msg`, `receipt` or `group` frame.

    A message sent to a group carries the group's id in `group`. A `group` event
    (kind GROUP) carries the group in `group`, the event (``added``, ``removed``,
    ``deleted``) in `msg_id` and the users it is about in `ids`.

    Nothing changes an item once made. It is not a frozen dataclass all the same: a
    group message makes one per member device, and a frozen one takes five times as long
    to make.
    """

    sid: int
    kind: ItemKind
    msg_id: str
    sender: str
    sender_device: str
    ts: int
    urgent: bool
    body: bytes
    ids: tuple[str, ...] = ()
    group: str = ""


def decode_item(
    sid: int,
    kind: int,
    msg_id: str,
    sender: str,
    sender_device: str,
    ts: int,
    urgent: bool,
    payload: bytes | Sequence[str],
    group: str = "",
) -> QueueItem:
    """A stored item back into a `QueueItem`: `payload` is a message's body, or the ids
    a receipt carries (the users, for a `group` event); `group` the group it belongs to."""
    item_kind = ItemKind(kind)
    if item_kind is ItemKind.MESSAGE:
        assert isinstance(payload, bytes)
        return QueueItem(
            sid, item_kind, msg_id, sender, sender_device, ts, bool(urgent), payload, (), group
        )
    assert not isinstance(payload, bytes)
    return QueueItem(
        sid, item_kind, msg_id, sender, sender_device, ts, False, b"", tuple(payload), group
    )


def delivered_by_sender(acked: Iterable[tuple[int, str, str]]) -> dict[str, tuple[str, ...]]:
    """The message ids among acked (kind, msg_id, sender) items, grouped by sender: what
    each sender gets a delivered receipt for (receipts themselves get none)."""
    by_sender: dict[str, list[str]] = defaultdict(list)
    for kind, msg_id, sender in acked:
        if kind == ItemKind.MESSAGE:
            by_sender[sender].append(msg_id)
    return {sender: tuple(ids) for sender, ids in by_sender.items()}


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message to store: one sender device, one recipient user, one or many ciphertexts."""

    sender: str
    sender_device: str
    msg_id: str
    to: str
    body: bytes | None
    bodies: Mapping[str, bytes] | None
    urgent: bool
    ts: int
    expires: int


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What a send did: stored (or found already stored) at `ts` for `devices` devices."""

    ts: int
    devices: int = 0
    duplicate: bool = False
    unknown_recipient: bool = False
    skipped: tuple[str, ...] = ()
    not_member: bool = False  # a group send from a non-member, or to no such group
    members: tuple[str, ...] = ()  # a duplicate group send: whose devices to ring again


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A known device of a user."""

    user: str
    device: str
    created: int
    last_seen: int | None
    push: PushToken | None


@dataclass(frozen=True, slots=True)
class SessionOpening:
    """What a device's `hello` finds in the store, read in one round trip.

    `refused` is True when the device was revoked after its token was issued; nothing
    else is read or written then. Otherwise the device is registered (durably), and
    `items` is the first page of its queue (in sid order; at most the asked limit, and a
    backend may read fewer) and `queued` how many unexpired items it holds in all: more
    than `items` means the rest is still to be fetched.
    """

    refused: bool
    items: tuple[QueueItem, ...] = ()
    queued: int = 0


class Ticket(Generic[T]):
    """The promise of a submitted store operation: resolves once the commit is durable."""

    __slots__ = ("_callbacks", "_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[], None]] | None = None

    def resolve(self, value: T) -> None:
        """Complete with a value (called by the backend after commit)."""
        self._value = value
        self._complete()

    def fail(self, error: BaseException) -> None:
        """Complete with an error (called by the backend when the commit failed)."""
        self._error = error
        self._complete()

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` (at once if already done) when the operation completes, either
        way; for a caller that must not wait, such as a connection's writer."""
        if self._done.is_set():
            callback()
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def _complete(self) -> None:
        self._done.set()
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception:  # one caller's failure is not the backend's
                log.exception("a store ticket's callback failed")

    @property
    def done(self) -> bool:
        """Whether the operation has completed, either way."""
        return self._done.is_set()

    async def wait(self) -> None:
        """Wait until the operation has completed, either way."""
        await self._done.wait()

    async def result(self) -> T:
        """Wait for the commit and return the result.

        Raises:
            StoreError: The operation was not committed.
        """
        await self._done.wait()
        return self.outcome()

    def outcome(self) -> T:
        """The result of a completed operation, without waiting.

        Raises:
            StoreError: The operation was not committed.
            RuntimeError: It has not completed yet.
        """
        if not self._done.is_set():
            raise RuntimeError("the operation has not completed")
        if self._error is not None:
            if isinstance(self._error, StoreError):
                raise self._error
            raise StoreError(str(self._error)) from self._error
        return self._value  # type: ignore[return-value]


# Commit latency from a fraction of a millisecond (SQLite, synchronous = normal) to
# seconds (a slow disk or a Redis failover); batch sizes up to the largest max_batch.
COMMIT_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class CommitStats:
    """Histograms of commit latency and batch size for `/metrics`. They belong to no
    registry; the gateway's collector exports them."""

    def __init__(self) -> None:
        self.latency = Histogram(
            "gateway_store_commit_seconds",
            "Time from the start of a group commit until it is durable.",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=None,
        )
        self.batch_size = Histogram(
            "gateway_store_batch_size",
            "Operations per group commit.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=None,
        )

    def observe(self, size: int, seconds: float) -> None:
        """Record one commit of `size` operations that took `seconds`."""
        self.latency.observe(seconds)
        self.batch_size.observe(size)


class MessageStore(abc.ABC):
    """Durable per-device queues and the records around them.

    A backend is a service: `run` is started with ``await nursery.start(store.run)`` and
    commits submissions until `close` is called, then flushes what was submitted and
    returns. Reads may run concurrently with commits and see only committed data.
    """

    #: Whether each device's sids are consecutive (every stored item takes the next one).
    #: A connection then knows that an item whose sid is not its cursor + 1 follows one it
    #: was never rung for (an operation whose answer Redis lost, a doorbell lost between
    #: nodes), and reads the store instead of jumping over it.
    consecutive_sids: bool = False

    #: Commit latency and batch-size histograms, for `/metrics`.
    commit_stats: CommitStats

    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store and commit submissions until closed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting submissions; `run` flushes the rest and returns."""

    # -- health and metrics ----------------------------------------------------------------

    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Submissions waiting for a commit."""

    async def may_sweep(self, lease_ms: int) -> bool:
        """Whether this process should run the expiry sweep now. A store that is one
        process's always should; a shared one answers True to one process at a time, the
        holder of a lease that this call takes or renews for `lease_ms`.

        Raises:
            StoreError: The store did not answer.
        """
        return True

    async def ping(self) -> None:
        """Check that the store answers a read (for readiness); callers bound the time.

        Raises:
            StoreError: It does not.
        """
        await self.count("", "", 0)

    # -- mutations: each returns once queued for commit; await the ticket for durability --

    @abc.abstractmethod
    async def submit_send(self, envelope: Envelope) -> Ticket[SendOutcome]:
        """Store a message for each recipient device, idempotently by (sender device, id)."""

    @abc.abstractmethod
    async def submit_ack(
        self, user: str, device: str, sids: tuple[int, ...], now: int
    ) -> Ticket[int]:
        """Delete acked items of this device only; queue delivered receipts to their senders."""

    @abc.abstractmethod
    async def submit_read(
        self, reader: str, reader_device: str, to: str, ids: tuple[str, ...], now: int, expires: int
    ) -> Ticket[int]:
        """Queue a read receipt for every device of `to`, carrying those of `ids` that
        `to` sent to `reader` (and that have not expired); other ids are dropped, so no
        one can mark as read what they were never sent. The same receipt (by `reader`) is
        queued for every other device of `reader`, so they learn what was read (unless
        `to` is `reader`, whose devices all get the first one). Returns the receipts
        queued."""

    # -- groups (see `gateway.store.groups`) --

    @abc.abstractmethod
    async def submit_group_send(self, envelope: GroupEnvelope) -> Ticket[SendOutcome]:
        """Store a group message for every device of every member of its group, the
        sending device excluded, its body once; idempotently by (sender device, id).

        The outcome is `not_member` when the group does not exist or the sender is not
        one of its members; nothing is stored then.
        """

    @abc.abstractmethod
    async def set_group(
        self, group: str, members: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        """Create a group, or replace its member list, durably; queue the `group` events
        of the change (`membership_events`). More than `limit` members changes nothing
        and answers `over_limit`."""

    @abc.abstractmethod
    async def add_group_members(
        self, group: str, users: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        """Add users to an existing group (`found` False if there is none), durably, with
        the events of the change; past `limit` members nothing changes (`over_limit`)."""

    @abc.abstractmethod
    async def remove_group_member(self, group: str, user: str, now: int) -> GroupChange:
        """Remove one member, durably, with its `removed` event; `found` is False if the
        group does not exist or `user` is not a member."""

    @abc.abstractmethod
    async def delete_group(self, group: str, now: int) -> bool:
        """Delete a group, durably, queueing `deleted` to its members; True if it existed."""

    @abc.abstractmethod
    async def group_members(self, group: str) -> tuple[str, ...] | None:
        """The sorted members of a group, or None if it does not exist."""

    @abc.abstractmethod
    async def sync(self) -> None:
        """Wait until everything submitted before this call is committed."""

    @abc.abstractmethod
    async def open_session(
        self, user: str, device: str, *, issued_at: int | None, now: int, limit: int
    ) -> SessionOpening:
        """Everything a `hello` needs from the store, in one round trip.

        Ordered after every submission made before it (so acks of the device's previous
        connection are committed, and nothing they deleted is read back), it refuses a
        token issued (`issued_at`, ms; None when the token has no ``iat``) at or before
        the device's last revocation; otherwise it registers the device durably and reads
        the first `limit` items of its queue and the number queued.

        Raises:
            StoreError: The store did not answer.
        """

    @abc.abstractmethod
    async def register_device(self, user: str, device: str, now: int) -> bool:
        """Make a device known (durably); returns True if it is new."""

    @abc.abstractmethod
    async def remove_device(self, user: str, device: str) -> bool:
        """Forget a device and drop its queue; returns True if it existed."""

    @abc.abstractmethod
    async def revoke_device(self, user: str, device: str, now: int) -> bool:
        """Forget a device and drop its queue, like `remove_device`, and remember that it
        was revoked at `now` (ms), so that tokens issued before then are refused from now
        on. Returns True if the device existed."""

    @abc.abstractmethod
    async def revoked_at(self, user: str, device: str) -> int | None:
        """When the device was last revoked (ms), or None if it never was."""

    @abc.abstractmethod
    async def touch_device(self, user: str, device: str, last_seen: int) -> None:
        """Record when a device was last connected; returns once queued for commit."""

    @abc.abstractmethod
    async def set_push_token(self, user: str, device: str, token: PushToken | None) -> None:
        """Set, replace or (with None) remove a device's push token."""

    @abc.abstractmethod
    async def clear_push_token(self, user: str, device: str, token: str, sent_at: int) -> bool:
        """Remove `token` unless it was re-registered after `sent_at`; True if removed."""

    @abc.abstractmethod
    async def sweep_expired(self, now: int) -> int:
        """Delete items and idempotency records whose TTL has run out; return the count."""

    # -- reads --

    @abc.abstractmethod
    async def fetch(
        self, user: str, device: str, after_sid: int, limit: int, now: int
    ) -> list[QueueItem]:
        """Up to `limit` unexpired items of a device with sid > `after_sid`, in sid order."""

    @abc.abstractmethod
    async def count(self, user: str, device: str, now: int) -> int:
        """How many unexpired items a device has queued."""

    @abc.abstractmethod
    async def devices(self, user: str) -> list[DeviceRecord]:
        """The known devices of a user."""

    @abc.abstractmethod
    async def push_token(self, user: str, device: str) -> PushToken | None:
        """A device's push token, if any."""
