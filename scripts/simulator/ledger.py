"""What happened during a run, and the summary computed from it. Plain code, no I/O.

Times are seconds on one monotonic clock (`time.monotonic`), shared by the phones and the
fake push services, which all run in the simulator's process.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def now() -> float:
    """The ledger's clock."""
    return time.monotonic()


def member_key(msg_id: str, recipient: str) -> str:
    """The ledger's key for one member's copy of a group message: each is followed as a
    message of its own (delivery, receipts), all answered by one `sent`."""
    return f"{msg_id}@{recipient}"


@dataclass(slots=True)
class MessageRecord:
    """One message (or one member's copy of a group message), from the sender's `send` to
    the receipts coming back."""

    id: str
    sender: str
    recipient: str
    urgent: bool
    recipient_idle: bool  # the recipient had no connection when the send went out
    sent_at: float
    stored_at: float | None = None  # `sent` arrived
    delivered_at: float | None = None  # first `msg` at the recipient
    deliveries: int = 0
    found_at_end: bool = False  # still queued when the run ended (not a loss, a strand)
    by_final_drain: bool = False  # first delivered while the final drain was running
    push_at: float | None = None  # the first wake-up request for the recipient after sending
    read_planned: bool = False  # the recipient will mark it read
    read_sent: bool = False
    delivered_receipt_at: float | None = None
    read_receipt_at: float | None = None
    group: str | None = None


@dataclass(frozen=True, slots=True)
class PushRecord:
    """One wake-up request that reached a fake provider."""

    at: float
    provider: str  # "apns" | "fcm" | "webpush"
    kind: str  # "alert" | "background"
    user: str
    status: int
    lost: bool  # accepted, then dropped by the provider (never reached the phone)
    throttled: bool = False  # accepted, then dropped by iOS's background budget


