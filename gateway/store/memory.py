"""The in-memory backend (``[store] backend = "memory"``): for tests and benchmarks.

It keeps every queue in this process's memory and loses everything when the process
ends: it is **not durable**. It commits through the same group-commit shell as SQLite and
Redis, so the protocol, the batching and the doorbells behave as in production; a commit
costs no I/O, which makes it the baseline that shows what the store costs. One process
only: it cannot be shared by ``--workers``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import trio

from gateway.errors import StoreError
from gateway.store.base import (
    MAX_SID,
    DeviceRecord,
    Doorbell,
    Envelope,
    ItemKind,
    PushToken,
    QueueItem,
    SendOutcome,
    SessionOpening,
    Ticket,
    delivered_by_sender,
)
from gateway.store.group_commit import GroupCommitStore, Outcome, Ring
from gateway.store.groups import (
    GroupChange,
    GroupEnvelope,
    GroupEvent,
    deletion_events,
    membership_events,
)

OpResult = tuple[Any, list[Ring]]


@dataclass(slots=True)
class _Device:
    created: int
    last_seen: int | None
    push: PushToken | None = None
    # sid -> (expires, item); sids only grow, so insertion order is sid order.
    queue: dict[int, tuple[int, QueueItem]] = field(default_factory=dict)

    def unexpired(self, now: int, after_sid: int = 0) -> Iterator[QueueItem]:
        return (item for sid, (exp, item) in self.queue.items() if sid > after_sid and exp > now)


@dataclass(frozen=True, slots=True)
class _Sent:
    ts: int
    expires: int
    recipient: str


@dataclass(slots=True)
class _Op:
    apply: Callable[[], OpResult]
    ticket: Ticket[Any]


class MemoryStore(GroupCommitStore[_Op]):
    """A `MessageStore` in this process's memory; see the module docstring."""

    def __init__(
        self,
        *,
        doorbell: Doorbell,
        max_batch: int = 512,
        receipt_ttl_ms: int = 30 * 24 * 3600 * 1000,
    ) -> None:
        super().__init__(doorbell=doorbell, max_batch=max_batch, receipt_ttl_ms=receipt_ttl_ms)
        self._users: dict[str, dict[str, _Device]] = {}
        self._sent: dict[tuple[str, str, str], _Sent] = {}  # (sender, device, id)
        # (recipient, sender) -> {id: expires}: what a `read` may name.
        self._received: dict[tuple[str, str], dict[str, int]] = {}
        self._revoked: dict[tuple[str, str], int] = {}
        self._groups: dict[str, set[str]] = {}
        self._last_sid = 0

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[None]:
        yield

    async def _apply(self, batch: Sequence[_Op]) -> list[Outcome]:
        """Apply each operation in turn; each checks before it changes anything, so one
        that fails changes nothing."""
        outcomes: list[Outcome] = []
        for op in batch:
            try:
                outcomes.append(op.apply())
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _submit(self, apply: Callable[[], OpResult]) -> Ticket[Any]:
        op = _Op(apply, Ticket())
        await self._enqueue(op)
        return op.ticket

    async def _run(self, apply: Callable[[], OpResult]) -> Any:
        return await (await self._submit(apply)).result()

    # -- the state ------------------------------------------------------------------------

    def _device(self, user: str, device: str) -> _Device | None:
        return self._users.get(user, {}).get(device)

    def _queue_item(
        self, to: str, device: str, record: _Device, expires: int, urgent: bool, make: Any
    ) -> Ring:
        self._last_sid += 1
        item: QueueItem = make(self._last_sid)
        record.queue[self._last_sid] = (expires, item)
        return to, device, urgent, item

    def _receipts(
        self,
        kind: ItemKind,
        to: str,
        by: str,
        by_device: str,
        ids: tuple[str, ...],
        now: int,
        expires: int,
        skip: str = "",
    ) -> list[Ring]:
        """One receipt item per device of `to` (but `skip`), carrying all `ids` at once."""
        if not ids:
            return []
        return [
            self._queue_item(
                to,
                name,
                record,
                expires,
                False,
                lambda sid: QueueItem(sid, kind, "", by, by_device, now, False, b"", ids),
            )
            for name, record in self._users.get(to, {}).items()
            if name != skip
        ]

    # -- mutations ------------------------------------------------------------------------

    async def submit_send(self, envelope: Envelope) -> Ticket[SendOutcome]:
        return await self._submit(lambda: self._send(envelope))

    def _send(self, env: Envelope) -> OpResult:
        key = (env.sender, env.sender_device, env.msg_id)
        earlier = self._sent.get(key)
        if earlier is not None and earlier.expires > env.ts:
            return SendOutcome(ts=earlier.ts, duplicate=True), []
        known = self._users.get(env.to, {})
        if not known:
            return SendOutcome(ts=env.ts, unknown_recipient=True), []
        self._sent[key] = _Sent(env.ts, env.expires, env.to)
        self._received.setdefault((env.to, env.sender), {})[env.msg_id] = env.expires
        own = env.sender_device if env.to == env.sender else None
        targets = [name for name in known if name != own]
        skipped: tuple[str, ...] = ()
        if env.bodies is not None:
            skipped = tuple(sorted(d for d in env.bodies if d not in known or d == own))
            targets = [name for name in targets if name in env.bodies]
        rings = []
        for name in targets:
            body = (env.body or b"") if env.bodies is None else env.bodies[name]
            rings.append(
                self._queue_item(
                    env.to, name, known[name], env.expires, env.urgent,
                    lambda sid, body=body: QueueItem(
                        sid, ItemKind.MESSAGE, env.msg_id, env.sender, env.sender_device,
                        env.ts, env.urgent, body,
                    ),
                )
            )  # fmt: skip
        return SendOutcome(ts=env.ts, devices=len(targets), skipped=skipped), rings

    async def submit_group_send(self, envelope: GroupEnvelope) -> Ticket[SendOutcome]:
        return await self._submit(lambda: self._group_send(envelope))

    def _group_send(self, env: GroupEnvelope) -> OpResult:
        """Every member device but the sender's gets an item; they share one bytes object,
        which is this backend's way of storing the body once."""
        key = (env.sender, env.sender_device, env.msg_id)
        earlier = self._sent.get(key)
        members = self._groups.get(env.group)
        if earlier is not None and earlier.expires > env.ts:
            listed = tuple(sorted(members or ()))
            return SendOutcome(ts=earlier.ts, duplicate=True, members=listed), []
        if members is None or env.sender not in members:
            return SendOutcome(ts=env.ts, not_member=True), []
        self._sent[key] = _Sent(env.ts, env.expires, "")
        rings: list[Ring] = []
        for member in sorted(members):
            self._received.setdefault((member, env.sender), {})[env.msg_id] = env.expires
            for name, record in self._users.get(member, {}).items():
                if member == env.sender and name == env.sender_device:
                    continue
                rings.append(
                    self._queue_item(
                        member, name, record, env.expires, env.urgent,
                        lambda sid: QueueItem(
                            sid, ItemKind.MESSAGE, env.msg_id, env.sender, env.sender_device,
                            env.ts, env.urgent, env.body, (), env.group,
                        ),
                    )
                )  # fmt: skip
        return SendOutcome(ts=env.ts, devices=len(rings)), rings

    def _group_events(self, group: str, events: list[GroupEvent], now: int) -> list[Ring]:
        """Queue each event to every device of its recipients."""
        expires = now + self._receipt_ttl_ms
        rings: list[Ring] = []
        for event in events:
            for user in event.recipients:
                for name, record in self._users.get(user, {}).items():
                    rings.append(
                        self._queue_item(
                            user, name, record, expires, False,
                            lambda sid, e=event: QueueItem(
                                sid, ItemKind.GROUP, e.event, "", "", now, False, b"",
                                e.users, group,
                            ),
                        )
                    )  # fmt: skip
        return rings

    async def set_group(
        self, group: str, members: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        def apply() -> OpResult:
            new = set(members)
            if len(new) > limit:
                return GroupChange(over_limit=True), []
            old = self._groups.get(group)
            self._groups[group] = new
            rings = self._group_events(group, membership_events(old or (), new), now)
            return GroupChange(tuple(sorted(new)), created=old is None), rings

        result: GroupChange = await self._run(apply)
        return result

    async def add_group_members(
        self, group: str, users: tuple[str, ...], now: int, limit: int
    ) -> GroupChange:
        def apply() -> OpResult:
            old = self._groups.get(group)
            if old is None:
                return GroupChange(found=False), []
            new = old | set(users)
            if len(new) > limit:
                return GroupChange(tuple(sorted(old)), over_limit=True), []
            self._groups[group] = new
            rings = self._group_events(group, membership_events(old, new), now)
            return GroupChange(tuple(sorted(new))), rings

        result: GroupChange = await self._run(apply)
        return result

    async def remove_group_member(self, group: str, user: str, now: int) -> GroupChange:
        def apply() -> OpResult:
            old = self._groups.get(group)
            if old is None or user not in old:
                return GroupChange(found=False), []
            new = old - {user}
            self._groups[group] = new
            rings = self._group_events(group, membership_events(old, new), now)
            return GroupChange(tuple(sorted(new))), rings

        result: GroupChange = await self._run(apply)
        return result

    async def delete_group(self, group: str, now: int) -> bool:
        def apply() -> OpResult:
            old = self._groups.pop(group, None)
            if old is None:
                return False, []
            return True, self._group_events(group, deletion_events(old), now)

        result: bool = await self._run(apply)
        return result

    async def group_members(self, group: str) -> tuple[str, ...] | None:
        await trio.lowlevel.checkpoint()
        members = self._groups.get(group)
        return None if members is None else tuple(sorted(members))

    async def submit_ack(
        self, user: str, device: str, sids: tuple[int, ...], now: int
    ) -> Ticket[int]:
        expires = now + self._receipt_ttl_ms
        return await self._submit(lambda: self._ack(user, device, sids, now, expires))

    def _ack(
        self, user: str, device: str, sids: tuple[int, ...], now: int, expires: int
    ) -> OpResult:
        if any(not 0 <= sid <= MAX_SID for sid in sids):
            raise StoreError("sid out of range")
        record = self._device(user, device)
        if record is None:
            return 0, []
        acked = [record.queue.pop(sid)[1] for sid in dict.fromkeys(sids) if sid in record.queue]
        rings: list[Ring] = []
        by_sender = delivered_by_sender((item.kind, item.msg_id, item.sender) for item in acked)
        for sender, ids in by_sender.items():
            rings += self._receipts(ItemKind.DELIVERED, sender, user, device, ids, now, expires)
        return len(acked), rings

    async def submit_read(
        self,
        reader: str,
        reader_device: str,
        to: str,
        ids: tuple[str, ...],
        now: int,
        expires: int,
    ) -> Ticket[int]:
        def apply() -> OpResult:
            received = self._received.get((reader, to), {})
            found = tuple(dict.fromkeys(i for i in ids if received.get(i, now) > now))
            rings = self._receipts(ItemKind.READ, to, reader, reader_device, found, now, expires)
            if to != reader:  # the reader's other devices learn what was read
                rings += self._receipts(
                    ItemKind.READ, reader, reader, reader_device, found, now, expires, reader_device
                )
            return len(rings), rings

        return await self._submit(apply)

    async def sync(self) -> None:
        await self._run(lambda: (None, []))

    async def open_session(
        self, user: str, device: str, *, issued_at: int | None, now: int, limit: int
    ) -> SessionOpening:
        """Check the revocation, register the device and read its first page, as one
        operation ordered after every submission made before it."""
        if limit < 0:
            raise ValueError("limit must not be negative")

        def apply() -> OpResult:
            revoked = self._revoked.get((user, device))
            if revoked is not None and (issued_at is None or issued_at <= revoked):
                return SessionOpening(refused=True), []
            record = self._device(user, device)
            if record is None:
                self._users.setdefault(user, {})[device] = _Device(created=now, last_seen=now)
                return SessionOpening(refused=False), []
            items = tuple(record.unexpired(now))
            return SessionOpening(refused=False, items=items[:limit], queued=len(items)), []

        opening: SessionOpening = await self._run(apply)
        return opening

    async def register_device(self, user: str, device: str, now: int) -> bool:
        def apply() -> OpResult:
            devices = self._users.setdefault(user, {})
            if device in devices:
                return False, []
            devices[device] = _Device(created=now, last_seen=now)
            return True, []

        result: bool = await self._run(apply)
        return result

    def _forget(self, user: str, device: str) -> bool:
        devices = self._users.get(user, {})
        existed = devices.pop(device, None) is not None
        if not devices:
            self._users.pop(user, None)
        return existed

    async def remove_device(self, user: str, device: str) -> bool:
        result: bool = await self._run(lambda: (self._forget(user, device), []))
        return result

    async def revoke_device(self, user: str, device: str, now: int) -> bool:
        def apply() -> OpResult:
            key = (user, device)
            self._revoked[key] = max(self._revoked.get(key, now), now)
            return self._forget(user, device), []

        result: bool = await self._run(apply)
        return result

    async def revoked_at(self, user: str, device: str) -> int | None:
        await trio.lowlevel.checkpoint()
        return self._revoked.get((user, device))

    async def touch_device(self, user: str, device: str, last_seen: int) -> None:
        def apply() -> OpResult:
            record = self._device(user, device)
            if record is not None:
                record.last_seen = last_seen
            return None, []

        await self._submit(apply)

    async def set_push_token(self, user: str, device: str, token: PushToken | None) -> None:
        def apply() -> OpResult:
            record = self._device(user, device)
            if record is not None:
                record.push = token
            return None, []

        await self._run(apply)

    async def clear_push_token(self, user: str, device: str, token: str, sent_at: int) -> bool:
        def apply() -> OpResult:
            record = self._device(user, device)
            push = None if record is None else record.push
            if record is None or push is None or push.token != token:
                return False, []
            if push.registered_at > sent_at:
                return False, []
            record.push = None
            return True, []

        result: bool = await self._run(apply)
        return result

    async def sweep_expired(self, now: int) -> int:
        def apply() -> OpResult:
            swept = 0
            for devices in self._users.values():
                for record in devices.values():
                    expired = [sid for sid, (exp, _) in record.queue.items() if exp <= now]
                    for sid in expired:
                        del record.queue[sid]
                    swept += len(expired)
            for key in [k for k, sent in self._sent.items() if sent.expires <= now]:
                del self._sent[key]
            for pair, ids in list(self._received.items()):
                for msg_id in [i for i, expires in ids.items() if expires <= now]:
                    del ids[msg_id]
                if not ids:
                    del self._received[pair]
            return swept, []

        result: int = await self._run(apply)
        return result

    # -- reads ----------------------------------------------------------------------------

    async def fetch(
        self, user: str, device: str, after_sid: int, limit: int, now: int
    ) -> list[QueueItem]:
        await trio.lowlevel.checkpoint()
        record = self._device(user, device)
        return [] if record is None else list(islice(record.unexpired(now, after_sid), limit))

    async def count(self, user: str, device: str, now: int) -> int:
        await trio.lowlevel.checkpoint()
        record = self._device(user, device)
        return 0 if record is None else sum(1 for _ in record.unexpired(now))

    async def devices(self, user: str) -> list[DeviceRecord]:
        await trio.lowlevel.checkpoint()
        return [
            DeviceRecord(user, name, record.created, record.last_seen, record.push)
            for name, record in sorted(self._users.get(user, {}).items())
        ]

    async def push_token(self, user: str, device: str) -> PushToken | None:
        await trio.lowlevel.checkpoint()
        record = self._device(user, device)
        return None if record is None else record.push
