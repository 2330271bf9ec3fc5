"""Durable per-device queues: the interface and its backends."""

from __future__ import annotations

from gateway.store.base import (
    DeviceRecord,
    Doorbell,
    Envelope,
    ItemKind,
    MessageStore,
    PushToken,
    QueueItem,
    SendOutcome,
    SessionOpening,
    Ticket,
)
from gateway.store.groups import GroupChange, GroupEnvelope, GroupEvent

__all__ = [
    "DeviceRecord",
    "Doorbell",
    "Envelope",
    "GroupChange",
    "GroupEnvelope",
    "GroupEvent",
    "ItemKind",
    "MessageStore",
    "PushToken",
    "QueueItem",
    "SendOutcome",
    "SessionOpening",
    "Ticket",
]