@dataclass(slots=True)
class Wake:
    """A phone woken by a push: push arrival → reconnect attempt (TCP connect starts) →
    `drained` (TCP, WebSocket upgrade, `hello`, `welcome` and the whole backlog)."""

    user: str
    push_at: float
    reconnect_at: float | None = None
    drained_at: float | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """The fleet at one moment, for the live display and the timeline plot."""

    at: float
    connected: int
    idle: int
    in_flight: int  # messages stored and not yet delivered, plus receipts not yet arrived
    pushes: int
    lost_pushes: int


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Count and nearest-rank percentiles of a latency, in seconds."""

    n: int
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Percentiles:
        """Percentiles of `values` (NaN when there are none)."""
        ordered = sorted(values)
        if not ordered:
            return cls(0, math.nan, math.nan, math.nan)
        return cls(len(ordered), *(_rank(ordered, q) for q in (0.50, 0.90, 0.99)))


def _rank(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Ledger:
    """Everything the phones, the senders and the fake providers observed."""

    started: float = field(default_factory=now)
    messages: dict[str, MessageRecord] = field(default_factory=dict)
    pushes: list[PushRecord] = field(default_factory=list)
    wakes: list[Wake] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    connects: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    drops: int = 0
    duplicates: int = 0
    pushes_ignored: int = 0  # reached a phone that was online, waking, or never sleeps
    undrained: dict[str, int] = field(default_factory=dict)
    zombies: int = 0  # times an app was suspended with its socket open
    reads_elsewhere: int = 0  # messages a sleeping phone's user read on their other device
    read_syncs: int = 0  # read receipts of those reads, delivered to the phone
    zombie_wakes: int = 0  # ... and resumed by a push
    ios_idle_phones: int = 0  # iPhones that sleep (for background pushes per device-hour)
    gateway: dict[str, float] = field(default_factory=dict)  # from the gateway's /metrics
    traffic_started: float | None = None
    final_drain_started: float | None = None
    _group_sends: dict[str, list[str]] = field(default_factory=dict)  # id -> member keys
    _awaiting_push: dict[str, list[MessageRecord]] = field(default_factory=dict)
    _open_wakes: dict[str, Wake] = field(default_factory=dict)
    _outstanding: int = 0  # items stored or expected and not yet arrived

    # -- recording ---------------------------------------------------------------------------

    def note_send(
        self, msg_id: str, sender: str, recipient: str, urgent: bool, recipient_idle: bool
    ) -> MessageRecord:
        """A sender wrote a `send` frame for the first time."""
        record = MessageRecord(msg_id, sender, recipient, urgent, recipient_idle, now())
        self.messages[msg_id] = record
        if recipient_idle:
            self._awaiting_push.setdefault(recipient, []).append(record)
        return record

    def note_group_send(
        self, msg_id: str, sender: str, group: str, recipients: Sequence[tuple[str, bool]],
        urgent: bool,
    ) -> list[MessageRecord]:  # fmt: skip
        """A sender wrote a `send` to a group whose other members are `recipients`
        ((user, idle) pairs): one record per member, keyed by `member_key`."""
        records = []
        for recipient, idle in recipients:
            record = self.note_send(member_key(msg_id, recipient), sender, recipient, urgent, idle)
            record.group = group
            records.append(record)
        self._group_sends[msg_id] = [r.id for r in records]
        return records

    def note_stored(self, msg_id: str) -> None:
        """The sender got `sent`: the message is durable (for every member of a group);
        a delivery is now owed."""
        for key in self._group_sends.get(msg_id, [msg_id]):
            record = self.messages.get(key)
            if record is not None and record.stored_at is None:
                record.stored_at = now()
                self._outstanding += 1

    def note_message(self, recipient: str, msg_id: str) -> None:
        """A `msg` arrived at its recipient (the first time, or again); a group
        message's `msg_id` is its `member_key`."""
        record = self.messages.get(msg_id)
        if record is None:
            self.errors["msg with an unknown id"] += 1
            return
        if record.recipient != recipient:
            self.errors["msg at the wrong device"] += 1
            return
        record.deliveries += 1
        if record.deliveries > 1:
            self.duplicates += 1
            return
        record.delivered_at = now()
        record.by_final_drain = self.final_drain_started is not None
        # Delivered before `sent` reached the sender is possible; count it owed once only.
        if record.stored_at is None:
            record.stored_at = record.delivered_at
            self._outstanding += 1
        self._outstanding += 1  # the delivered receipt is now owed to the sender
        self._outstanding -= 1  # the message itself arrived

    def note_read(self, msg_id: str) -> None:
        """The recipient sent `read` for a message: a read receipt is owed to the sender."""
        record = self.messages.get(msg_id)
        if record is not None and not record.read_sent:
            record.read_sent = True
            if record.read_receipt_at is None:  # not already read on the user's other device
                self._outstanding += 1

    def note_receipt(self, sender: str, kind: str, ids: Iterable[str], by: str = "") -> None:
        """A receipt from `by` arrived at a message's sender."""
        for msg_id in ids:
            record = self.messages.get(msg_id) or self.messages.get(member_key(msg_id, by))
            if record is None or record.sender != sender:
                self.errors["receipt for an unknown message"] += 1
                continue
            if kind == "delivered" and record.delivered_receipt_at is None:
                record.delivered_receipt_at = now()
                if record.delivered_at is not None:
                    self._outstanding -= 1
            elif kind == "read" and record.read_receipt_at is None:
                record.read_receipt_at = now()
                if record.read_sent:
                    self._outstanding -= 1

    def note_push(self, record: PushRecord) -> None:
        """A wake-up request reached a fake provider (lost or not)."""
        self.pushes.append(record)
        for message in self._awaiting_push.pop(record.user, []):
            if message.push_at is None:
                message.push_at = record.at

    def note_wake(self, user: str, push_at: float) -> None:
        """A delivered push made an idle phone start reconnecting."""
        wake = Wake(user, push_at)
        self.wakes.append(wake)
        self._open_wakes[user] = wake

    def note_reconnecting(self, user: str) -> None:
        """A phone starts opening a connection."""
        wake = self._open_wakes.get(user)
        if wake is not None and wake.reconnect_at is None:
            wake.reconnect_at = now()

    def note_connected(self, user: str) -> None:
        """A phone got `welcome`."""
        self.connects.setdefault(user, []).append(now())
        self._awaiting_push.pop(user, None)  # no wake-up needed any more

    def note_drained(self, user: str) -> None:
        """A phone got `drained`."""
        wake = self._open_wakes.pop(user, None)
        if wake is not None and wake.reconnect_at is not None:
            wake.drained_at = now()

    def note_disconnected(self, user: str) -> None:
        """A phone's connection ended; an unfinished wake is abandoned."""
        self._open_wakes.pop(user, None)

    def note_found_at_end(self, user: str, msg_id: str) -> None:
        """The end-of-run check found this item still queued for `user`."""
        record = self.messages.get(msg_id) or self.messages.get(member_key(msg_id, user))
        if record is not None and record.recipient == user and record.delivered_at is None:
            record.found_at_end = True

    @property
    def in_flight(self) -> int:
        """Messages stored and not delivered, plus receipts owed and not arrived."""
        return self._outstanding

    def settled(self) -> bool:
        """True once every sent message is stored and delivered and its receipts are back."""
        return self._outstanding == 0 and all(
            r.stored_at is not None for r in self.messages.values()
        )

    # -- the summary -------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The end-of-run figures (plain data: printed as a table, written as JSON)."""
        messages = list(self.messages.values())
        stored = [m for m in messages if m.stored_at is not None]
        delivered = [m for m in stored if m.delivered_at is not None]
        lost = [m for m in stored if m.delivered_at is None and not m.found_at_end]
        stranded = [m for m in stored if m.delivered_at is None and m.found_at_end]
        reads = [m for m in delivered if m.read_sent]
        pushes: Counter[str] = Counter(f"{p.provider} {p.kind}" for p in self.pushes)
        end = self.final_drain_started or now()
        hours = (end - self.traffic_started) / 3600 if self.traffic_started is not None else 0.0
        ios_background = sum(
            p.provider == "apns" and p.kind == "background" and p.at <= end for p in self.pushes
        )
        lost_pushes = sum(p.lost for p in self.pushes)
        rejected = sum(not 200 <= p.status < 300 for p in self.pushes)
        complete = [w for w in self.wakes if w.drained_at is not None]
        attempted = [w for w in self.wakes if w.reconnect_at is not None]
        latency = {
            "message_to_push": Percentiles.of(
                m.push_at - m.sent_at for m in stored if m.push_at is not None
            ),
            "push_to_reconnect": Percentiles.of(
                w.reconnect_at - w.push_at for w in attempted if w.reconnect_at is not None
            ),
            "reconnect_to_drained": Percentiles.of(
                w.drained_at - w.reconnect_at
                for w in complete
                if w.drained_at is not None and w.reconnect_at is not None
            ),
            "end_to_end_active": Percentiles.of(
                m.delivered_at - m.sent_at
                for m in delivered
                if not m.recipient_idle and m.delivered_at is not None
            ),
            "end_to_end_idle": Percentiles.of(
                m.delivered_at - m.sent_at
                for m in delivered
                if m.recipient_idle and m.delivered_at is not None
            ),
        }
        return {
            "messages": {
                "sent": len(stored),
                "unanswered": len(messages) - len(stored),
                "delivered": len(delivered),
                "lost": len(lost),
                "duplicated": self.duplicates,
                "to_idle_phones": sum(m.recipient_idle for m in stored),
                "group_sends": len(self._group_sends),
                "group_copies": sum(m.group is not None for m in stored),
                "by_final_drain": sum(m.by_final_drain for m in delivered),
                "still_queued_at_end": len(stranded),
            },
            "receipts": {
                "delivered_expected": len(delivered),
                "delivered_arrived": sum(m.delivered_receipt_at is not None for m in delivered),
                "read_expected": len(reads),
                "read_arrived": sum(m.read_receipt_at is not None for m in reads),
            },
            "pushes": {
                "by_provider_and_kind": dict(sorted(pushes.items())),
                "total": len(self.pushes),
                "lost_by_provider": lost_pushes,
                "rejected": rejected,
                "not_needed": self.pushes_ignored,
                "per_delivered_message": len(self.pushes) / len(delivered) if delivered else 0.0,
                "wakes": len(self.wakes),
                "throttled_by_ios": sum(p.throttled for p in self.pushes),
                "most_background_to_one_phone_in_an_hour": _most_in_an_hour(
                    [p for p in self.pushes if p.kind == "background"]
                ),
                "ios_background_per_device_hour": (
                    ios_background / (self.ios_idle_phones * hours)
                    if self.ios_idle_phones and hours > 0
                    else 0.0
                ),
            },
            "zombies": {"suspended_with_socket_open": self.zombies, "woken": self.zombie_wakes},
            "read_elsewhere": {"reads": self.reads_elsewhere, "synced_to_phone": self.read_syncs},
            "gateway": dict(self.gateway),
            "latency_s": {name: _as_dict(p) for name, p in latency.items()},
            "network_drops": self.drops,
            "errors": dict(self.errors),
            "undrained_devices": dict(self.undrained),
        }


def _most_in_an_hour(pushes: Sequence[PushRecord]) -> int:
    """The most of `pushes` that went to one phone within any hour."""
    by_user: dict[str, list[float]] = {}
    for push in pushes:
        by_user.setdefault(push.user, []).append(push.at)
    most = 0
    for times in by_user.values():
        times.sort()
        start = 0
        for end, at in enumerate(times):
            while times[start] <= at - 3600:
                start += 1
            most = max(most, end - start + 1)
    return most


def failures(summary: dict[str, Any]) -> list[str]:
    """Why a run failed (empty when nothing was lost and every queue was drained)."""
    out: list[str] = []
    m, r = summary["messages"], summary["receipts"]
    if m["lost"]:
        out.append(f"{m['lost']} message(s) lost")
    if m["unanswered"]:
        out.append(f"{m['unanswered']} send(s) never answered with `sent`")
    if summary["undrained_devices"]:
        items = sum(summary["undrained_devices"].values())
        out.append(f"{len(summary['undrained_devices'])} device(s) left with {items} item(s)")
    missing = r["delivered_expected"] - r["delivered_arrived"]
    if missing:
        out.append(f"{missing} delivered receipt(s) missing")
    missing = r["read_expected"] - r["read_arrived"]
    if missing:
        out.append(f"{missing} read receipt(s) missing")
    return out


def _as_dict(p: Percentiles) -> dict[str, float | int | None]:
    def ms(v: float) -> float | None:
        return None if math.isnan(v) else round(v * 1000, 1)

    return {"n": p.n, "p50_ms": ms(p.p50), "p90_ms": ms(p.p90), "p99_ms": ms(p.p99)}
